"""Tests of benchmarks/study.py: two tiny runs on digits, resume, report; the statistics; the
committed run files."""

import json
import math

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import optax_gc
from benchmarks import study
from examples.cifar import models

RESNET20 = study.STUDIES["resnet20"]


def test_study_runs_resumes_and_reports(tmp_path, fast_compiles):
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
  assert study.run_study(RESNET20, ["sgd", "sgd_gc"], [0], dict(RESNET20.protocol), None,
                         tmp_path, tmp_path / "wd") == []
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
  assert "| `head/kernel` | " in text  # The first-step GC shares of the GC arm.
  shares, seeds = study.first_step_shares(RESNET20, study.load_runs(tmp_path, RESNET20))["sgd_gc"]
  assert seeds == [0, 1] and set(shares) == {"stem_conv/kernel", "stages/conv1/kernel",
                                               "stages/conv2/kernel", "head/kernel"}
  assert all(0 < v < 1 for v in shares.values())
  assert (tmp_path / "study_curves.png").stat().st_size > 0
  (pair,) = study.summarize(RESNET20, study.load_runs(tmp_path, RESNET20))["pairs"]
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


def test_run_files_name_no_machine_path(tmp_path):
  record = {"config": {"data_dir": "/m/shared/data/cifar10"},
            "summary": {"source": "/m/shared/data/cifar10/*.npz", "workdir": "/m/repo/wd/x",
                        "config": {"data_dir": "/m/shared/data/cifar10/"}},
            "epochs": [{"test_accuracy": 0.5}]}
  got = study.make_portable(record, {"/m/shared/data/cifar10": "../shared/data/cifar10"})
  assert got == {"config": {"data_dir": "../shared/data/cifar10"},
                 "summary": {"source": "../shared/data/cifar10/*.npz",
                             "config": {"data_dir": "../shared/data/cifar10/"}},
                 "epochs": [{"test_accuracy": 0.5}]}


@pytest.mark.parametrize("name", sorted(study.STUDIES))
def test_committed_run_files_hold_no_absolute_path(name):
  def strings(x):
    if isinstance(x, dict):
      for v in x.values():
        yield from strings(v)
    elif isinstance(x, list):
      for v in x:
        yield from strings(v)
    elif isinstance(x, str):
      yield x

  files = sorted((study.ROOT / "docs" / study.STUDIES[name].runs_dir).glob("*.json"))
  for path in files:
    record = json.loads(path.read_text())
    bad = [x for x in strings(record) if x.startswith(("/", "~")) or ":\\" in x]
    assert not bad, (path.name, bad)
    assert record["config"]["data_dir"] in (None, "../shared/data/cifar10"), path.name


def test_optax_centralize_equals_optax_gc_axis0_on_resnet20():
  """So the study runs one wrong-axes arm: on ResNet-20 no leaf is a pass-through that differs."""
  abstract = nnx.eval_shape(lambda: models.create_model("resnet20", 10, 0))
  params = nnx.state(abstract, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  grads = jax.tree.unflatten(
      treedef, [jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves, strict=True)])
  ours = optax_gc.centralize(0)
  theirs = optax.centralize()
  got, _ = ours.update(grads, ours.init(grads))
  want, _ = theirs.update(grads, theirs.init(grads))
  for g, w, x in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(grads),
                     strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    assert (x.ndim > 1) == (not np.allclose(g, x))  # Every kernel is centralized by both.


def test_readme_headline_table_comes_from_the_committed_run_files():
  readme = (study.ROOT / "README.md").read_text()
  table = study.headline(study.ROOT / "docs")
  assert table in readme, "rerun: python -m benchmarks.study --headline, and paste into README"
