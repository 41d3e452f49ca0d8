"""Smoke test of benchmarks/throughput.py on the example's tiny model and random images."""

import json

from benchmarks import throughput


def test_throughput_tiny_synthetic(tmp_path, fast_compiles):
  out = tmp_path / "throughput.json"
  payload = throughput.main([
      "--quick", "--models", "tiny", "--batch", "16", "--steps", "2", "--rounds", "2",
      "--data-dir", "none", "--json", str(out),
  ])
  saved = json.loads(out.read_text())
  (row,) = saved["rows"]
  assert row["data"].startswith("synthetic")
  assert row["loop_images_per_s"] > 0 and row["bare_images_per_s"] > 0
  assert row["loop_over_bare"]["n_rounds"] == 2
  assert 0 < row["loop_host_ms_per_step"] < 1e4 and 0 < row["bare_host_ms_per_step"] < 1e4
  assert saved["machine"]["backend"] == payload["machine"]["backend"]
