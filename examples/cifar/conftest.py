"""Shared test setup for the CIFAR example: faster compiles and the location of shared data."""

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_CIFAR10 = REPO_ROOT.parent / "shared" / "data" / "cifar10"
"""``shared/data/cifar10`` beside the repository (train.npz/test.npz), absent on most machines."""


@pytest.fixture(autouse=True, scope="module")
def _fast_compiles(fast_compiles: None) -> None:
  """Every test module of the example compiles with XLA's optimizations off (conftest.py, root)."""


@pytest.fixture
def shared_cifar10() -> Path:
  """The shared CIFAR-10 npz folder, or a clean skip when it is not there."""
  if not ((SHARED_CIFAR10 / "train.npz").is_file() and (SHARED_CIFAR10 / "test.npz").is_file()):
    pytest.skip(f"shared CIFAR-10 not found at {SHARED_CIFAR10}")
  return SHARED_CIFAR10
