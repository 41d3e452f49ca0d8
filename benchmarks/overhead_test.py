"""Smoke test of benchmarks/overhead.py on the example's tiny model (seconds, not a measurement)."""

import json

from benchmarks import overhead


def test_overhead_quick_tiny(tmp_path, fast_compile):
  out = tmp_path / "overhead.json"
  payload = overhead.main([
      "--quick", "--trees", "tiny", "--optimizers", "adam", "--train-models", "tiny",
      "--batch", "8",
      "--rounds", "2", "--iters", "1", "--train-rounds", "2", "--train-iters", "1",
      "--json", str(out),
  ])
  saved = json.loads(out.read_text())
  assert saved["machine"]["backend"] == payload["machine"]["backend"]
  assert [r["optimizer"] for r in saved["optimizer_step"]] == ["adam"]
  for row in saved["optimizer_step"]:
    assert row["plain_ms"] > 0 and row["floor_ms"] > 0
    assert row["optax_gc_ratio"]["median"] > 0 and row["optax.centralize_ratio"]["median"] > 0
  assert saved["train_step"][0]["model"] == "tiny"
  assert saved["train_step"][0]["optax_gc_ratio"]["n_rounds"] == 2


def test_gc_adds_one_reduction_per_kernel_and_no_other_pass():
  # The compiled step of optax_gc + SGD-momentum: one extra reduce fusion per kernel leaf (the
  # means), the subtraction fused into the momentum update, no other new kernel.
  import jax
  import optax

  import optax_gc

  params = overhead.param_tree("tiny", 10)
  kernels = sum(x.ndim >= 2 for x in jax.tree.leaves(params))
  plain = overhead.hlo_passes(optax.sgd(0.1, momentum=0.9), params, params)
  gc = overhead.hlo_passes(
      optax.chain(optax_gc.centralize(), optax.sgd(0.1, momentum=0.9)), params, params)
  assert plain["reduce_fusions"] == 0
  assert gc["reduce_fusions"] == kernels
  assert gc["fusions"] == plain["fusions"] + kernels
