"""Shared pytest fixtures for the benchmark smoke tests."""

import jax
import pytest


@pytest.fixture
def fast_compile():
  """Turns most XLA optimizations off for the test (compiles much faster; numbers meaningless)."""
  old = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)
