"""Layout-aware Gradient Centralization as an Optax gradient transformation.

Which axes are the fan-in is read from the model by :func:`optax_gc.infer_output_axes`; the
table of common layouts in :func:`centralize` is a reference for giving them by hand.
"""

from collections.abc import Callable
from typing import Any, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_gc._src.infer import Layout

AxisSpec: TypeAlias = int | tuple[int, ...] | None
OutputAxis: TypeAlias = AxisSpec | Any | Callable[[optax.Params], Any]
Mask: TypeAlias = Any | Callable[[optax.Params], Any] | None

__all__ = ["centralize", "gc_removed_fraction"]


def _is_passthrough_node(x: Any) -> bool:
  """Nodes of the updates tree that GC never touches and that carry no array."""
  return x is None or isinstance(x, optax.MaskedNode)


def _is_axis_leaf(x: Any) -> bool:
  """Leaves of an ``output_axis`` tree: ``None``, an int, a tuple of ints, an array, a Layout."""
  if x is None or isinstance(x, Layout) or isinstance(x, (int, np.integer, jax.Array, np.ndarray)):
    return True
  return isinstance(x, tuple) and all(isinstance(a, (int, np.integer)) for a in x)


def _describe(path: Any, leaf: Any) -> str:
  shape = getattr(leaf, "shape", None)
  return f"leaf {jax.tree_util.keystr(path) or '<root>'} with shape {shape}"


def _summary(x: Any) -> str:
  """What ``x`` is, for an error message, never with an array's values."""
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    return f"an array of shape {tuple(x.shape)} and dtype {x.dtype}"
  if isinstance(x, (list, tuple)) and all(
      isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in x
  ):
    return f"the {type(x).__name__} {list(x) if isinstance(x, list) else tuple(x)!r}"
  if isinstance(x, (list, tuple, dict)):
    keys = f" with keys {sorted(map(str, x))[:8]}" if isinstance(x, dict) else ""
    return f"a {type(x).__name__} of {len(x)} {'entry' if len(x) == 1 else 'entries'}{keys}"
  if x is None or isinstance(x, (bool, int, float, str, np.integer, np.floating, np.bool_)):
    return repr(x) if len(repr(x)) <= 40 else type(x).__name__
  return f"a {type(x).__name__}"


def _children(x: Any, is_leaf: Callable[[Any], bool]) -> list[tuple[Any, Any]] | None:
  """``[(key, child), ...]`` one level down, or ``None`` for a leaf."""
  if is_leaf(x) or _is_pytree_leaf(x):
    return None
  return [(path[0], child) for path, child in
          jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)[0]]


def _mismatch(
    spec: Any, updates: Any, is_leaf: Callable[[Any], bool], path: tuple[Any, ...] = ()
) -> tuple[tuple[Any, ...], Any, Any] | None:
  """The first place, ``(path, spec node, updates node)``, where ``spec`` is not a prefix."""
  spec_children = _children(spec, is_leaf)
  if spec_children is None:
    return None  # One entry for the whole subtree there.
  update_children = _children(updates, _is_passthrough_node)
  if update_children is None or type(spec) is not type(updates) or (
      [k for k, _ in spec_children] != [k for k, _ in update_children]):
    return path, spec, updates
  for (key, s), (_, u) in zip(spec_children, update_children, strict=True):
    found = _mismatch(s, u, is_leaf, (*path, key))
    if found is not None:
      return found
  return None


def _mismatch_error(spec: Any, updates: Any, name: str, is_leaf: Callable[[Any], bool]) -> str:
  """Says where and how ``spec`` does not fit the updates, naming no array values."""
  head = f"optax_gc: the `{name}` tree does not match the structure of the updates"
  advice = " Give one entry per leaf of the updates (or a callable params -> such a tree)."
  found = _mismatch(spec, updates, is_leaf)
  if found is None:
    return f"{head}.{advice}"
  path, node, sub = found
  sub_children = _children(sub, _is_passthrough_node)
  node_children = _children(node, is_leaf) or []
  if sub_children is not None and type(node) is type(sub):  # Different keys.
    have = {k for k, _ in node_children}
    missing = [(k, x) for k, x in sub_children if k not in have]
    if missing:
      k, x = missing[0]
      leaf = _children(x, _is_passthrough_node) is None
      what = _describe((*path, k), x) if leaf else jax.tree_util.keystr((*path, k))
      return (f"{head}: no entry for {what} (the `{name}` tree has {_summary(node)} at "
              f"{jax.tree_util.keystr(path) or '<root>'}).{advice}")
    extra = next(k for k, _ in node_children if k not in {k for k, _ in sub_children})
    return (f"{head}: it has an entry at {jax.tree_util.keystr((*path, extra))}, where the "
            f"updates have none.{advice}")
  where = _describe(path, sub) if sub_children is None else (
      jax.tree_util.keystr(path) or "<root>")
  msg = (f"{head} at {where}: the `{name}` tree has {_summary(node)} there, where the updates "
         f"have {_summary(sub)}.")
  if name == "output_axis" and isinstance(node, list) and node and all(
      isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in node):
    return (f"{msg} JAX reads a list as a subtree with one entry per element, not as a set "
            f"of axes: write the tuple {tuple(int(a) for a in node)!r}.")
  return msg + advice


def _broadcast_prefix(
    spec: Any,
    updates: Any,
    name: str,
    is_leaf: Callable[[Any], bool],
) -> list[Any]:
  """Returns the tree ``spec`` as one entry per leaf of the updates.

  ``spec`` is a prefix of the updates' structure: each of its leaves applies to the whole
  subtree of the updates at that place (e.g. to the array inside an ``nnx.Variable``). On a
  mismatch the error names the first place where the two differ.
  """
  spec_leaves, spec_def = jax.tree_util.tree_flatten(spec, is_leaf=is_leaf)
  try:
    subtrees = spec_def.flatten_up_to(updates)
  except (ValueError, TypeError):
    # JAX's own message prints the updates, array values included: say it without them.
    raise ValueError(_mismatch_error(spec, updates, name, is_leaf)) from None
  out = []
  for value, sub in zip(spec_leaves, subtrees, strict=True):
    out.extend([value] * len(jax.tree_util.tree_leaves(sub, is_leaf=_is_passthrough_node)))
  return out


def _per_leaf(
    spec: Any,
    updates: Any,
    params: Any,
    paths_leaves: list[tuple[Any, Any]],
    name: str,
    is_leaf: Callable[[Any], bool],
) -> list[Any]:
  """``spec`` (one value, a tree, or a callable ``params -> tree``) as one entry per leaf.

  A value whose structure fits the updates is a tree even when it is callable, as an Equinox
  module is; only a callable that is not such a tree is called (on the params, or on the
  updates when there are none).
  """
  if is_leaf(spec):
    return [spec] * len(paths_leaves)
  if not _is_pytree_leaf(spec, is_leaf):
    try:
      return _broadcast_prefix(spec, updates, name, is_leaf)
    except ValueError:
      leaves = jax.tree_util.tree_leaves(spec, is_leaf=is_leaf)
      if not callable(spec) or (leaves and all(is_leaf(x) for x in leaves)):
        _check_spec_type(spec, name)
        raise  # A tree of specs (callable or not, like an Equinox module) that does not fit.
  if callable(spec) and not isinstance(spec, jax.Array):
    spec = spec(updates if params is None else params)
    if is_leaf(spec):
      return [spec] * len(paths_leaves)
  _check_spec_type(spec, name)
  return _broadcast_prefix(spec, updates, name, is_leaf)


def _is_pytree_leaf(x: Any, is_leaf: Callable[[Any], bool] | None = None) -> bool:
  return jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(x, is_leaf=is_leaf))


_EXPECTED = {"output_axis": "an int, a tuple of ints, None", "layout": "an optax_gc.Layout, None"}


def _check_spec_type(spec: Any, name: str) -> None:
  """Raises a clear error for a whole-tree spec of the wrong type (a list of ints, a float)."""
  if name == "output_axis" and isinstance(spec, list) and spec and all(
      isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in spec
  ):
    raise ValueError(
        f"optax_gc: output_axis {spec!r} is a list, which JAX reads as a pytree with one "
        f"entry per leaf, not as a set of axes. Write the tuple {tuple(spec)!r}."
    )
  if _is_pytree_leaf(spec):
    expected = _EXPECTED.get(name, "a bool, None")
    raise ValueError(
        f"optax_gc: `{name}` must be {expected}, a pytree of those with the structure of "
        f"the updates, or a callable params -> such a pytree; got {_summary(spec)} "
        f"({type(spec).__name__})."
    )


def _normalize_axes(axis: Any, path: Any, leaf: jax.Array) -> tuple[int, ...]:
  """Returns the output axes of ``leaf`` as sorted non-negative ints, or raises."""
  axes = axis if isinstance(axis, tuple) else (axis,)
  ndim = leaf.ndim
  out = []
  for a in axes:
    if isinstance(a, bool) or not isinstance(a, (int, np.integer)):
      raise ValueError(
          f"optax_gc: output_axis entries must be ints, got {_summary(a)} for "
          f"{_describe(path, leaf)}."
      )
    if not -ndim <= a < ndim:
      raise ValueError(
          f"optax_gc: output_axis {axis!r} is out of range for "
          f"{_describe(path, leaf)} (rank {ndim})."
      )
    out.append(int(a) % ndim)
  if len(set(out)) != len(out):
    raise ValueError(
        f"optax_gc: output_axis {axis!r} names the same axis twice "
        f"for {_describe(path, leaf)}."
    )
  return tuple(sorted(out))


def _is_candidate(leaf: Any, axis: Any, selected: Any, min_ndim: int) -> bool:
  """Whether GC may act on ``leaf``, before its axes and sizes are looked at.

  Not a candidate: ``None``/``MaskedNode``, masked-out leaves, an
  ``output_axis`` of ``None``, rank below ``min_ndim`` (Python scalars
  included) and dtypes that are neither real nor complex floating.
  """
  masked_out = isinstance(selected, (bool, np.bool_)) and not selected
  if _is_passthrough_node(leaf) or axis is None or masked_out:
    return False
  if np.ndim(leaf) < min_ndim:
    return False
  return bool(jnp.issubdtype(jnp.result_type(leaf), jnp.inexact))


def _reduced_axes(
    path: Any, leaf: Any, axis: Any, selected: Any, min_ndim: int
) -> tuple[int, ...] | None:
  """The fan-in axes GC averages ``leaf`` over, or ``None`` if it passes through.

  Pass-through leaves: those that are not candidates (:func:`_is_candidate`),
  zero-size leaves, and leaves whose fan-in has a single element (GC would zero
  them).
  """
  if not _is_candidate(leaf, axis, selected, min_ndim):
    return None
  keep = _normalize_axes(axis, path, leaf)
  reduced = tuple(a for a in range(leaf.ndim) if a not in keep)
  if leaf.size == 0 or int(np.prod([leaf.shape[a] for a in reduced])) == 1:
    return None
  return reduced


def _mean(g: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """Mean over ``axes`` (kept as size-1 dims), accumulated in at least float32."""
  acc = jnp.promote_types(g.dtype, jnp.float32)
  return jnp.mean(g, axis=axes, keepdims=True, dtype=acc)


def _centralize_leaf(g: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  acc = jnp.promote_types(g.dtype, jnp.float32)
  return (g.astype(acc) - _mean(g, axes)).astype(g.dtype)


def _traced_axis_leaf(
    fn: Callable[[jax.Array, tuple[int, ...]], jax.Array],
    g: jax.Array,
    axis: jax.Array,
    default: Callable[[Any], Any],
    path: Any,
    min_ndim: int,
) -> jax.Array:
  """Applies ``fn`` with an integer-array output axis (``inject_hyperparams``).

  ``optax.inject_hyperparams`` turns every int argument, ``output_axis``
  included, into an array in the optimizer state, which is traced under
  ``jit``. The axis still never changes, so one branch per candidate axis is
  compiled and ``lax.switch`` runs the one the value names.
  """
  if np.ndim(axis) != 0 or not jnp.issubdtype(axis.dtype, jnp.integer):
    raise ValueError(
        f"optax_gc: an array output_axis must be an integer scalar, got "
        f"shape {np.shape(axis)} dtype {axis.dtype} for {_describe(path, g)}."
    )
  if not isinstance(axis, jax.core.Tracer):
    return _apply_leaf(fn, g, int(axis), True, default, path, min_ndim)
  branches = [
      (lambda x, a=a: _apply_leaf(fn, x, a, True, default, path, min_ndim))
      for a in range(g.ndim)
  ]
  return jax.lax.switch(jnp.mod(axis, g.ndim), branches, g)


def _apply_leaf(
    fn: Callable[[jax.Array, tuple[int, ...]], Any],
    g: Any,
    axis: Any,
    selected: Any,
    default: Callable[[Any], Any],
    path: Any,
    min_ndim: int,
) -> Any:
  """``fn(g, reduced_axes)`` if GC acts on ``g``, else ``default(g)``."""
  if isinstance(axis, (jax.Array, np.ndarray)) and _is_candidate(g, axis, selected, min_ndim):
    return _traced_axis_leaf(fn, g, axis, default, path, min_ndim)
  axes = _reduced_axes(path, g, axis, selected, min_ndim)
  if axes is None:
    return default(g)
  return fn(jnp.asarray(g), axes)  # NumPy leaves get JAX's dtype rules.


def _map_leaves(
    fn: Callable[[jax.Array, tuple[int, ...]], jax.Array],
    default: Callable[[Any], Any],
    updates: Any,
    params: Any,
    output_axis: OutputAxis,
    min_ndim: int,
    mask: Mask,
) -> Any:
  """Maps ``fn(g, reduced_axes)`` over the leaves GC acts on, ``default`` elsewhere."""
  paths_leaves, treedef, axes, masks = leaf_specs(updates, params, output_axis, min_ndim, mask)
  out = [
      _apply_leaf(fn, g, a, m, default, path, min_ndim)
      for (path, g), a, m in zip(paths_leaves, axes, masks, strict=True)
  ]
  return jax.tree_util.tree_unflatten(treedef, out)


def leaf_specs(
    updates: Any, params: Any, output_axis: OutputAxis, min_ndim: int, mask: Mask
) -> tuple[list[tuple[Any, Any]], Any, list[Any], list[Any]]:
  """``(paths_leaves, treedef, axes, masks)``: the updates' leaves and one spec and mask each."""
  if isinstance(min_ndim, bool) or not isinstance(min_ndim, int) or min_ndim < 1:
    raise ValueError(f"optax_gc: min_ndim must be an int >= 1, got {_summary(min_ndim)}.")
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(
      updates, is_leaf=_is_passthrough_node
  )
  axes = [
      tuple(sorted(a.output + a.stack)) if isinstance(a, Layout) else a
      for a in _per_leaf(output_axis, updates, params, paths_leaves, "output_axis", _is_axis_leaf)
  ]
  masks = (
      [True] * len(axes)
      if mask is None
      else _per_leaf(
          mask, updates, params, paths_leaves, "mask",
          lambda x: x is None or isinstance(x, (bool, np.bool_)),
      )
  )
  masks = [_mask_entry(m, path, g) for (path, g), m in zip(paths_leaves, masks, strict=True)]
  return paths_leaves, treedef, axes, masks


def _mask_entry(m: Any, path: Any, leaf: Any) -> bool | None:
  """A mask entry as a bool (or ``None``); an array of bools is not one, as in Optax."""
  if m is None or isinstance(m, (bool, np.bool_)):
    return m
  if (np.shape(m) == () and not isinstance(m, jax.core.Tracer)
      and np.issubdtype(np.result_type(m), np.bool_)):
    return bool(m)
  raise ValueError(
      f"optax_gc: `mask` entries must be a bool or None, one per leaf or sub-tree; got "
      f"{_summary(m)} for {_describe(path, leaf)}."
  )


def map_centralized(
    tree: Any, params: Any, output_axis: OutputAxis, min_ndim: int, mask: Mask = None
) -> Any:
  """``tree`` with GC applied leaf by leaf, by the rules of :func:`centralize`."""
  return _map_leaves(
      _centralize_leaf, lambda g: g, tree, params, output_axis, min_ndim, mask
  )


def centralize(
    output_axis: OutputAxis = -1,
    *,
    min_ndim: int = 2,
    mask: Mask = None,
) -> optax.GradientTransformation:
  r"""Gradient Centralization that knows which axis holds the output units.

  For every selected leaf :math:`g`, GC subtracts the mean over the fan-in, that
  is over every axis except the output axes :math:`O`, separately for each
  output unit:

  .. math::

    \Phi(g) = g - \operatorname{mean}_{a \notin O}(g),

  the projection of :math:`g` onto the hyperplane "zero mean over the fan-in"
  (Yong et al. 2020, Eq. 4). :math:`\Phi` is linear, idempotent and never
  increases the norm.

  Unlike ``optax.centralize()``, which keeps axis 0 as PyTorch stores
  ``(out, in, kh, kw)``, the default ``output_axis=-1`` keeps the *last* axis,
  which is where Flax, Haiku and Keras store output units (``(in, out)`` and
  ``(kh, kw, in, out)``). Many layers need other axes; read them from the model
  with :func:`optax_gc.infer_output_axes`, which returns a spec this function
  takes as it is. For reference:

  ===========================================================  ==================
  Layout                                                       ``output_axis``
  ===========================================================  ==================
  Flax/Haiku/Keras Dense and Conv ``(..., in, out)``           ``-1``
  Haiku/Keras ConvTranspose, Flax ``transpose_kernel=True``    ``-2``
  attention q/k/v, ``DenseGeneral`` ``(in, heads, head_dim)``  ``(1, 2)``
  ``nnx.Einsum('btd,ndh->btnh')`` ``(heads, in, head_dim)``    ``(0, 2)``
  a scanned or stacked layer ``(L, in, out)``                  ``(0, 2)``
  Keras ``DepthwiseConv2D`` ``(kh, kw, in, multiplier)``       ``(2, 3)``
  PyTorch-style and Equinox ``(out, in, ...)``                 ``0``
  PyTorch ``ConvTranspose2d`` ``(in, out, kh, kw)``            ``1``
  biases of any rank, norm scales, lookup-only embeddings      ``None``
  ===========================================================  ==================

  These leaves pass through bit for bit: rank below ``min_ndim`` (biases, norm
  scales); integer and boolean dtypes; ``None`` and ``optax.MaskedNode``;
  zero-size leaves; leaves whose fan-in has one element (GC would zero them,
  e.g. an Equinox conv bias ``(C, 1, 1)`` with ``output_axis=0``); masked-out
  leaves and leaves whose ``output_axis`` is ``None``. For ``bfloat16``/``float16``
  the mean is accumulated in ``float32`` and the result has the input dtype.
  Complex leaves are centralized like real ones (the real and imaginary parts
  each get zero mean), as ``optax.centralize()`` does.

  Args:
    output_axis: the axis, or tuple of axes, that indexes output units; the
      mean is taken over all the others. Either one value for every leaf, a
      pytree whose leaves are an int, a tuple of ints or ``None`` (leave that
      leaf alone) and whose structure is a prefix of the updates' (one entry
      may cover an ``nnx.Variable`` or a sub-tree; a tree that is callable, as
      an Equinox module is, is still a tree), or a callable
      ``params -> such a pytree`` (called on the updates when ``update`` gets
      no params). :func:`optax_gc.infer_output_axes` returns such a pytree. An
      integer array (as ``optax.inject_hyperparams`` passes it) is accepted too,
      and so is an :class:`optax_gc.Layout` (its ``output`` and ``stack`` axes),
      so that a tree from :func:`optax_gc.infer_layout` serves GC and Muon alike.
    min_ndim: leaves of lower rank pass through. ``2`` is the paper's GC
      (dense and conv kernels); ``3`` is GCC (conv kernels only).
    mask: a pytree of bools (a prefix of the updates' structure, as for
      ``output_axis``), or a callable ``params -> such a pytree``, as in
      ``optax.masked``; ``False`` leaves pass through.

  Returns:
    A :class:`optax.GradientTransformation` object. Its state is
    ``optax.EmptyState()``. An ``output_axis`` out of range or repeated for a
    leaf that would be centralized, or an ``output_axis``/``mask`` tree whose
    structure does not match the updates, raises ``ValueError`` at trace time
    naming the leaf's key path and shape.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax, optax_gc
    >>> g = {'kernel': jnp.array([[1., 2.], [3., 6.]]), 'bias': jnp.array([1., 2.])}
    >>> tx = optax_gc.centralize()  # Flax layout (in, out): mean over axis 0
    >>> updates, state = tx.update(g, tx.init(g))
    >>> print(updates['kernel'])
    [[-1. -2.]
     [ 1.  2.]]
    >>> print(updates['bias'])  # rank 1: passes through
    [1. 2.]
    >>> print(state)
    EmptyState()
    >>> tx = optax.chain(optax_gc.centralize(), optax.sgd(0.1))

  References:
    Yong, Huang, Hua and Zhang, `Gradient Centralization: A New Optimization
    Technique for Deep Neural Networks <https://arxiv.org/abs/2004.01461>`_,
    ECCV 2020.
  """

  def init_fn(params: optax.Params) -> optax.EmptyState:
    # Check the specs against the parameters now, so mistakes surface at init.
    _map_leaves(
        lambda g, axes: g, lambda g: g, params, params, output_axis, min_ndim, mask
    )
    return optax.EmptyState()

  def update_fn(
      updates: optax.Updates, state: optax.EmptyState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, optax.EmptyState]:
    return map_centralized(updates, params, output_axis, min_ndim, mask), state

  return optax.GradientTransformation(init_fn, update_fn)


def gc_removed_fraction(
    grads: Any,
    output_axis: OutputAxis = -1,
    *,
    min_ndim: int = 2,
    mask: Mask = None,
    params: Any = None,
) -> Any:
  r"""Per leaf, the share of the gradient's norm that GC removes.

  For each leaf that :func:`centralize` would act on (same arguments, same
  rules) this returns

  .. math::

    r = \frac{\lVert g - \Phi(g) \rVert}{\lVert g \rVert} \in [0, 1],

  the norm of the per-unit mean component over the norm of the gradient
  (``0`` when ``g`` is zero). Pass-through leaves give ``0``; ``None`` and
  ``optax.MaskedNode`` stay as they are. Since :math:`\Phi` is an orthogonal
  projection, the gradient left after GC has norm :math:`\sqrt{1 - r^2}\,
  \lVert g \rVert`. Log it now and then in a training loop to see where GC
  acts: ``r`` near 0 means GC changes little for that layer.

  Args:
    grads: a pytree of gradients.
    output_axis: as in :func:`centralize`.
    min_ndim: as in :func:`centralize`.
    mask: as in :func:`centralize`.
    params: passed to a callable ``output_axis`` or ``mask`` (the gradients
      are used when it is ``None``).

  Returns:
    A pytree with the structure of ``grads`` of ``float32`` scalars. It is pure
    and can be called inside ``jax.jit``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_gc
    >>> g = {'kernel': jnp.array([[1., 1.], [1., -1.]]), 'bias': jnp.ones(2)}
    >>> r = optax_gc.gc_removed_fraction(g)
    >>> print(f"{float(r['kernel']):.4f} {float(r['bias']):.1f}")
    0.7071 0.0

  References:
    Yong, Huang, Hua and Zhang, `Gradient Centralization: A New Optimization
    Technique for Deep Neural Networks <https://arxiv.org/abs/2004.01461>`_,
    ECCV 2020.
  """

  def fraction(g: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    g32 = g.astype(jnp.promote_types(g.dtype, jnp.float32))
    removed = jnp.broadcast_to(_mean(g, axes), g.shape)
    num, den = jnp.linalg.norm(removed.ravel()), jnp.linalg.norm(g32.ravel())
    safe = jnp.where(den > 0, den, 1.0)
    return jnp.where(den > 0, num / safe, 0.0).astype(jnp.float32)

  def zero(g: Any) -> Any:
    return g if _is_passthrough_node(g) else jnp.zeros((), jnp.float32)

  return _map_leaves(fraction, zero, grads, params, output_axis, min_ndim, mask)

