"""Adaptive gradient clipping (AGC) over each output unit's true fan-in.

The units are those of :func:`optax_gc.centralize`, from the same ``output_axis`` spec, so the
axes read from the model by :func:`optax_gc.infer_output_axes` (or the layout from
:func:`optax_gc.infer_layout`) serve both.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_gc._src.centralize import (
    OutputAxis,
    _apply_leaf,
    _is_passthrough_node,
    _map_leaves,
    leaf_specs,
)

__all__ = ["adaptive_grad_clip"]

# Optax's unitwise_clip: a floor on the gradient norm that only prevents a division by zero.
_DIV_EPS = 1e-6


def _sq_norm(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return jnp.sum((x.conj() * x).real, axis=axes, keepdims=True)


def _clip(g: jax.Array, axes: tuple[int, ...], *, p: Any, clipping: Any, eps: Any) -> jax.Array:
  """``g`` with each unit (each index along the axes not in ``axes``) clipped as in Optax."""
  g_norm = jnp.sqrt(_sq_norm(g, axes))
  max_norm = clipping * jnp.maximum(jnp.sqrt(_sq_norm(jnp.asarray(p), axes)), eps)
  acc = g_norm.dtype
  clipped = g.astype(acc) * (max_norm / jnp.maximum(g_norm, _DIV_EPS))
  return jnp.where(g_norm < max_norm, g, clipped.astype(g.dtype))


def _clip_whole(g: Any, *, p: Any, clipping: Any, eps: Any) -> Any:
  """A leaf with no units of its own (a bias, a scale, ``None`` spec) is one unit."""
  if _is_passthrough_node(g) or jnp.size(g) == 0:
    return g
  if not jnp.issubdtype(jnp.result_type(g), jnp.inexact):
    return g
  g = jnp.asarray(g)
  return _clip(g, tuple(range(g.ndim)), p=p, clipping=clipping, eps=eps)


def adaptive_grad_clip(
    clipping: jax.typing.ArrayLike,
    output_axis: OutputAxis = -1,
    *,
    eps: jax.typing.ArrayLike = 1e-3,
) -> optax.GradientTransformation:
  r"""Clips each output unit's gradient to ``clipping`` times its weights' norm (AGC).

  For every output unit :math:`i` of a leaf, with :math:`W_i` its weights and :math:`G_i` its
  gradient over the fan-in (every axis except the output axes :math:`O`),

  .. math::

    G_i \leftarrow \begin{cases}
      G_i & \text{if } \lVert G_i \rVert < \lambda \max(\lVert W_i \rVert, \epsilon) \\
      \lambda \max(\lVert W_i \rVert, \epsilon) \, G_i / \lVert G_i \rVert & \text{otherwise,}
    \end{cases}

  with :math:`\lambda` = ``clipping``: Brock et al.'s unit-wise clipping, computed exactly as
  ``optax.adaptive_grad_clip`` computes it (the same ``eps`` floor on the weights' norm, the
  same ``1e-6`` floor on the gradient's), with the units given by ``output_axis`` instead of a
  rule on the rank. The two agree where that rule is right (Dense ``(in, out)``, Conv
  ``(kh, kw, in, out)``); on an attention output kernel ``(heads, head_dim, out)`` or a
  scanned stack ``(layers, in, out)`` Optax takes a norm over axis 0 only.

  The units are those that :func:`optax_gc.centralize` centralizes, for the same
  ``output_axis``. Every other floating leaf is one unit, clipped by its whole norm, as Optax
  clips scalars and vectors: biases and norm scales, leaves whose ``output_axis`` is ``None``
  (embedding tables used only by a lookup, under :func:`optax_gc.infer_output_axes`) and
  leaves whose fan-in has a single element. Integer and boolean leaves, zero-size leaves,
  ``None`` and ``optax.MaskedNode`` pass through. The norms are accumulated in at least
  ``float32``. NFNets leave the classifier head unclipped: wrap this in ``optax.masked`` to
  do the same.

  Args:
    clipping: the largest ratio of a unit's gradient norm to its weights' norm.
    output_axis: the axes that index output units, in the format of
      :func:`optax_gc.centralize`: one int or tuple for every leaf, a pytree of them (a prefix
      of the updates' tree; :func:`optax_gc.infer_output_axes` returns one), or a callable
      ``params -> such a pytree``.
    eps: the floor on a unit's weights' norm, so that zero-initialized weights still move.

  Returns:
    A :class:`optax.GradientTransformation` object. Its state is ``optax.EmptyState()``; its
    ``update`` needs ``params`` and raises ``ValueError`` without them.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_gc
    >>> params = {'w': jnp.array([[3., 1.], [4., 0.]])}  # (in, out): unit norms 5 and 1
    >>> grads = {'w': jnp.array([[6., 0.], [8., 1.]])}   # unit norms 10 and 1
    >>> tx = optax_gc.adaptive_grad_clip(0.5)
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> print(updates['w'])  # unit 0 scaled to norm 2.5, unit 1 to norm 0.5
    [[1.5 0. ]
     [2.  0.5]]

  References:
    Brock, De, Smith and Simonyan, `High-Performance Large-Scale Image Recognition Without
    Normalization <https://arxiv.org/abs/2102.06171>`_, ICML 2021.
  """

  def init_fn(params: optax.Params) -> optax.EmptyState:
    # Check the spec against the parameters now, so mistakes surface at init.
    _map_leaves(lambda g, axes: g, lambda g: g, params, params, output_axis, 2, None)
    return optax.EmptyState()

  def update_fn(
      updates: optax.Updates, state: optax.EmptyState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, optax.EmptyState]:
    if params is None:
      raise ValueError("optax_gc.adaptive_grad_clip: update needs the params, as AGC clips "
                       "relative to the weights' norms: call tx.update(updates, state, params).")
    paths_leaves, treedef, axes, _ = leaf_specs(updates, params, output_axis, 2, None)
    out = []
    for (path, g), axis, p in zip(paths_leaves, axes, treedef.flatten_up_to(params),
                                  strict=True):
      opts = {"p": p, "clipping": clipping, "eps": eps}
      out.append(_apply_leaf(functools.partial(_clip, **opts), g, axis, True,
                             functools.partial(_clip_whole, **opts), path, 2))
    return jax.tree_util.tree_unflatten(treedef, out), state

  return optax.GradientTransformation(init_fn, update_fn)
