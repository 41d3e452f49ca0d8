"""optax_gc.nnx_output_axes where Flax is missing (its results are tested in real_layers_test)."""

import sys

import jax.numpy as jnp
import pytest

import optax_gc


def test_without_flax_the_error_says_what_to_install(monkeypatch):
  # None in sys.modules makes `import flax` raise ModuleNotFoundError, as if not installed.
  for name in [m for m in sys.modules if m == "flax" or m.startswith("flax.")]:
    monkeypatch.delitem(sys.modules, name)
  monkeypatch.setitem(sys.modules, "flax", None)
  with pytest.raises(ModuleNotFoundError, match=r"nnx_output_axes needs Flax.*`pip install flax`"):
    optax_gc.nnx_output_axes(object(), jnp.ones((2, 3)))
