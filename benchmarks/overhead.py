"""What Gradient Centralization costs: inside a jitted optimizer step and a whole train step.

Commands (each picks JAX's default backend, so the same line runs on CPU or GPU)::

  python -m benchmarks.overhead                          # full run (CPU: ~6 min, GPU: ~2 min)
  python -m benchmarks.overhead --quick                  # fewer rounds (CPU: ~2 min)
  python -m benchmarks.overhead --json docs/bench/overhead_cpu.json
  python -m benchmarks.overhead --from-json docs/bench/overhead_cpu.json   # reprint its tables

Two parts, each timed in interleaved rounds (every variant once per round, in a fresh random
order), reporting the median over rounds of the per-round ratio to the plain optimizer:

1. **Optimizer step.** ``params, state = step(params, state, grads)`` jitted (params and state
   donated) on the parameter trees of the example's ResNet-18 and ResNet-50 (Flax layout,
   CIFAR-100 head), for SGD with momentum 0.9 and for Adam, each bare and, as the library's
   aliases ``gc_sgd`` / ``gc_adam``, with the paper's coupled weight decay 5e-4. Variants:

   - ``plain``: ``optax.sgd`` / ``optax.adam`` (after ``optax.add_decayed_weights`` for the
     ``*_wd`` rows);
   - ``optax_gc``: ``optax.chain(optax_gc.centralize(), plain)``, or the alias for ``*_wd``;
   - ``optax.centralize``: the same chain with ``optax.centralize()``, the same amount of work
     on the wrong axes for Flax (it keeps axis 0, PyTorch's output axis);
   - ``floor``: one jitted read pass over every gradient (a sum per leaf), the least any GC
     can cost since it must read every gradient once to form the means.

   Target, wherever GC reads a stored buffer (every row but ``clip_sgd`` and
   ``gc_adamw_update``): GC's extra time <= 1.0x the floor. A plain SGD-momentum step is a
   few passes over memory and exact GC must add one read of the gradient, so no ratio to the
   plain step is a target. Where GC's input is computed in the step (``clip_sgd``,
   ``gc_adamw_update``), XLA:CPU stores it, and the row is reported without a target.
2. **Train step.** A whole jitted forward + backward + update of the example's ResNet-20 and
   ResNet-18 at batch 128, ``plain`` against ``optax_gc`` for the optimizers in
   ``--train-optimizers`` (default ``gc_sgd_wd``: SGD, momentum 0.9, weight decay 5e-4, against
   ``optax_gc.gc_sgd`` with the same settings). Target <= 1.02x, for every optimizer row.

Both parts also count the **minor page faults per step** of each variant (``getrusage``). On
XLA:CPU a kernel-sized temporary costs one fault per fresh 4 KiB page every call, which is what
GC costs when its input is computed in the same step (``clip_sgd``, ``gc_adamw_update``) rather
than read from an existing buffer.
"""

import argparse
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_gc
from benchmarks import _bench

__all__ = ["param_tree", "optimizer_step_bench", "train_step_bench", "train_step_runner", "main"]

FLOOR_TARGET, TRAIN_TARGET = 1.0, 1.02
"""GC's extra time in a standalone step, in floors (one read pass); a whole train step's ratio."""
COMPUTED_INPUT = frozenset({"clip_sgd", "gc_adamw_update"})
"""Optimizer rows whose GC input is computed in the step: no floor target (see the docstring)."""


def floor_verdict(row: dict[str, Any]) -> str:
  """``met`` / ``MISSED`` against :data:`FLOOR_TARGET`, or why the row has no target."""
  if row["optimizer"] in COMPUTED_INPUT:
    return "n/a (computed input)"
  return "met" if row["optax_gc_extra_over_floor"]["median"] <= FLOOR_TARGET else "MISSED"


def param_tree(model: str, num_classes: int = 100) -> dict[str, Any]:
  """The example model's ``nnx.Param`` tree as a pure dict of float32 arrays (random values)."""
  from examples.cifar import models  # the example's models, imported lazily

  abstract = nnx.eval_shape(lambda: models.create_model(model, num_classes, 0))
  shapes = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  leaves, treedef = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  arrays = [jax.random.normal(k, s.shape, jnp.float32) for k, s in zip(keys, leaves, strict=True)]
  return jax.tree.unflatten(treedef, arrays)


WD = 5e-4  # the paper's coupled weight decay


def _optimizers() -> dict[str, dict[str, Callable[[], optax.GradientTransformation]]]:
  """Per optimizer, the three variants compared: plain, ``optax_gc``, ``optax.centralize()``.

  ``sgd_momentum`` and ``adam`` put the bare transform in front of the optimizer. ``gc_sgd_wd``
  and ``gc_adam_wd`` are the library's aliases with the paper's coupled weight decay (decay,
  then GC, then the optimizer), against the same chain without GC. ``gc_adamw_update`` is
  ``gc_adamw(centralize_update=True)``, GC on AdamW's final update (decoupled decay 5e-4),
  against ``optax.adamw``; its ``optax.centralize`` column puts ``optax.centralize()`` after
  ``optax.adamw``. ``clip_sgd`` puts the transform between ``optax.clip_by_global_norm(1.0)`` and
  SGD-momentum: GC's input is then computed in the step, not read from a buffer.
  """
  sgd = lambda: optax.sgd(0.1, momentum=0.9)  # noqa: E731
  adam = lambda: optax.adam(1e-3)  # noqa: E731
  decay = lambda: optax.add_decayed_weights(WD)  # noqa: E731
  return {
      "sgd_momentum": {
          "plain": sgd,
          "optax_gc": lambda: optax.chain(optax_gc.centralize(), sgd()),
          "optax.centralize": lambda: optax.chain(optax.centralize(), sgd()),
      },
      "adam": {
          "plain": adam,
          "optax_gc": lambda: optax.chain(optax_gc.centralize(), adam()),
          "optax.centralize": lambda: optax.chain(optax.centralize(), adam()),
      },
      "gc_sgd_wd": {
          "plain": lambda: optax.chain(decay(), sgd()),
          "optax_gc": lambda: optax_gc.gc_sgd(0.1, 0.9, weight_decay=WD),
          "optax.centralize": lambda: optax.chain(decay(), optax.centralize(), sgd()),
      },
      "gc_adam_wd": {
          "plain": lambda: optax.chain(decay(), adam()),
          "optax_gc": lambda: optax_gc.gc_adam(1e-3, weight_decay=WD),
          "optax.centralize": lambda: optax.chain(decay(), optax.centralize(), adam()),
      },
      "clip_sgd": {
          "plain": lambda: optax.chain(optax.clip_by_global_norm(1.0), sgd()),
          "optax_gc": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax_gc.centralize(),
                                          sgd()),
          "optax.centralize": lambda: optax.chain(optax.clip_by_global_norm(1.0),
                                                  optax.centralize(), sgd()),
      },
      "gc_adamw_update": {
          "plain": lambda: optax.adamw(1e-3, weight_decay=WD),
          "optax_gc": lambda: optax_gc.gc_adamw(1e-3, weight_decay=WD, centralize_update=True),
          "optax.centralize": lambda: optax.chain(optax.adamw(1e-3, weight_decay=WD),
                                                  optax.centralize()),
      },
  }


def _step_runner(tx: optax.GradientTransformation, params: Any, grads: Any) -> Callable[[], Any]:
  """A no-arg callable running one donated, jitted optimizer step on private copies."""

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(p, s, g):
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  p = jax.tree.map(jnp.copy, params)
  box = [p, tx.init(p)]

  def run():
    box[0], box[1] = step(box[0], box[1], grads)
    return box[0]

  return run


def faults_per_call(run: Callable[[], Any], calls: int = 5) -> float:
  """Minor page faults of this process per call of ``run`` (already warmed up); NaN off Unix."""
  try:
    import resource
  except ImportError:  # Windows
    return float("nan")
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(calls):
    jax.block_until_ready(run())
  return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def _floor_runner(grads: Any) -> Callable[[], Any]:
  read = jax.jit(lambda g: [jnp.sum(x) for x in jax.tree.leaves(g)])
  return lambda: read(grads)


def optimizer_step_bench(
    models: list[str], *, rounds: int, iters: int, num_classes: int = 100,
    optimizers: list[str] | None = None,
) -> list[dict[str, Any]]:
  """Part 1: one row per (model tree, optimizer)."""
  rows = []
  for model in models:
    params = param_tree(model, num_classes)
    grads = jax.tree.map(lambda x: 1e-3 * jnp.roll(x, 1), params)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    for opt_name, variants in _optimizers().items():
      if optimizers is not None and opt_name not in optimizers:
        continue
      runners = {name: _step_runner(make(), params, grads) for name, make in variants.items()}
      runners["floor"] = _floor_runner(grads)
      for f in runners.values():  # compile and warm up
        for _ in range(2):
          jax.block_until_ready(f())
      t = _bench.interleaved(runners, rounds=rounds, iters=iters)
      plain = t["plain"]
      row = {
          "tree": model,
          "n_params": int(n_params),
          "optimizer": opt_name,
          "plain_ms": 1e3 * float(np.median(plain)),
          "floor_ms": 1e3 * float(np.median(t["floor"])),
      }
      for name in ("optax_gc", "optax.centralize"):
        row[f"{name}_ratio"] = _bench.ratio_stats(t[name], plain)
        extra = [a - b for a, b in zip(t[name], plain, strict=True)]
        row[f"{name}_extra_over_floor"] = _bench.ratio_stats(extra, t["floor"])
      row["faults_per_step"] = {name: faults_per_call(f) for name, f in runners.items()}
      row["times_s"] = t
      rows.append(row)
      print(
          f"  {model}/{opt_name}: plain {row['plain_ms']:.2f} ms, "
          f"optax_gc x{row['optax_gc_ratio']['median']:.3f}, page faults/step "
          f"{row['faults_per_step']['plain']:.0f} -> {row['faults_per_step']['optax_gc']:.0f}",
          flush=True,
      )
  return rows


def hlo_passes(tx: optax.GradientTransformation, params: Any, grads: Any) -> dict[str, int]:
  """Counts, in the compiled optimizer step, the kernels launched and the reductions among them.

  Each top-level fusion is one pass over its operands. ``reduces_before_first_update`` counts
  the reductions the schedule runs before the first kernel-sized elementwise update. GC should
  add exactly one reduction per centralized leaf (the per-unit means, a read of the gradient)
  and fold the subtraction into the optimizer's existing elementwise fusion: no other new pass.
  """

  def step(p, s, g):
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  text = jax.jit(step).lower(params, tx.init(params), grads).compile().as_text()
  entry = text[text.index("\nENTRY"):]
  calls = [line for line in entry.splitlines() if " fusion(" in line]
  reduce_bodies = set()
  for block in text.split("\n\n"):
    head = block.strip().split(" ", 1)[0]
    if head.startswith("%") and " reduce(" in block:
      reduce_bodies.add(head)
  is_reduce = [any(f"calls={b}," in c or c.endswith(f"calls={b}") for b in reduce_bodies)
               for c in calls]
  # Kernel-sized elementwise updates: non-reduce fusions with an output of rank >= 2.
  updates = [i for i, (c, r) in enumerate(zip(calls, is_reduce, strict=True))
             if not r and "," in c.split("=", 1)[1].split("]", 1)[0]]
  first_update = updates[0] if updates else len(calls)
  return {"fusions": len(calls), "reduce_fusions": sum(is_reduce),
          "reduces_before_first_update": sum(is_reduce[:first_update])}


def hlo_report(models: list[str]) -> list[dict[str, Any]]:
  """Pass counts of the compiled optimizer step, per tree, optimizer and variant."""
  rows = []
  for model in models:
    params = param_tree(model)
    n_kernels = sum(x.ndim >= 2 for x in jax.tree.leaves(params))
    for opt_name, variants in _optimizers().items():
      for variant, make in variants.items():
        tx = make()
        rows.append({"tree": model, "optimizer": opt_name, "variant": variant,
                     "kernels": n_kernels, **hlo_passes(tx, params, params)})
  _bench.print_table(
      ["tree", "optimizer", "variant", "kernel leaves", "fusions (passes)", "reduce fusions",
       "reduces before the first kernel update"],
      [[r["tree"], r["optimizer"], r["variant"], r["kernels"], r["fusions"], r["reduce_fusions"],
        r["reduces_before_first_update"]]
       for r in rows])
  return rows


def make_train_step(model_name: str, tx: optax.GradientTransformation, num_classes: int, seed=0):
  """A bare jitted NNX train step (functional split/merge form, state donated).

  Returns ``(step, state)`` with ``step(state, images, labels) -> (state, loss)``.
  """
  from examples.cifar import models

  model = models.create_model(model_name, num_classes, seed)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state, images, labels):
    model, optimizer = nnx.merge(graphdef, state)

    def loss_fn(model):
      logits = model(images, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss

  return step, state


def train_step_runner(model_name: str, tx: optax.GradientTransformation, images: jax.Array,
                      labels: jax.Array, num_classes: int = 10) -> tuple[Callable[[], Any], float]:
  """``(run, compile_s)``: ``run()`` takes one train step on the fixed batch, already compiled."""
  step, state = make_train_step(model_name, tx, num_classes)
  box = [state]

  def run():
    box[0], loss = step(box[0], images, labels)
    return loss

  t0 = time.perf_counter()
  jax.block_until_ready(run())
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(run())
  return run, compile_s


def train_step_bench(
    models: list[str], *, batch: int, rounds: int, iters: int,
    optimizers: tuple[str, ...] = ("gc_sgd_wd",),
) -> list[dict[str, Any]]:
  """Part 2: whole train step, ``plain`` vs ``optax_gc`` of each optimizer in ``optimizers``."""
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(batch, 32, 32, 3)).astype(np.float32))
  labels = jnp.asarray(rng.integers(0, 10, size=(batch,)).astype(np.int32))
  variants = _optimizers()
  rows = []
  for model, opt_name in ((m, o) for m in models for o in optimizers):
    txs = {name: variants[opt_name][name] for name in ("plain", "optax_gc")}
    runners = {}
    for name, make in txs.items():
      runners[name], compile_s = train_step_runner(model, make(), images, labels)
    t = _bench.interleaved(runners, rounds=rounds, iters=iters)
    row = {
        "model": model,
        "optimizer": opt_name,
        "batch": batch,
        "plain_ms": 1e3 * float(np.median(t["plain"])),
        "optax_gc_ratio": _bench.ratio_stats(t["optax_gc"], t["plain"]),
        "faults_per_step": {name: faults_per_call(f, 2) for name, f in runners.items()},
        "compile_s_last": compile_s,
        "times_s": t,
    }
    rows.append(row)
    print(
        f"  {model}/{opt_name} train step: plain {row['plain_ms']:.1f} ms, "
        f"optax_gc x{row['optax_gc_ratio']['median']:.3f}, page faults/step "
        f"{row['faults_per_step']['plain']:.0f} -> {row['faults_per_step']['optax_gc']:.0f}",
        flush=True,
    )
  return rows


def _fmt(s: dict[str, float]) -> str:
  return f"{s['median']:.3f} [{s['q1']:.3f}, {s['q3']:.3f}]"


def _faults(r: dict[str, Any]) -> str:
  if "faults_per_step" not in r:  # Runs saved before the column existed.
    return "not counted"
  return f"{r['faults_per_step']['plain']:.0f} -> {r['faults_per_step']['optax_gc']:.0f}"


def report(opt_rows: list[dict[str, Any]], train_rows: list[dict[str, Any]]) -> None:
  """Prints both tables (Markdown); ratios are medians [quartiles] over rounds."""
  print("\nOptimizer step (ratio to plain; extra time / floor):")
  _bench.print_table(
      ["tree", "optimizer", "plain ms", "optax_gc x", "optax.centralize x", "floor ms",
       "optax_gc extra/floor", "optax.centralize extra/floor", f"extra <= {FLOOR_TARGET}x floor",
       "page faults/step plain -> optax_gc"],
      [
          [
              f"{r['tree']} ({r['n_params'] / 1e6:.1f}M)", r["optimizer"], f"{r['plain_ms']:.2f}",
              _fmt(r["optax_gc_ratio"]), _fmt(r["optax.centralize_ratio"]),
              f"{r['floor_ms']:.2f}", _fmt(r["optax_gc_extra_over_floor"]),
              _fmt(r["optax.centralize_extra_over_floor"]),
              floor_verdict(r), _faults(r),
          ]
          for r in opt_rows
      ],
  )
  if train_rows:
    print("\nWhole train step (ratio optax_gc / plain):")
    _bench.print_table(
        ["model", "optimizer", "batch", "plain ms", "optax_gc x", f"target <= {TRAIN_TARGET}",
         "page faults/step plain -> optax_gc"],
        [
            [r["model"], r["optimizer"], r["batch"], f"{r['plain_ms']:.1f}",
             _fmt(r["optax_gc_ratio"]),
             "met" if r["optax_gc_ratio"]["median"] <= TRAIN_TARGET else "MISSED", _faults(r)]
            for r in train_rows
        ],
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--quick", action="store_true", help="fewer rounds (a smoke-level figure)")
  p.add_argument("--json", default=None, help="write the results to this JSON file")
  p.add_argument("--trees", default="resnet18,resnet50", help="models for the optimizer step")
  p.add_argument("--optimizers",
                 default="sgd_momentum,adam,gc_sgd_wd,gc_adam_wd,gc_adamw_update,clip_sgd",
                 help="optimizers for the optimizer step: sgd_momentum, adam (bare transform), "
                      "gc_sgd_wd, gc_adam_wd (the aliases, coupled weight decay 5e-4), "
                      "gc_adamw_update (gc_adamw with centralize_update=True), clip_sgd "
                      "(the transform after clip_by_global_norm, before SGD-momentum)")
  p.add_argument("--train-optimizers", default="gc_sgd_wd",
                 help="optimizers (names as in --optimizers) for the whole train step")
  p.add_argument("--train-models", default="resnet20,resnet18",
                 help="models for the whole train step ('' to skip)")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--hlo", action="store_true",
                 help="only count the compiled optimizer step's passes (no timing)")
  p.add_argument("--rounds", type=int, default=None)
  p.add_argument("--iters", type=int, default=None)
  p.add_argument("--train-rounds", type=int, default=None)
  p.add_argument("--train-iters", type=int, default=None)
  p.add_argument("--from-json", default=None, metavar="PATH",
                 help="only reprint the tables of a saved --json run, against today's targets")
  a = p.parse_args(argv)
  if a.from_json:
    payload = json.loads(Path(a.from_json).read_text())
    report(payload["optimizer_step"], payload.get("train_step", []))
    return payload
  gpu = jax.default_backend() != "cpu"
  rounds = a.rounds or (5 if a.quick else 15)
  iters = a.iters or (10 if gpu else (3 if a.quick else 5))
  train_rounds = a.train_rounds or (4 if a.quick else (15 if gpu else 7))
  train_iters = a.train_iters or (10 if gpu else (1 if a.quick else 2))

  info = _bench.machine()
  print(f"machine: {info}", flush=True)
  if a.hlo:
    rows = hlo_report([m for m in a.trees.split(",") if m])
    payload = {"machine": info, "hlo": rows}
    _bench.write_json(a.json, payload)
    return payload
  t0 = time.perf_counter()
  opt_rows = optimizer_step_bench(
      [m for m in a.trees.split(",") if m], rounds=rounds, iters=iters,
      optimizers=a.optimizers.split(","),
  )
  train_rows = train_step_bench(
      [m for m in a.train_models.split(",") if m], batch=a.batch,
      rounds=train_rounds, iters=train_iters,
      optimizers=tuple(o for o in a.train_optimizers.split(",") if o),
  )
  report(opt_rows, train_rows)
  info["wall_s"] = time.perf_counter() - t0
  print(f"\nwall time {info['wall_s']:.0f} s")
  payload = {
      "machine": info,
      "settings": {"rounds": rounds, "iters": iters, "train_rounds": train_rounds,
                   "train_iters": train_iters, "batch": a.batch, "quick": a.quick},
      "targets": {"extra_over_floor": FLOOR_TARGET, "train_step": TRAIN_TARGET,
                  "no_floor_target": sorted(COMPUTED_INPUT)},
      "optimizer_step": opt_rows,
      "train_step": train_rows,
  }
  _bench.write_json(a.json, payload)
  return payload


if __name__ == "__main__":
  main()
