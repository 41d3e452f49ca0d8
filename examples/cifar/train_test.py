"""Tests for training: a tiny run, compile-once, exact resume after kill -9, NaN stop, 8 devices."""

import collections
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_gc
from examples.cifar import compare, input_pipeline, linen, models, train
from examples.cifar.config import Config
from examples.cifar.conftest import REPO_ROOT

# A small, fast run: 256 stratified digits, 8 steps per epoch, the tiny ResNet.
SMALL = Config(dataset="digits", model="tiny", train_subset=256, batch_size=32, epochs=3,
               augment="crop_flip", schedule="cosine", progress=False)
TIMING_KEYS = {"seconds", "images_per_sec"}


def _python(script: str, *args: str, env: dict[str, str] | None = None,
            timeout: int = 240) -> subprocess.CompletedProcess:
  """Runs ``script`` in a fresh interpreter at the repository root (fast compiles, as here)."""
  preamble = "import jax; jax.config.update('jax_disable_most_optimizations', True)\n"
  return subprocess.run(
      [sys.executable, "-c", preamble + script, *args], cwd=REPO_ROOT, capture_output=True,
      text=True, timeout=timeout,
      env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})},
  )


def _metrics(workdir: Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _without_timing(records: list[dict]) -> list[dict]:
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def _options(text: str) -> set[str]:
  """The whole option tokens in a help text: ``--gc-location`` is not ``--gc``."""
  return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*(?![\w-])", text))


def test_help_documents_the_command_line_contract(capsys) -> None:
  with pytest.raises(SystemExit):
    train.main(["--help"])
  options = _options(capsys.readouterr().out)
  for flag in ("--dataset", "--data-dir", "--model", "--optimizer", "--gc", "--gc-location",
               "--gc-axes", "--epochs", "--batch-size", "--lr", "--weight-decay", "--seed",
               "--train-subset", "--workdir", "--distributed", "--coordinator-address",
               "--num-processes", "--process-id", "--distributed-timeout"):
    assert flag in options, flag
  assert _options("--gc-location --distributed-timeout") == {"--gc-location",
                                                              "--distributed-timeout"}


@contextlib.contextmanager
def _compiles() -> Iterator[collections.Counter[str]]:
  """Counts, by function name, what JAX compiles inside the block, from JAX's compile log."""
  counts: collections.Counter[str] = collections.Counter()

  class Handler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
      if record.msg.startswith("Compiling "):
        counts[str(record.args[0])] += 1

  logger = logging.getLogger("jax._src.interpreters.pxla")
  handler, level = Handler(logging.DEBUG), logger.level
  logger.addHandler(handler)
  logger.setLevel(logging.DEBUG)
  try:
    yield counts
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_digits_training_learns_compiles_once_and_writes_outputs(tmp_path: Path) -> None:
  with _compiles() as compiles:
    status = train.main(["--config", "digits", "--epochs", "3", "--progress", "false",
                         "--gc-log-every-epochs", "2", "--workdir", str(tmp_path)])
  assert status == 0
  # 1437 images in batches of 32: the last batch is partial, and still nothing recompiles.
  assert compiles["jit(train_step)"] == 1 and compiles["jit(eval_step)"] == 1, compiles

  records = _metrics(tmp_path)
  assert [r["epoch"] for r in records] == [1, 2, 3]
  for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "learning_rate",
              "images_per_sec", "seconds"):
    assert all(math.isfinite(r[key]) for r in records), key
  assert records[-1]["train_loss"] < records[0]["train_loss"]
  assert records[-1]["test_accuracy"] > 0.6  # Chance is 0.1.

  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["final_test_accuracy"] == records[-1]["test_accuracy"]
  assert summary["best_test_accuracy"] == max(r["test_accuracy"] for r in records)
  assert summary["config"]["model"] == "resnet8" and summary["config"]["learning_rate"] == 0.1

  lines = (tmp_path / "gc_diagnostics.jsonl").read_text().splitlines()
  diagnostics = [json.loads(line) for line in lines]
  assert [d["epoch"] for d in diagnostics] == [1, 2]
  shares = diagnostics[0]["shares"]
  assert "stem_conv/kernel" in shares and "head/kernel" in shares
  assert all(0.0 <= v <= 1.0 for v in shares.values())
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2", "3"]


@pytest.mark.parametrize("optimizer, location", [
    ("sgd", "gradient"), ("sgd", "update"), ("adam", "update"), ("adamw", "update")])
def test_none_arm_is_the_gc_chain_minus_centralization(optimizer: str, location: str) -> None:
  """With GC on the update (and for SGD anyway, by linearity), GC's update = Phi(none's update)."""
  params = {"w": jnp.arange(12.0).reshape(3, 4) / 10, "b": jnp.ones(4)}
  base = Config(optimizer=optimizer, gc_location=location, epochs=10, weight_decay=1e-2)
  txs = {gc: train.make_optimizer(dataclasses.replace(base, gc=gc), 5)
         for gc in ("none", "gc", "gcc")}
  states = {gc: tx.init(params) for gc, tx in txs.items()}
  centralize = optax_gc.centralize()
  for step in range(3):
    grads = jax.tree.map(lambda p, s=step: jnp.sin(p * (s + 3)) + 0.5, params)
    updates = {}
    for gc, tx in txs.items():
      updates[gc], states[gc] = tx.update(grads, states[gc], params)
    expected, _ = centralize.update(updates["none"], centralize.init(params))
    np.testing.assert_allclose(updates["gc"]["w"], expected["w"], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(updates["gc"]["b"], updates["none"]["b"])  # 1-D: untouched.
    np.testing.assert_array_equal(updates["gcc"]["w"], updates["none"]["w"])  # GCC: convs only.
    assert not np.allclose(updates["gc"]["w"], updates["none"]["w"])
    params = optax.apply_updates(params, updates["none"])


def _plain_optax(optimizer: str, lr: optax.Schedule, wd: float, gc: Any = None
                 ) -> optax.GradientTransformation:
  """The optimizer written out in Optax, with ``gc`` (or nothing) where GC goes."""
  gc = [] if gc is None else [gc]
  if optimizer == "sgd":
    chain = [optax.add_decayed_weights(wd), *gc, optax.trace(decay=0.9)]
  elif optimizer == "adam":
    chain = [optax.add_decayed_weights(wd), *gc, optax.scale_by_adam()]
  else:
    chain = [*gc, optax.scale_by_adam(), optax.add_decayed_weights(wd)]
  return optax.chain(*chain, optax.scale_by_learning_rate(lr))


def _run_updates(tx: optax.GradientTransformation, params: dict, steps: int = 3) -> list[dict]:
  state, updates = tx.init(params), []
  for step in range(steps):
    # Signs vary along both axes, so Adam's first step (about -lr * sign(g)) has no fixed mean.
    grads = jax.tree.map(lambda p, s=step: jnp.sin(p * 10 * (s + 3)) + 0.1, params)
    update, state = jax.jit(tx.update)(grads, state, params)
    updates.append(update)
    params = optax.apply_updates(params, update)
  return updates


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_the_none_arm_is_plain_optax_bit_for_bit(optimizer: str) -> None:
  """``--gc none`` is the alias with ``output_axis=None``: the Optax chain, to the last bit."""
  params = {"w": jnp.arange(24.0).reshape(2, 3, 4) / 10, "b": jnp.ones(4)}
  config = Config(optimizer=optimizer, gc="none", epochs=10, weight_decay=1e-2).resolved()
  got = _run_updates(train.make_optimizer(config, 5), params)
  lr = train.make_learning_rate(config, 5)
  want = _run_updates(_plain_optax(optimizer, lr, 1e-2), params)
  for g, w in zip(got, want, strict=True):
    chex.assert_trees_all_equal(g, w)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_optax_axes_put_optax_centralize_in_gcs_place(optimizer: str) -> None:
  """``gc_axes="optax"`` gives GC ``optax.centralize()``'s rule (keep axis 0) on every kernel."""
  config = Config(optimizer=optimizer, gc_axes="optax", epochs=10, weight_decay=1e-2).resolved()
  model = models.create_model("tiny", 10, 0)
  output_axis = train.gc_output_axes(config, model, (32, 32, 3))
  params = {"w": jnp.arange(12.0).reshape(3, 4) / 10, "b": jnp.ones(4)}
  got = _run_updates(train.make_optimizer(config, 5, output_axis), params)
  lr = train.make_learning_rate(config, 5)
  want = _run_updates(_plain_optax(optimizer, lr, 1e-2, optax.centralize()), params)
  last = _run_updates(train.make_optimizer(config, 5, -1), params)
  for g, w, other in zip(got, want, last, strict=True):
    chex.assert_trees_all_close(g, w, rtol=1e-5, atol=1e-7)
    assert not np.allclose(g["w"], other["w"])  # Not the default axis.


def _one_step(name: str, gc_axes: str) -> dict[str, np.ndarray]:
  """One SGD step (no momentum yet, no decay) of ``name`` with GC on ``gc_axes``: the update."""
  model = models.create_model(name, 10, 0)
  # Move every parameter off its initial value: at init a LayerNorm's output has zero mean over
  # the features, so the gradient of each kernel that reads it already has zero fan-in mean.
  params = nnx.state(model, nnx.Param)
  keys = iter(jax.random.split(jax.random.key(2), len(jax.tree.leaves(params))))
  nnx.update(model, jax.tree.map(lambda p: p + 0.3 * jax.random.normal(next(keys), p.shape),
                                 params))
  config = Config(optimizer="sgd", weight_decay=0.0, epochs=1, gc_axes=gc_axes)
  tx = train.make_optimizer(config, 5, train.gc_output_axes(config, model, (32, 32, 3)))
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  grads = nnx.grad(lambda m: jnp.sum(jnp.sin(m(x, train=True))))(model)
  before = nnx.state(model, nnx.Param)
  before = {jax.tree_util.keystr(k, simple=True, separator="/"): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(before)}
  nnx.Optimizer(model, tx, wrt=nnx.Param).update(model, grads)
  after = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
  return {k.removesuffix("/value"): np.asarray(v) - before[jax.tree_util.keystr(
      path, simple=True, separator="/")] for path, v in after
      for k in [jax.tree_util.keystr(path, simple=True, separator="/")]}


def test_inferred_axes_are_the_last_axis_on_a_resnet_but_not_on_attention() -> None:
  """``gc_axes="inferred"`` = ``last`` on a CNN; on the ViT it differs exactly where -1 is wrong."""
  assert Config().gc_axes == "inferred"
  inferred, last = _one_step("tiny", "inferred"), _one_step("tiny", "last")
  for k in inferred:
    np.testing.assert_array_equal(inferred[k], last[k], err_msg=k)

  inferred, last = _one_step("vit_test", "inferred"), _one_step("vit_test", "last")
  differ = {k for k in inferred if not np.allclose(inferred[k], last[k], rtol=1e-5, atol=1e-9)}
  attention = {f"blocks/0/attn/{n}/{w}" for n in ("query", "key", "value")
               for w in ("kernel", "bias")}
  # -1 averages q/k/v kernels (in, heads, head_dim) across heads, centralizes the rank-2
  # (heads, head_dim) biases, and the (1, patches, dim) position table across patches. The key
  # bias's gradient is 0 (softmax ignores a shift shared by all keys), so it stays equal.
  assert differ == attention - {"blocks/0/attn/key/bias"} | {"pos_embed"}
  for n in ("query", "key", "value"):  # Inferred: zero mean over the fan-in (axis 0) per unit.
    update = inferred[f"blocks/0/attn/{n}/kernel"]
    np.testing.assert_allclose(update.mean(0), 0.0, atol=1e-7)
    assert np.abs(last[f"blocks/0/attn/{n}/kernel"].mean(0)).max() > 1e-6


def test_optax_axes_have_no_gcc_form() -> None:
  with pytest.raises(ValueError, match="gc_axes='optax' has no conv-only"):
    train.make_optimizer(Config(gc="gcc", gc_axes="optax"), 5)


def test_learning_rate_schedules() -> None:
  step = train.make_learning_rate(
      Config(epochs=200, step_boundaries=(0.5, 0.75)).resolved(), steps_per_epoch=10)
  assert [float(step(s)) for s in (0, 999, 1000, 1499, 1500)] == pytest.approx(
      [0.1, 0.1, 0.01, 0.01, 0.001])
  warm = train.make_learning_rate(
      Config(epochs=10, schedule="cosine", warmup_epochs=1).resolved(), steps_per_epoch=4)
  assert [float(warm(s)) for s in (0, 3)] == pytest.approx([0.025, 0.1])
  assert float(warm(39)) < 0.01


def test_epoch_moves_nothing_between_host_and_device_per_step_and_replays_its_batches() -> None:
  """An epoch runs under ``transfer_guard("disallow")`` and equals calling its step by hand."""
  config = dataclasses.replace(SMALL, train_subset=250, log_every_steps=2).resolved()  # 8 steps.
  split = input_pipeline.stratified_subset(input_pipeline.load_dataset("digits").train, 250)
  mesh = train.make_mesh()
  mean_std = jnp.asarray([[8.0], [6.0]], jnp.float32)
  rng = jax.random.key(3)

  def fresh(**kwargs: Any) -> train.Trainer:
    model = models.create_model("tiny", 10, 0)
    optimizer = nnx.Optimizer(model, train.make_optimizer(config, 8), wrt=nnx.Param)
    return train.Trainer(model, optimizer, mesh, split, config, rng, mean_std, **kwargs)

  steps: list[int] = []
  trainer = fresh(before_step=steps.append)
  trainer.train_epoch(1)  # Compiles.
  with jax.transfer_guard("disallow"):  # Explicit device_put/device_get only.
    got = trainer.train_epoch(2)
  assert steps == list(range(1, 17))  # The hook sees the run's step numbers, across epochs.

  trainer = fresh()  # The same two epochs, the same step called one batch at a time.
  leaves = trainer.leaves()
  for epoch in (1, 2):  # `sums` keeps epoch 2's per-step sums.
    idx, mask = trainer.epoch_batches(epoch)
    sums = []
    for s in range(8):
      zeros, _ = trainer.zeros()
      leaves, step_sums, s_next, _ = trainer.train_step(leaves, zeros, trainer.data, idx, mask,
                                                        jnp.int32(s), rng, mean_std)
      assert int(s_next) == s + 1
      sums.append(step_sums)
  trainer.set_leaves(leaves)
  totals = {k: sum(float(m[k]) for m in sums) for k in ("loss_sum", "correct", "count")}
  assert totals["count"] == 250  # Each image once: the last of the 8 batches is partial.
  assert got["loss"] == pytest.approx(totals["loss_sum"] / 250, rel=1e-5)
  assert got["accuracy"] == pytest.approx(totals["correct"] / 250, abs=1e-6)
  assert int(trainer.optimizer.step[...]) == 16


def test_resume_after_kill_9_gives_identical_metrics(tmp_path: Path) -> None:
  reference = tmp_path / "uninterrupted"
  train.train_and_evaluate(SMALL, reference)

  interrupted = tmp_path / "interrupted"
  # 8 training steps per epoch: step 12 is in the middle of epoch 2, after epoch 1's checkpoint.
  script = (
      "import json, os, signal, sys\n"
      "from examples.cifar import train\n"
      "from examples.cifar.config import Config\n"
      "def die_at_12(step):\n"
      "  if step == 12:\n"
      "    os.kill(os.getpid(), signal.SIGKILL)\n"
      "train.train_and_evaluate(Config.from_dict(json.loads(sys.argv[1])), sys.argv[2],\n"
      "                         before_step=die_at_12)\n"
  )
  killed = _python(script, json.dumps(SMALL.to_dict()), str(interrupted))
  assert killed.returncode == -9, killed.stderr[-2000:]
  assert [r["epoch"] for r in _metrics(interrupted)] == [1]

  summary = train.train_and_evaluate(SMALL, interrupted)  # The same command again: resumes.
  assert _without_timing(_metrics(interrupted)) == _without_timing(_metrics(reference))
  assert summary["final_test_accuracy"] == _metrics(reference)[-1]["test_accuracy"]

  # Resuming a finished run trains nothing; resuming with another recipe is refused.
  assert train.train_and_evaluate(SMALL, interrupted)["epochs"] == 3
  with pytest.raises(ValueError, match="learning_rate"):
    train.train_and_evaluate(dataclasses.replace(SMALL, learning_rate=0.5), interrupted)


def test_the_quickstart_run_twice_at_once_gives_identical_metrics(tmp_path: Path) -> None:
  """Two fresh processes, competing for the cores, run the quickstart's recipe (``--config
  digits``, XLA's default optimizations, 2 epochs on 256 images): the same metrics, bit for bit.
  So on one machine and one set of package versions the quickstart table does not depend on
  thread scheduling or load."""
  cmd = [sys.executable, "-m", "examples.cifar.train", "--config", "digits", "--epochs", "2",
         "--train-subset", "256", "--progress", "false", "--seed", "1"]
  env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
  runs = [subprocess.Popen([*cmd, "--workdir", str(tmp_path / str(i))], cwd=REPO_ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
          for i in range(2)]
  for run in runs:
    assert run.wait(timeout=240) == 0, run.stderr.read()[-2000:]
  first, second = (_without_timing(_metrics(tmp_path / str(i))) for i in range(2))
  assert len(first) == 2 and first == second


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(
    tmp_path: Path) -> None:
  # The step schedule multiplies the learning rate by 1e38 after epoch 1: the loss blows up.
  config = dataclasses.replace(SMALL, epochs=2, schedule="step", step_boundaries=(0.5,),
                               step_factor=1e38)
  with pytest.raises(train.TrainingDivergedError, match="Last good checkpoint: epoch 1"):
    train.train_and_evaluate(config, tmp_path)
  assert [r["epoch"] for r in _metrics(tmp_path)] == [1]
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]


def test_eight_devices_match_one_device(tmp_path: Path) -> None:
  config = dataclasses.replace(SMALL, epochs=1)
  one = train.train_and_evaluate(config, tmp_path / "one")
  script = (
      "import json, sys\n"
      "import jax\n"
      "from examples.cifar import input_pipeline, train\n"
      "from examples.cifar.config import Config\n"
      "assert jax.device_count() == 8, jax.devices()\n"
      "split = input_pipeline.load_dataset('digits').train\n"
      "idx, mask = input_pipeline.train_batches(len(split), 32, 0, 1)\n"
      "batch = input_pipeline.shard_batch(train.make_mesh(), split, idx[0], mask[0])\n"
      "summary = train.train_and_evaluate(Config.from_dict(json.loads(sys.argv[1])), sys.argv[2])\n"
      "print(json.dumps({'batch_devices': len(batch.images.sharding.device_set),\n"
      "                  'shard_rows': batch.images.addressable_shards[0].data.shape[0],\n"
      "                  'num_devices': summary['num_devices']}))\n"
  )
  result = _python(script, json.dumps(config.to_dict()), str(tmp_path / "eight"),
                   env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report == {"batch_devices": 8, "shard_rows": 4, "num_devices": 8}
  eight = _metrics(tmp_path / "eight")[0]
  for key in ("train_loss", "test_loss", "train_accuracy", "test_accuracy"):
    assert eight[key] == pytest.approx(_metrics(tmp_path / "one")[0][key], rel=1e-4, abs=1e-4)
  assert one["num_devices"] == 1


def test_short_run_on_a_stratified_cifar10_subset(tmp_path: Path, shared_cifar10: Path) -> None:
  config = dataclasses.replace(SMALL, dataset="cifar10", data_dir=str(shared_cifar10),
                               model="resnet8", train_subset=1000, batch_size=50, epochs=1,
                               augment="none")
  summary = train.train_and_evaluate(config, tmp_path)
  records = _metrics(tmp_path)
  assert len(records) == 1 and summary["source"].endswith("*.npz")
  assert records[0]["train_loss"] < math.log(10)
  assert summary["final_test_accuracy"] > 0.2  # Chance is 0.1; all 10,000 test images.


def test_compare_writes_plot_and_table(tmp_path: Path) -> None:
  status = compare.main(["--config", "digits", "--model", "tiny", "--epochs", "1",
                         "--train-subset", "64", "--arms", "none,gc:update", "--seeds", "0",
                         "--workdir", str(tmp_path)])
  assert status == 0
  assert (tmp_path / "comparison.png").stat().st_size > 10_000
  table = (tmp_path / "comparison.md").read_text()
  assert "| none | 1 |" in table and "| gc:update | 1 |" in table
  assert json.loads((tmp_path / "gc_update" / "seed0" / "summary.json").read_text())[
      "config"]["gc_location"] == "update"


def test_linen_variant_learns() -> None:
  history = linen.train("gc", epochs=2)
  assert history[-1]["train_loss"] < history[0]["train_loss"]
  assert history[-1]["test_accuracy"] > 0.3


# ----------------------------------------------------------------------------------------------
# Failures: one line, nothing created, nothing lost.


def _error_lines(capsys: pytest.CaptureFixture) -> list[str]:
  return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_a_model_typo_is_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
  workdir = tmp_path / "w"
  for main in (train.main, compare.main):
    with pytest.raises(SystemExit) as exit_:
      main(["--config", "digits", "--model", "resnet9", "--workdir", str(workdir)])
    assert exit_.value.code == 2
    assert "argument --model: invalid choice: 'resnet9'" in _error_lines(capsys)[-1]
  with pytest.raises(ValueError, match=r"--model must be one of \[.*'resnet8'.*\], got 'resnet9'"):
    train.train_and_evaluate(dataclasses.replace(SMALL, model="resnet9"), workdir)
  assert not workdir.exists()


@pytest.mark.parametrize("flag, value", [("--epochs", "0"), ("--batch-size", "-1"),
                                         ("--eval-batch-size", "0"), ("--log-every-steps", "0")])
def test_a_number_that_must_be_positive_names_its_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture, flag: str, value: str) -> None:
  assert train.main(["--config", "digits", flag, value, "--workdir", str(tmp_path / "w")]) == 1
  assert _error_lines(capsys) == [f"error: {flag} must be positive, got {value}."]
  assert not (tmp_path / "w").exists()


def test_a_workdir_that_is_a_file_or_under_one_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
  file = tmp_path / "file"
  file.write_text("not a folder")
  for main in (train.main, compare.main):
    assert main(["--config", "digits", "--workdir", str(file)]) == 1
    assert _error_lines(capsys) == [f"error: --workdir {file} is a file; give a folder."]
    assert main(["--config", "digits", "--workdir", str(file / "run")]) == 1
    assert _error_lines(capsys) == [
        f"error: --workdir {file / 'run'} is under {file}, which is a file; give a folder."]
  assert file.read_text() == "not a folder"


def test_missing_data_creates_no_workdir(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
  def offline(url: str, dest: Path, md5: str, *, missing_hint: str = "") -> None:
    raise input_pipeline.DataError(f"offline: {missing_hint}")

  monkeypatch.setattr(input_pipeline, "download_archive", offline)  # Never the network.
  data_dir, workdir = tmp_path / "nowhere" / "cifar10", tmp_path / "w"
  assert train.main(["--dataset", "cifar10", "--data-dir", str(data_dir), "--model", "tiny",
                     "--workdir", str(workdir)]) == 1
  (line,) = _error_lines(capsys)
  assert line.startswith("error: offline: cifar10 not found in ") and str(data_dir) in line
  assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, Path]:
  """A finished two-epoch run of the tiny ResNet: checkpoints 1 and 2."""
  config = dataclasses.replace(SMALL, epochs=2)
  workdir = tmp_path_factory.mktemp("two_epochs")
  train.train_and_evaluate(config, workdir)
  return config, workdir


def _truncate_largest_data_file(checkpoints: Path, step: int) -> None:
  data = checkpoints / str(step) / "default" / "ocdbt.process_0" / "d"
  largest = max(data.iterdir(), key=lambda f: f.stat().st_size)
  largest.write_bytes(largest.read_bytes()[:largest.stat().st_size // 2])


def _truncate_metadata(checkpoints: Path, step: int) -> None:
  (checkpoints / str(step) / "default" / "_METADATA").write_bytes(b"")


def _half_written_step_3(checkpoints: Path, step: int) -> None:
  """Step 3's folder as a kill leaves it mid-save: some array files, no metadata."""
  del step
  shutil.copytree(checkpoints / "2" / "default" / "ocdbt.process_0",
                  checkpoints / "3" / "default" / "ocdbt.process_0")


@pytest.mark.parametrize("corrupt, bad", [(_truncate_largest_data_file, 2),
                                          (_truncate_metadata, 2), (_half_written_step_3, 3)])
def test_a_broken_checkpoint_is_moved_aside_and_the_run_resumes_from_the_one_before(
    tmp_path: Path, capsys: pytest.CaptureFixture, two_epochs: tuple[Config, Path],
    corrupt: Any, bad: int) -> None:
  config, reference = two_epochs
  workdir = tmp_path / "w"
  shutil.copytree(reference, workdir)
  corrupt(workdir / "checkpoints", 2)
  broken_files = sorted(p.relative_to(workdir / "checkpoints" / str(bad))
                        for p in (workdir / "checkpoints" / str(bad)).rglob("*"))
  good = bad - 1
  capsys.readouterr()
  summary = train.train_and_evaluate(config, workdir)
  (warning,) = [line for line in capsys.readouterr().err.splitlines()
                if line.startswith("warning:")]
  moved = workdir / "checkpoints_broken" / str(bad)
  assert warning.startswith(f"warning: checkpoint {bad} in {workdir / 'checkpoints'} does not "
                            "restore (")
  assert warning.endswith(f"); moved it to {moved}; resuming from checkpoint {good}.")
  # Nothing lost: the broken step is kept, file for file, and the run ends where it would have.
  assert sorted(p.relative_to(moved) for p in moved.rglob("*")) == broken_files
  assert summary["epochs"] == 2
  assert _without_timing(_metrics(workdir)) == _without_timing(_metrics(reference))
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2"]


def test_when_no_checkpoint_restores_one_line_names_the_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture, two_epochs: tuple[Config, Path]) -> None:
  config, reference = two_epochs
  workdir = tmp_path / "w"
  shutil.copytree(reference, workdir)
  for step in (1, 2):
    _truncate_metadata(workdir / "checkpoints", step)
  flags = ["--config", "digits", "--model", "tiny", "--train-subset", "256", "--batch-size", "32",
           "--epochs", "2", "--augment", "crop_flip", "--schedule", "cosine", "--progress",
           "false", "--workdir", str(workdir)]
  assert train.main(flags) == 1
  last = _error_lines(capsys)[-1]
  assert last.startswith(f"error: no checkpoint in {workdir / 'checkpoints'} restores (2: ")
  assert last.endswith("; move that folder aside to start over, or use a new --workdir.")
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2"]
  assert not (workdir / "checkpoints_broken").exists()
