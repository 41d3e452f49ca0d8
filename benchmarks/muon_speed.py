"""What Muon costs in a train step, against AdamW (a report; there is no target).

Commands (JAX's default backend, so the same line runs on CPU or GPU)::

  python -m benchmarks.muon_speed                      # vit_tiny, batch 128 (CPU: ~3 min)
  python -m benchmarks.muon_speed --quick              # fewer rounds (CPU: ~1.5 min)
  python -m benchmarks.muon_speed --models vit_tiny,resnet20 --json docs/bench/muon_cpu.json

A whole jitted forward + backward + update of the example's model (``overhead.train_step_runner``,
``nnx.Optimizer``, state donated), timed in interleaved rounds, for:

- ``adamw``: ``optax.adamw(1e-3, weight_decay=1e-4)``, the baseline;
- ``muon_inferred``: ``optax.contrib.muon`` with ``optax_gc.muon_dimension_numbers`` of the
  layout read by ``optax_gc.infer_layout`` (Muon on every kernel, attention and conv included);
- ``muon_optax``: ``optax.contrib.muon`` with Optax's default (Muon on the 2-D leaves only);
- ``muon_inferred_gc``: ``muon_inferred`` after ``optax_gc.centralize`` on the same layout.

Reported per variant: the median over rounds of its time per step divided by AdamW's, with
quartiles, and how many leaves (and parameters) Muon orthogonalizes. Muon's cost is Optax's
Newton-Schulz iteration: five quintic steps, each three matrix products per matrix.
"""

import argparse
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_gc
from benchmarks import _bench
from benchmarks.overhead import train_step_runner

__all__ = ["layout_of", "main", "muon_step_bench"]

VARIANTS = ("adamw", "muon_inferred", "muon_optax", "muon_inferred_gc")


def layout_of(model_name: str, num_classes: int = 10) -> tuple[Any, Any]:
  """``(layout, params)`` of the example's model: ``infer_layout`` on its pure Param state."""
  from examples.cifar import models

  model = nnx.eval_shape(lambda: models.create_model(model_name, num_classes, 0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  pure = nnx.as_pure(params)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  layout = optax_gc.infer_layout(
      lambda p, x: nnx.merge(graphdef, p, rest)(x, train=True), pure, x)
  return layout, pure


def _optimizers(model_name: str) -> tuple[dict[str, optax.GradientTransformation], dict]:
  layout, params = layout_of(model_name)
  dims = optax_gc.muon_dimension_numbers(layout, params)
  muon = lambda **kw: optax.contrib.muon(0.02, adam_learning_rate=1e-3, **kw)  # noqa: E731
  txs = {
      "adamw": optax.adamw(1e-3, weight_decay=1e-4),
      "muon_inferred": muon(muon_weight_dimension_numbers=dims),
      "muon_optax": muon(),
      "muon_inferred_gc": optax.chain(optax_gc.centralize(layout),
                                      muon(muon_weight_dimension_numbers=dims)),
  }
  is_dims = lambda x: x is None or isinstance(x, optax.contrib.MuonDimensionNumbers)  # noqa: E731
  chosen = [np.size(p) for d, p in zip(jax.tree.leaves(dims, is_leaf=is_dims),
                                       jax.tree.leaves(params), strict=True) if d is not None]
  two_d = [np.size(p) for p in jax.tree.leaves(params) if np.ndim(p) == 2]
  total = sum(np.size(p) for p in jax.tree.leaves(params))
  counts = {"muon_inferred": (len(chosen), sum(chosen)), "muon_optax": (len(two_d), sum(two_d)),
            "all": (len(jax.tree.leaves(params)), total)}
  return txs, counts


def muon_step_bench(models: list[str], *, batch: int, rounds: int, iters: int
                    ) -> list[dict[str, Any]]:
  """Each variant's train step against AdamW's, in interleaved rounds."""
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(batch, 32, 32, 3)).astype(np.float32))
  labels = jnp.asarray(rng.integers(0, 10, size=(batch,)).astype(np.int32))
  rows = []
  for model in models:
    txs, counts = _optimizers(model)
    runners, compile_s = {}, {}
    for name, tx in txs.items():
      runners[name], compile_s[name] = train_step_runner(model, tx, images, labels)
    t = _bench.interleaved(runners, rounds=rounds, iters=iters)
    row = {"model": model, "batch": batch, "adamw_ms": 1e3 * float(np.median(t["adamw"])),
           "ratio_to_adamw": {n: _bench.ratio_stats(t[n], t["adamw"]) for n in VARIANTS[1:]},
           "muon_leaves": counts, "compile_s": compile_s, "times_s": t}
    rows.append(row)
    print(f"  {model}: adamw {row['adamw_ms']:.1f} ms/step; " + ", ".join(
        f"{n} x{row['ratio_to_adamw'][n]['median']:.2f}" for n in VARIANTS[1:]), flush=True)
  return rows


def report(rows: list[dict[str, Any]]) -> None:
  table = []
  for r in rows:
    n_all, p_all = r["muon_leaves"]["all"]
    for n in VARIANTS[1:]:
      s = r["ratio_to_adamw"][n]
      leaves, size = r["muon_leaves"]["muon_optax" if n == "muon_optax" else "muon_inferred"]
      table.append([r["model"], r["batch"], n, f"{r['adamw_ms']:.1f}",
                    f"{s['median']:.2f} [{s['q1']:.2f}, {s['q3']:.2f}]",
                    f"{leaves}/{n_all} ({100 * size / p_all:.0f}% of weights)"])
  _bench.print_table(["model", "batch", "variant", "AdamW ms/step",
                      "time / AdamW: median [quartiles]", "leaves on Muon"], table)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--models", default="vit_tiny", help="the example's models, comma-separated")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--quick", action="store_true", help="fewer rounds (a smoke-level figure)")
  p.add_argument("--rounds", type=int, default=None)
  p.add_argument("--iters", type=int, default=None)
  p.add_argument("--json", default=None, help="write the results to this JSON file")
  a = p.parse_args(argv)
  gpu = jax.default_backend() != "cpu"
  rounds = a.rounds or (4 if a.quick else (15 if gpu else 7))
  iters = a.iters or (10 if gpu else (1 if a.quick else 2))
  info = _bench.machine()
  print(f"machine: {info}", flush=True)
  t0 = time.perf_counter()
  rows = muon_step_bench([m for m in a.models.split(",") if m], batch=a.batch, rounds=rounds,
                         iters=iters)
  report(rows)
  info["wall_s"] = time.perf_counter() - t0
  payload = {"machine": info, "settings": {"rounds": rounds, "iters": iters, "batch": a.batch},
             "train_step": rows}
  _bench.write_json(a.json, payload)
  return payload


if __name__ == "__main__":
  main()
