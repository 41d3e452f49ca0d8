"""Smoke test of benchmarks/overhead.py on the example's tiny model (seconds, not a measurement)."""

import json

from benchmarks import overhead


def test_overhead_quick_tiny(tmp_path, fast_compiles):
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
  assert saved["train_step"][0]["optimizer"] == "gc_sgd_wd"
  assert saved["train_step"][0]["optax_gc_ratio"]["n_rounds"] == 2
  assert set(saved["optimizer_step"][0]["faults_per_step"]) == {
      "plain", "optax_gc", "optax.centralize", "floor"}
  assert saved["targets"]["extra_over_floor"] == 1.0 and saved["targets"]["train_step"] == 1.02
  assert overhead.main(["--from-json", str(out)]) == saved  # Reprints a saved run, runs nothing.


def test_floor_target_applies_where_gc_reads_a_stored_buffer():
  def row(optimizer, extra):
    return {"optimizer": optimizer, "optax_gc_extra_over_floor": {"median": extra}}

  assert overhead.floor_verdict(row("sgd_momentum", 1.0)) == "met"
  assert overhead.floor_verdict(row("gc_adam_wd", 1.01)) == "MISSED"
  assert overhead.floor_verdict(row("clip_sgd", 7.0)) == "n/a (computed input)"
  assert overhead.floor_verdict(row("gc_adamw_update", 0.1)) == "n/a (computed input)"


def test_page_fault_counter_sees_fresh_buffers():
  # The counter the benchmark uses: a jitted function that returns a fresh 64 MiB array (above
  # glibc's largest mmap threshold, so never recycled from the heap) touches about one new
  # 4 KiB page per 4 KiB every call; one that only reads its input does not.
  import jax
  import jax.numpy as jnp

  x = jnp.ones((4096, 4096))
  read, fresh = jax.jit(lambda x: x.sum(0)), jax.jit(lambda x: x * 2.0)
  for f in (read, fresh):
    jax.block_until_ready(f(x))
  # (Other threads of the process fault too, so compare the two rather than test for zero.)
  faults_read = overhead.faults_per_call(lambda: read(x))
  faults_fresh = overhead.faults_per_call(lambda: fresh(x))
  assert faults_fresh > faults_read + 4096, (faults_read, faults_fresh)


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


def test_gc_sgd_with_weight_decay_adds_only_reductions():
  # gc_sgd/gc_adam add the decay as lam * Phi(p) after GC, so g + wd*p is never stored (it
  # had two consumers, the means and the update, and XLA wrote it out for most kernels).
  import optax

  import optax_gc

  params = overhead.param_tree("resnet20", 10)  # tiny kernels get fused anyway
  plain = overhead.hlo_passes(
      optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9)), params, params)
  gc = overhead.hlo_passes(optax_gc.gc_sgd(0.1, 0.9, weight_decay=5e-4), params, params)
  # Every kernel GC adds should be a reduction (the means); a couple of tiny extra kernels are
  # tolerated, a kernel-sized temporary per leaf (14 of the 20 kernels today) is not.
  assert gc["fusions"] - plain["fusions"] - gc["reduce_fusions"] <= 2
