"""Smoke test of benchmarks/study.py: two tiny runs on the offline digits set, resume, report."""

import json
import math

from benchmarks import study


def test_study_runs_resumes_and_reports(tmp_path, fast_compile):
  args = ["--dataset", "digits", "--model", "tiny", "--epochs", "1", "--train-subset", "200",
          "--arms", "sgd,sgd_gc", "--seeds", "0", "--out-dir", str(tmp_path),
          "--workdir", str(tmp_path / "wd")]
  study.main(args)
  files = sorted(p.name for p in (tmp_path / "study").glob("*.json"))
  assert files == ["sgd__seed0.json", "sgd_gc__seed0.json"]
  rec = json.loads((tmp_path / "study" / "sgd_gc__seed0.json").read_text())
  assert rec["config"]["gc"] == "gc" and rec["config"]["seed"] == 0
  assert len(rec["epochs"]) == 1 and 0 <= rec["epochs"][0]["test_accuracy"] <= 1

  # A second invocation finds both runs done and trains nothing.
  mtime = (tmp_path / "study" / "sgd__seed0.json").stat().st_mtime_ns
  assert study.run_study(["sgd", "sgd_gc"], [0], dict(study.PROTOCOL), None, tmp_path,
                         tmp_path / "wd") == []
  assert (tmp_path / "study" / "sgd__seed0.json").stat().st_mtime_ns == mtime

  # Fake a second seed (shifted accuracies) to exercise the paired statistics and the report.
  for arm, shift in (("sgd", 0.0), ("sgd_gc", 0.02)):
    r = json.loads((tmp_path / "study" / f"{arm}__seed0.json").read_text())
    r["seed"] = 1
    r["epochs"][0]["test_accuracy"] += shift
    (tmp_path / "study" / f"{arm}__seed1.json").write_text(json.dumps(r))
  study.main(["--report-only", "--out-dir", str(tmp_path)])
  text = (tmp_path / "results.md").read_text()
  assert "JPEG-decoded copy" in text and "SGD-M + GC vs SGD-M" in text
  assert (tmp_path / "study_curves.png").stat().st_size > 0
  (pair,) = study.summarize(study.load_runs(tmp_path))["pairs"]
  assert pair["seeds"] == [0, 1] and len(pair["final"]["per_seed"]) == 2


def test_t_interval_matches_hand_computation():
  # xs = 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.302653; half-width 4.302653 / sqrt(3).
  mean, lo, hi = study.t_interval([1.0, 2.0, 3.0])
  assert mean == 2.0
  assert math.isclose(hi - mean, 4.302653 / math.sqrt(3), rel_tol=1e-5)
  assert math.isclose(mean - lo, hi - mean)
  assert math.isnan(study.t_interval([1.0])[1])


def test_planned_runs_are_seed_major():
  assert study.planned_runs(["a", "b"], [0, 1]) == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
