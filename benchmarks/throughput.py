"""Is the input pipeline ever the bottleneck? The example's training loop against its bare step.

Commands (JAX's default backend, so the same line runs on CPU or GPU)::

  python -m benchmarks.throughput                  # ResNet-20, batch 128 (CPU: ~3 min)
  python -m benchmarks.throughput --quick          # fewer steps (CPU: ~1 min)
  python -m benchmarks.throughput --models resnet20,resnet18 --json docs/bench/throughput.json

Two ways to run the same number of steps of the example's one jitted train step (same model,
optimizer, batch size and on-device augmentation), timed in interleaved rounds:

- ``loop``: the example's full per-epoch loop, ``examples.cifar.train.Trainer.train_epoch``:
  host-side shuffling, uploading the epoch's indices, the periodic loss check, and the epoch's
  metrics, around the trainer's jitted ``train_step`` (which gathers each batch on the device from
  the resident uint8 dataset);
- ``bare``: that same jitted step (``Trainer.train_step``) called back to back on one batch
  index, with nothing around it.

A host-bound proxy, for a machine without an accelerator: ``--models tiny --batch 8 --steps 200
--rounds 7`` makes the step so short that per-step host work shows.

The ratio ``loop / bare`` in images/s (median over rounds) is the share of the step's speed that
the loop keeps; the target is >= 0.95.

Also reported, for each way: the **host time per step**, the CPU time of the Python thread that
runs the loop (``time.thread_time``) over one more round, divided by the steps. JAX dispatches
asynchronously, so a loop whose host time per step is below the device's step time keeps the
device busy, and the loop cannot be host-bound. It is an upper bound on the host work: a
busy-waiting ``block_until_ready`` or loss read would add to it. Data: the CIFAR-10 npz pair in
``--data-dir`` (default ``../shared/data/cifar10``, the JPEG-decoded copy); if it is missing
(e.g. on a lent GPU machine) random uint8 images of the same shape, which cost the pipeline
exactly the same.
"""

import argparse
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from benchmarks import _bench

__all__ = ["loop_vs_bare", "main"]

TARGET = 0.95
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def _data(data_dir: str | None, n: int) -> tuple[Any, str]:
  """``n`` training images (a stratified subset of CIFAR-10, or random uint8) and the source."""
  from examples.cifar import input_pipeline as ip

  try:
    if data_dir is None:
      raise ip.DataError("no data dir")
    data = ip.load_dataset("cifar10", data_dir, download=False)
    return ip.stratified_subset(data.train, n), f"CIFAR-10 npz ({data.source})"
  except ip.DataError:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(n,)).astype(np.int32)
    return ip.Split(images, labels), "synthetic uint8 (CIFAR-10 not found)"


def _host_ms_per_step(fn: Any, steps: int) -> float:
  """CPU milliseconds of the calling (Python) thread per step, over one call of ``fn``."""
  c0 = time.thread_time()
  jax.block_until_ready(fn())
  return 1e3 * (time.thread_time() - c0) / steps


def loop_vs_bare(
    model_name: str, *, batch: int, steps: int, rounds: int, data_dir: str | None
) -> dict[str, Any]:
  """Times ``steps`` steps of the example's loop and of its bare step, ``rounds`` times each."""
  from examples.cifar import models, train
  from examples.cifar.config import Config

  split, source = _data(data_dir, steps * batch)
  config = Config(dataset="cifar10", model=model_name, optimizer="sgd", gc="gc", epochs=1,
                  batch_size=batch, progress=False).resolved()
  mesh = train.make_mesh()
  model = models.create_model(model_name, 10, 0)
  optimizer = nnx.Optimizer(model, train.make_optimizer(config, steps), wrt=nnx.Param)
  replicated = NamedSharding(mesh, PartitionSpec())
  for node in (model, optimizer):  # as the example does: parameters replicated on the mesh
    nnx.update(node, jax.device_put(nnx.state(node), replicated))
  mean_std = jax.device_put(jnp.asarray([[0.49, 0.48, 0.45], [0.25, 0.24, 0.26]], jnp.float32),
                            replicated)
  rng = jax.device_put(jax.random.key(0), replicated)
  # The example's trainer: its one jitted train step, and the split resident on the devices.
  trainer = train.Trainer(model, optimizer, mesh, split, config, rng, mean_std)
  idx, mask = trainer.epoch_batches(0)
  epoch = [0]

  def loop():
    epoch[0] += 1
    return trainer.train_epoch(epoch[0])

  def bare():
    # The same jitted step, called back to back on the epoch's first batch: no shuffling, no
    # index upload, no loss check, no epoch bookkeeping.
    leaves = trainer.leaves()
    totals, s0 = trainer.zeros()
    loss = None
    try:
      for _ in range(steps):
        leaves, totals, _, loss = trainer.train_step(leaves, totals, trainer.data, idx, mask, s0,
                                                     rng, mean_std)
    finally:  # the step donated the old arrays: hand the new ones back to the model
      trainer.set_leaves(leaves)
    return loss

  t0 = time.perf_counter()
  jax.block_until_ready(bare())  # compiles
  loop()
  warm_s = time.perf_counter() - t0
  t = _bench.interleaved({"loop": loop, "bare": bare}, rounds=rounds, iters=1)
  host = {name: _host_ms_per_step(fn, steps) for name, fn in (("loop", loop), ("bare", bare))}
  images = steps * batch
  ratio = _bench.ratio_stats(t["bare"], t["loop"])  # time ratio bare/loop = img/s loop/bare
  row = {
      "model": model_name, "batch": batch, "steps_per_round": steps, "rounds": rounds,
      "data": source,
      "loop_images_per_s": images / float(np.median(t["loop"])),
      "bare_images_per_s": images / float(np.median(t["bare"])),
      "loop_over_bare": ratio,
      # Training time alone of the paper's CIFAR recipe (200 epochs of 50,000 images) at the
      # loop's speed: a floor for `--config cifar100` (evaluation and compile come on top).
      "implied_200_epochs_min": 200 * 50_000 / (images / float(np.median(t["loop"]))) / 60,
      "bare_ms_per_step": 1e3 * float(np.median(t["bare"])) / steps,
      "loop_host_ms_per_step": host["loop"],
      "bare_host_ms_per_step": host["bare"],
      "warmup_s": warm_s,
      "times_s": t,
  }
  print(f"  {model_name}: loop {row['loop_images_per_s']:.0f} img/s, bare "
        f"{row['bare_images_per_s']:.0f} img/s, ratio {ratio['median']:.3f}; host ms/step: loop "
        f"{host['loop']:.3f}, bare {host['bare']:.3f}", flush=True)
  return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--quick", action="store_true", help="fewer steps and rounds")
  p.add_argument("--json", default=None, help="write the results to this JSON file")
  p.add_argument("--models", default="resnet20")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--steps", type=int, default=None, help="steps per round (default: by backend)")
  p.add_argument("--rounds", type=int, default=None)
  p.add_argument("--data-dir", default=str(DEFAULT_DATA),
                 help="folder with train.npz (default ../shared/data/cifar10); 'none': synthetic")
  a = p.parse_args(argv)
  gpu = jax.default_backend() != "cpu"
  steps = a.steps or ((100 if a.quick else 300) if gpu else (12 if a.quick else 30))
  rounds = a.rounds or (3 if a.quick else 5)
  data_dir = None if a.data_dir.lower() == "none" else a.data_dir

  info = _bench.machine()
  print(f"machine: {info}", flush=True)
  t0 = time.perf_counter()
  rows = [loop_vs_bare(m, batch=a.batch, steps=steps, rounds=rounds, data_dir=data_dir)
          for m in a.models.split(",") if m]
  print("\nExample's training loop vs its bare jitted step (images/s; ratio = median over rounds "
        "[quartiles]):")
  _bench.print_table(
      ["model", "batch", "data", "loop img/s", "bare img/s", "loop / bare", "target >= 0.95",
       "200 epochs x 50k (min)", "step ms", "loop host ms/step", "bare host ms/step"],
      [[r["model"], r["batch"], r["data"].split(" (")[0], f"{r['loop_images_per_s']:.0f}",
        f"{r['bare_images_per_s']:.0f}",
        f"{r['loop_over_bare']['median']:.3f} [{r['loop_over_bare']['q1']:.3f}, "
        f"{r['loop_over_bare']['q3']:.3f}]",
        "met" if r["loop_over_bare"]["median"] >= TARGET else "MISSED",
        f"{r['implied_200_epochs_min']:.0f}", f"{r['bare_ms_per_step']:.2f}",
        f"{r['loop_host_ms_per_step']:.3f}", f"{r['bare_host_ms_per_step']:.3f}"] for r in rows],
  )
  info["wall_s"] = time.perf_counter() - t0
  print(f"\nwall time {info['wall_s']:.0f} s")
  payload = {"machine": info, "target": TARGET, "quick": a.quick, "rows": rows}
  _bench.write_json(a.json, payload)
  return payload


if __name__ == "__main__":
  main()
