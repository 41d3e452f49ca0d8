"""Tests for training: a tiny run, compile-once, exact resume after kill -9, NaN stop, 8 devices."""

import dataclasses
import json
import math
import os
import subprocess
import sys
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


def test_help_documents_the_command_line_contract(capsys) -> None:
  with pytest.raises(SystemExit):
    train.main(["--help"])
  text = capsys.readouterr().out
  for flag in ("--dataset", "--data-dir", "--model", "--optimizer", "--gc", "--gc-location",
               "--epochs", "--batch-size", "--lr", "--weight-decay", "--seed", "--train-subset",
               "--workdir", "--distributed", "--coordinator-address", "--num-processes",
               "--process-id", "--distributed-timeout"):
    assert flag in text


def test_digits_training_learns_compiles_once_and_writes_outputs(tmp_path: Path) -> None:
  before = dict(train.TRACE_COUNTS)
  status = train.main(["--config", "digits", "--epochs", "3", "--progress", "false",
                       "--gc-log-every-epochs", "2", "--workdir", str(tmp_path)])
  assert status == 0
  # 1437 images in batches of 32: the last batch is partial, and still nothing recompiles.
  assert train.TRACE_COUNTS["train_step"] - before.get("train_step", 0) == 1
  assert train.TRACE_COUNTS["eval_step"] - before.get("eval_step", 0) == 1

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


@pytest.mark.parametrize("optimizer, location", [
    ("sgd", "gradient"), ("adam", "gradient"), ("adam", "update"), ("adamw", "gradient"),
    ("adamw", "update")])
def test_optax_axes_put_optax_centralize_in_gcs_place(optimizer: str, location: str) -> None:
  """``gc_axes="optax"`` is the optax_gc alias with ``optax.centralize()`` (axis 0) for GC."""
  params = {"w": jnp.arange(12.0).reshape(3, 4) / 10, "b": jnp.ones(4)}
  base = Config(optimizer=optimizer, gc_location=location, epochs=10, weight_decay=1e-2)
  tx = train.make_optimizer(dataclasses.replace(base, gc_axes="optax"), 5)
  axis0 = train.make_optimizer(dataclasses.replace(base, gc_axes="last"), 5, output_axis=0)
  last = train.make_optimizer(dataclasses.replace(base, gc_axes="last"), 5)
  txs = {"optax": tx, "axis0": axis0, "last": last}
  states = {k: t.init(params) for k, t in txs.items()}
  for step in range(3):
    # Signs vary along both axes, so Adam's first step (about -lr * sign(g)) has no fixed mean.
    grads = jax.tree.map(lambda p, s=step: jnp.sin(p * 10 * (s + 3)) + 0.1, params)
    updates = {}
    for k, t in txs.items():
      updates[k], states[k] = t.update(grads, states[k], params)
    got, other = updates["optax"], updates["last"]
    chex.assert_trees_all_close(got, updates["axis0"], rtol=1e-5, atol=1e-7)
    assert not np.allclose(got["w"], other["w"])  # Not the default axis.
    params = optax.apply_updates(params, got)


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
  """An epoch runs under ``transfer_guard("disallow")`` and equals stepping its batches by hand."""
  config = dataclasses.replace(SMALL, train_subset=250, log_every_steps=2).resolved()  # 8 steps.
  split = input_pipeline.stratified_subset(input_pipeline.load_dataset("digits").train, 250)
  mesh = train.make_mesh()
  mean_std = jnp.asarray([[8.0], [6.0]], jnp.float32)
  rng = jax.random.key(3)

  def fresh() -> tuple[Any, nnx.Optimizer]:
    model = models.create_model("tiny", 10, 0)
    return model, nnx.Optimizer(model, train.make_optimizer(config, 8), wrt=nnx.Param)

  model, optimizer = fresh()
  train.train_epoch(model, optimizer, mesh, split, config, 1, rng, mean_std)  # Compiles.
  with jax.transfer_guard("disallow"):  # Explicit device_put/device_get only.
    got = train.train_epoch(model, optimizer, mesh, split, config, 2, rng, mean_std)

  model, optimizer = fresh()  # The same two epochs, one explicit batch at a time.
  for epoch in (1, 2):  # `sums` keeps epoch 2's per-step sums.
    idx, mask = input_pipeline.train_batches(250, 32, config.seed, epoch)
    sums = [train.train_step(model, optimizer, input_pipeline.shard_batch(mesh, split, i, m), rng,
                             mean_std) for i, m in zip(idx, mask, strict=True)]
  totals = {k: sum(float(m[k]) for m in sums) for k in ("loss_sum", "correct", "count")}
  assert totals["count"] == 250  # Each image once: the last of the 8 batches is partial.
  assert got["loss"] == pytest.approx(totals["loss_sum"] / 250, rel=1e-5)
  assert got["accuracy"] == pytest.approx(totals["correct"] / 250, abs=1e-6)
  assert int(optimizer.step[...]) == 16


def test_resume_after_kill_9_gives_identical_metrics(tmp_path: Path) -> None:
  reference = tmp_path / "uninterrupted"
  train.train_and_evaluate(SMALL, reference)

  interrupted = tmp_path / "interrupted"
  # 8 training steps per epoch: step call 12 is in the middle of epoch 2, after epoch 1's
  # checkpoint.
  script = (
      "import json, os, signal, sys\n"
      "from examples.cifar import train\n"
      "from examples.cifar.config import Config\n"
      "real, calls = train.resident_train_step, [0]\n"
      "def step_then_maybe_die(*args):\n"
      "  step = real(*args)\n"
      "  def counted(*a):\n"
      "    calls[0] += 1\n"
      "    if calls[0] == 12:\n"
      "      os.kill(os.getpid(), signal.SIGKILL)\n"
      "    return step(*a)\n"
      "  return counted\n"
      "train.resident_train_step = step_then_maybe_die\n"
      "train.train_and_evaluate(Config.from_dict(json.loads(sys.argv[1])), sys.argv[2])\n"
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
