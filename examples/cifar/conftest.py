"""Shared test setup for the CIFAR example: faster compiles and the location of shared data."""

from collections.abc import Iterator
from pathlib import Path

import jax
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_CIFAR10 = REPO_ROOT.parent / "shared" / "data" / "cifar10"
"""``shared/data/cifar10`` beside the repository (train.npz/test.npz), absent on most machines."""


@pytest.fixture(autouse=True, scope="module")
def _fast_compiles() -> Iterator[None]:
  """Tiny models compile faster with XLA's optimizations off; restored after each test module."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture
def shared_cifar10() -> Path:
  """The shared CIFAR-10 npz folder, or a clean skip when it is not there."""
  if not ((SHARED_CIFAR10 / "train.npz").is_file() and (SHARED_CIFAR10 / "test.npz").is_file()):
    pytest.skip(f"shared CIFAR-10 not found at {SHARED_CIFAR10}")
  return SHARED_CIFAR10
