"""Runs the docstring examples of every public module."""

import doctest

import optax
import pytest

import optax_gc
from optax_gc._src import agc, alias, centralize, compat, flax_nnx, infer, muon

_MODULES = [optax_gc, centralize, alias, infer, flax_nnx, compat, agc, muon]


@pytest.mark.parametrize("module", _MODULES, ids=lambda m: m.__name__)
def test_docstring_examples(module):
  if module is flax_nnx:
    pytest.importorskip("flax", reason="flax_nnx's examples need Flax")
  if module is muon and not hasattr(optax.contrib, "MuonDimensionNumbers"):
    pytest.skip(f"muon's examples need optax.contrib.MuonDimensionNumbers (optax "
                f"{optax.__version__} lacks it)")
  result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0, f"{module.__name__} has no examples"
  assert result.failed == 0


def test_public_api():
  assert sorted(optax_gc.__all__) == [
      "Layout", "adaptive_grad_clip", "centralize", "gc_adam", "gc_adamw",
      "gc_removed_fraction", "gc_sgd", "infer_layout", "infer_output_axes",
      "muon_dimension_numbers", "nnx_layout", "nnx_output_axes",
  ]
  for name in optax_gc.__all__:
    obj = getattr(optax_gc, name)
    sections = ("Attributes:",) if isinstance(obj, type) else ("Args:", "Returns:")
    for section in (*sections, "Examples:", "References:"):
      assert section in obj.__doc__, (name, section)
  assert optax_gc.__version__
