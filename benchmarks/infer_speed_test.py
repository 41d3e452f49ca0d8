"""Smoke test of benchmarks/infer_speed.py: the GPT-2-small-shaped model is traced, not built."""

from benchmarks import infer_speed


def test_gpt2_small_row():
  row = infer_speed.time_inference("gpt2_small", repeats=1)
  assert row["parameters"] == 124_439_808  # GPT-2 small (tied embedding) plus wpe
  # 12 blocks x (query, key, value, out, fc, proj) kernels; the tied table is overridden.
  assert (row["leaves"], row["centralized_leaves"]) == (196, 72)
  assert 0 < row["median_s"] <= row["max_s"]


def test_gpt2_small_layout_row():
  row = infer_speed.time_inference("gpt2_small", repeats=1, what="layout")
  assert row["inference"] == "layout"
  assert (row["leaves"], row["centralized_leaves"]) == (196, 72)
