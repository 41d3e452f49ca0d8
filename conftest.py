"""Test setup shared by tests/, examples/ and benchmarks/."""

import socket
from collections.abc import Iterator

import jax
import pytest


@pytest.fixture(scope="module")
def fast_compiles() -> Iterator[None]:
  """Turns most XLA optimizations off for a test module: tiny models compile much faster."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture
def gloo_can_listen() -> None:
  """Skips a test of several local JAX processes where their CPU collectives cannot connect.

  Gloo, JAX's CPU collectives, listens on the address of this machine's hostname.
  """
  try:
    socket.gethostbyname(socket.gethostname())
  except OSError:
    pytest.skip("this machine's hostname does not resolve, so gloo (JAX's CPU collectives) "
                "cannot listen: the processes could not connect")
