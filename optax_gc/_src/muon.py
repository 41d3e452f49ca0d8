"""Muon's weight dimension numbers, from each parameter's layout read from the model.

``optax.contrib.muon`` orthogonalizes each weight as a matrix (fan-in, output units), every
other axis a batch of separate matrices, and sends the leaves without dimension numbers to
Adam. :func:`muon_dimension_numbers` writes that tree from :func:`optax_gc.infer_layout`.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_gc._src.centralize import _describe, _is_passthrough_node, _per_leaf
from optax_gc._src.infer import Layout

__all__ = ["muon_dimension_numbers"]


def _is_layout_leaf(x: Any) -> bool:
  return x is None or isinstance(x, Layout)


def _axes(axes: Any, ndim: int, what: str, where: str) -> tuple[int, ...]:
  if not isinstance(axes, tuple) or not all(
      isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in axes):
    raise ValueError(f"optax_gc.muon_dimension_numbers: the layout's {what} must be a tuple "
                     f"of ints, got {axes!r} for {where}.")
  if not all(-ndim <= a < ndim for a in axes):
    raise ValueError(f"optax_gc.muon_dimension_numbers: the layout's {what} {axes!r} is out "
                     f"of range for {where} (rank {ndim}).")
  return tuple(sorted(int(a) % ndim for a in axes))


def _dimension_numbers(path: Any, leaf: Any, layout: Layout | None, exclude_head: bool) -> Any:
  """One leaf's ``MuonDimensionNumbers``, or ``None`` for Adam."""
  if layout is None or _is_passthrough_node(leaf):
    return None
  shape = tuple(getattr(leaf, "shape", np.shape(leaf)))
  dtype = leaf.dtype if hasattr(leaf, "dtype") else np.result_type(leaf)
  where = _describe(path, leaf)
  groups = {name: _axes(getattr(layout, name), len(shape), name, where)
            for name in ("fan_in", "output", "stack")}
  named = [a for axes in groups.values() for a in axes]
  if len(set(named)) != len(named):
    raise ValueError(f"optax_gc.muon_dimension_numbers: {layout} names an axis twice for "
                     f"{where}.")
  unnamed = [a for a in range(len(shape)) if a not in named and shape[a] != 1]
  if unnamed:
    # Muon would treat such an axis as a batch of separate matrices, silently.
    raise ValueError(f"optax_gc.muon_dimension_numbers: {layout} leaves axes {tuple(unnamed)} "
                     f"of {where} in neither fan_in, output nor stack.")
  if not jnp.issubdtype(dtype, jnp.inexact) or (exclude_head and layout.head):
    return None
  if min(math.prod(shape[a] for a in groups[k]) for k in ("fan_in", "output")) <= 1:
    return None  # a vector per unit (a depthwise filter) or a single unit: no matrix
  return optax.contrib.MuonDimensionNumbers(reduction_axis=groups["fan_in"],
                                            output_axis=groups["output"])


def muon_dimension_numbers(layout: Any, params: Any, *, exclude_head: bool = True) -> Any:
  r"""The ``muon_weight_dimension_numbers`` of ``optax.contrib.muon``, from each leaf's layout.

  Muon orthogonalizes each weight's update as a matrix, fan-in by output units. For each leaf
  whose :class:`optax_gc.Layout` is given, this returns

  .. math::

    \texttt{MuonDimensionNumbers(reduction\_axis=layout.fan\_in,
    output\_axis=layout.output)},

  so that Muon treats every other axis, the layout's ``stack`` (scanned or vmapped layers,
  mixture-of-experts kernels), as a batch of separate matrices. It returns ``None``, which
  sends the leaf to Muon's Adam, for:

  * leaves with no fan-in (layout ``None``: biases, norm scales, and embedding tables used
    only by a lookup, which :func:`optax_gc.infer_layout` leaves without a layout by default);
  * leaves whose fan-in or output has a single element, such as a depthwise conv's
    per-channel filter (no matrix to orthogonalize);
  * with ``exclude_head=True`` (the default, as in the usual Muon recipes), the classifier or
    logits head: the leaves whose layout has ``head=True``, which
    :func:`optax_gc.infer_layout` sets where a contraction's result reaches the model's output
    with no further contraction by a parameter;
  * integer and boolean leaves, ``None`` and ``optax.MaskedNode``.

  Args:
    layout: a pytree of :class:`optax_gc.Layout` or ``None``, a prefix of ``params`` (one entry
      may cover an ``nnx.Variable``), as :func:`optax_gc.infer_layout` returns; or a callable
      ``params -> such a pytree``.
    params: the parameters as the optimizer sees them (arrays or ``jax.ShapeDtypeStruct``\ s:
      only shapes and dtypes are read). For ``nnx.Optimizer`` that is the pure state,
      ``nnx.as_pure(nnx.state(model, nnx.Param))``; for Equinox, the module filtered to its
      arrays.
    exclude_head: send the leaves whose layout has ``head=True`` to Adam.

  Returns:
    A pytree with the structure of ``params`` whose leaves are
    ``optax.contrib.MuonDimensionNumbers`` or ``None``, for
    ``optax.contrib.muon(..., muon_weight_dimension_numbers=...)``. Where that tree is itself
    callable (an Equinox module, which Optax would call), it comes wrapped as a function
    ``params -> tree``, which Optax accepts alike. A layout whose axes are out of range,
    overlap, or leave an axis of size above one unnamed raises ``ValueError`` naming the leaf's
    path and shape; an Optax without ``MuonDimensionNumbers`` raises ``ImportError``.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_gc
    >>> params = {'qkv': jnp.ones((16, 4, 8)),     # (in, heads, head_dim)
    ...           'layers': jnp.ones((3, 16, 16)),  # scanned (layers, in, out)
    ...           'bias': jnp.zeros(16)}
    >>> layout = {'qkv': optax_gc.Layout(fan_in=(0,), output=(1, 2)),
    ...           'layers': optax_gc.Layout(fan_in=(1,), output=(2,), stack=(0,)),
    ...           'bias': None}
    >>> dims = optax_gc.muon_dimension_numbers(layout, params)
    >>> dims['qkv']
    MuonDimensionNumbers(reduction_axis=(0,), output_axis=(1, 2))
    >>> dims['layers']  # axis 0: three separate matrices
    MuonDimensionNumbers(reduction_axis=(1,), output_axis=(2,))
    >>> print(dims['bias'])  # to Adam
    None
    >>> tx = optax.contrib.muon(0.02, muon_weight_dimension_numbers=dims)

  References:
    Jordan, `Muon: An optimizer for hidden layers in neural networks
    <https://kellerjordan.github.io/posts/muon/>`_, 2024.

    Liu et al., `Muon is Scalable for LLM Training <https://arxiv.org/abs/2502.16982>`_, 2025.
  """
  if not hasattr(optax.contrib, "MuonDimensionNumbers"):
    raise ImportError(
        f"optax_gc.muon_dimension_numbers needs optax.contrib.MuonDimensionNumbers, which the "
        f"installed optax {optax.__version__} lacks: upgrade optax.")
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=_is_passthrough_node)
  layouts = _per_leaf(layout, params, params, paths_leaves, "layout", _is_layout_leaf)
  tree = jax.tree_util.tree_unflatten(treedef, [
      _dimension_numbers(path, leaf, lay, exclude_head)
      for (path, leaf), lay in zip(paths_leaves, layouts, strict=True)])
  return (lambda _: tree) if callable(tree) else tree
