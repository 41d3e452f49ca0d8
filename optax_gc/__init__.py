"""optax_gc: layout-aware Gradient Centralization for Optax.

>>> import optax, optax_gc
>>> tx = optax.chain(optax_gc.centralize(), optax.adam(1e-3))
"""

from optax_gc._src.agc import adaptive_grad_clip
from optax_gc._src.alias import gc_adam, gc_adamw, gc_sgd
from optax_gc._src.centralize import centralize, gc_removed_fraction
from optax_gc._src.flax_nnx import nnx_layout, nnx_output_axes
from optax_gc._src.infer import Layout, infer_layout, infer_output_axes
from optax_gc._src.muon import muon_dimension_numbers

__version__ = "0.1.0"

__all__ = [
    "Layout",
    "adaptive_grad_clip",
    "centralize",
    "gc_adam",
    "gc_adamw",
    "gc_removed_fraction",
    "gc_sgd",
    "infer_layout",
    "infer_output_axes",
    "muon_dimension_numbers",
    "nnx_layout",
    "nnx_output_axes",
]
