"""Smoke test of benchmarks/muon_speed.py on the example's tiny ViT (seconds, not a measurement)."""

import json

import optax
import pytest

from benchmarks import muon_speed

if not hasattr(optax.contrib, "MuonDimensionNumbers"):
  pytest.skip(f"optax {optax.__version__} has no optax.contrib.MuonDimensionNumbers",
              allow_module_level=True)


def test_muon_speed_tiny(tmp_path, fast_compiles):
  out = tmp_path / "muon.json"
  muon_speed.main(["--models", "vit_test", "--batch", "4", "--rounds", "2", "--iters", "1",
                   "--json", str(out)])
  (row,) = json.loads(out.read_text())["train_step"]
  assert row["model"] == "vit_test" and row["adamw_ms"] > 0
  assert set(row["ratio_to_adamw"]) == set(muon_speed.VARIANTS[1:])
  assert all(r["median"] > 0 for r in row["ratio_to_adamw"].values())
  # The inferred dimension numbers put more of the weights on Muon than Optax's 2-D rule.
  assert row["muon_leaves"]["muon_inferred"][1] > row["muon_leaves"]["muon_optax"][1]
