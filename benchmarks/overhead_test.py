"""Smoke test of benchmarks/overhead.py on the example's tiny model (seconds, not a measurement)."""

import json

from benchmarks import overhead


def test_overhead_quick_tiny(tmp_path, fast_compile):
  out = tmp_path / "overhead.json"
  payload = overhead.main([
      "--quick", "--trees", "tiny", "--optimizers", "adam", "--train-models", "tiny", "--batch", "8",
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
