"""Ground truth for output axes, measured from a layer's Jacobian.

This module never reads a jaxpr and shares no code with ``optax_gc``: it runs
the layer (``jax.jacfwd``) and looks at which output features each weight entry
reaches. It is the reference that ``optax_gc.infer_output_axes`` is tested
against.

The rule: take a layer's direct output ``y = fn(w, ...)`` and name the axes of
``y`` that index output features (the others, such as batch, sequence or
spatial positions, are collapsed). An axis of ``w`` is an **output axis** when
weight entries that differ only along it reach disjoint sets of output
features, and a **fan-in axis** when they reach overlapping sets. A size-1 axis
is neither (a mean over it is the identity), so specs are compared modulo
size-1 axes (:func:`canonical`).

The sparsity pattern is the union over several draws of random, non-zero
weights and inputs, so an entry that is zero by chance is not taken for a
structural zero.
"""

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_gc._src.compat import keypath_str

Spec = tuple[int, ...] | None


@contextlib.contextmanager
def _fast_compiles() -> Iterator[None]:
  """Tiny Jacobians compile several times faster with XLA's optimizations off."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", previous)


def _randomize(rng: np.random.Generator, tree: Any) -> Any:
  """Replaces every floating array leaf of ``tree`` by standard normal values."""

  def draw(x):
    if hasattr(x, "shape") and jnp.issubdtype(jnp.result_type(x), jnp.floating):
      return rng.standard_normal(np.shape(x)).astype(jnp.result_type(x))
    return x

  return jax.tree_util.tree_map(draw, tree)


def reach(
    fn: Callable[..., jax.Array],
    w: Any,
    *args: Any,
    feature_axes: Sequence[int] = (-1,),
    draws: int = 3,
    seed: int = 0,
) -> np.ndarray:
  """Which output features each entry of ``w`` reaches.

  Args:
    fn: ``fn(w, *args) -> y``, the computation whose direct output is ``y``.
    w: the weight (an array; only its shape and dtype are used).
    *args: the other inputs of ``fn``. Each draw replaces every floating array
      leaf in them by random normal values; other leaves (token ids, static
      values) are kept. Weights that must stay fixed belong in ``fn``'s closure.
    feature_axes: the axes of ``y`` that index output features.
    draws: how many random draws are united.
    seed: the seed of the draws.

  Returns:
    A boolean array of shape ``(F,) + w.shape``, where ``F`` is the number of
    output features: ``True`` where the entry of ``w`` changes that feature at
    some position of ``y`` in some draw.
  """
  shape = tuple(np.shape(w))
  dtype = jnp.result_type(w)
  leaves, treedef = jax.tree_util.tree_flatten(args)
  is_array = [isinstance(x, (jax.Array, np.ndarray)) for x in leaves]

  @jax.jit
  def jac_fn(w_, arrays):
    it = iter(arrays)
    full = [next(it) if a else x for a, x in zip(is_array, leaves, strict=True)]
    return jax.jacfwd(lambda v: fn(v, *jax.tree_util.tree_unflatten(treedef, full)))(w_)

  pattern = None
  rng = np.random.default_rng(seed)
  with _fast_compiles():
    for _ in range(draws):
      arrays = [x for a, x in zip(is_array, _randomize(rng, leaves), strict=True) if a]
      jac = np.asarray(jac_fn(rng.standard_normal(shape).astype(dtype), arrays))
      y_ndim = jac.ndim - len(shape)
      feats = sorted({a % y_ndim for a in feature_axes})
      if len(feats) != len(feature_axes):
        raise ValueError(f"feature_axes {feature_axes} repeat an axis of a rank-{y_ndim} output")
      collapse = tuple(a for a in range(y_ndim) if a not in feats)
      nz = np.any(jac != 0, axis=collapse).reshape((-1,) + shape)  # (features, *w.shape)
      pattern = nz if pattern is None else pattern | nz
  return pattern


def axis_roles(pattern: np.ndarray) -> tuple[str, ...]:
  """Classifies each weight axis as ``"output"``, ``"fan-in"`` or ``"size-1"``.

  Args:
    pattern: a :func:`reach` pattern, shape ``(F,) + w.shape``.

  Returns:
    One role per axis of ``w``.

  Raises:
    ValueError: if some entry reaches no feature (the draws did not exercise
      every weight), or if along an axis some pairs of entries reach disjoint
      features and others overlapping ones (the rule does not apply).
  """
  shape = pattern.shape[1:]
  unused = ~pattern.any(axis=0)
  if unused.any():
    raise ValueError(
        f"{int(unused.sum())} of {unused.size} weight entries reach no output feature, "
        f"e.g. index {tuple(int(i) for i in np.argwhere(unused)[0])}; use inputs that "
        "exercise every weight."
    )
  roles = []
  for a, n in enumerate(shape):
    if n == 1:
      roles.append("size-1")
      continue
    r = np.moveaxis(pattern, 1 + a, 1).reshape(pattern.shape[0], n, -1).astype(np.int32)
    overlap = np.einsum("fir,fjr->ijr", r, r) > 0
    pairs = overlap[~np.eye(n, dtype=bool)]  # (n * (n - 1), rest)
    if not pairs.any():
      roles.append("output")
    elif pairs.all():
      roles.append("fan-in")
    else:
      raise ValueError(
          f"axis {a} of a weight of shape {shape}: {int(pairs.sum())} of {pairs.size} pairs "
          "of entries that differ only along it reach overlapping output features, the "
          "others disjoint ones; it is neither an output nor a fan-in axis."
      )
  return tuple(roles)


def canonical(spec: Any, shape: Sequence[int]) -> Spec:
  """A spec (``None``, an int or a tuple of ints) modulo size-1 axes.

  Args:
    spec: output axes, negative ones allowed, or ``None``.
    shape: the weight's shape.

  Returns:
    ``None`` if ``spec`` is ``None`` or leaves a fan-in of a single element
    (Gradient Centralization would zero such a leaf, so it leaves it alone),
    else the sorted non-negative output axes of size greater than 1.
  """
  if spec is None:
    return None
  ndim = len(shape)
  axes = {a % ndim for a in (spec if isinstance(spec, tuple) else (spec,))}
  if int(np.prod([shape[a] for a in range(ndim) if a not in axes])) == 1:
    return None
  return tuple(sorted(a for a in axes if shape[a] > 1))


def default_spec(shape: Sequence[int], min_ndim: int = 2) -> Spec:
  """What ``optax_gc.centralize()``'s defaults (``output_axis=-1``, ``min_ndim=2``) keep."""
  return None if len(shape) < min_ndim else canonical(-1, shape)


def output_axes(
    fn: Callable[..., jax.Array],
    w: Any,
    *args: Any,
    feature_axes: Sequence[int] = (-1,),
    draws: int = 3,
    seed: int = 0,
) -> Spec:
  """The true output axes of ``w`` in ``fn(w, *args)``, in :func:`canonical` form.

  Args:
    fn: ``fn(w, *args) -> y``, the computation whose direct output is ``y``.
    w: the weight.
    *args: the other inputs, randomized per draw as in :func:`reach`.
    feature_axes: the axes of ``y`` that index output features.
    draws: how many random draws are united.
    seed: the seed of the draws.

  Returns:
    The sorted axes whose role is ``"output"``, or ``None`` when the fan-in
    (every other axis) has a single element.
  """
  roles = axis_roles(reach(fn, w, *args, feature_axes=feature_axes, draws=draws, seed=seed))
  return canonical(tuple(a for a, r in enumerate(roles) if r == "output"), np.shape(w))


def fan_in_axes(w_shape: Sequence[int], spec: Spec) -> tuple[int, ...]:
  """The axes a spec averages over: every axis that is not an output axis."""
  keep = () if spec is None else spec
  return tuple(a for a in range(len(w_shape)) if a not in keep)


def path_key(path: Any) -> str:
  """A key path written like ``layers/0/kernel`` (an NNX ``Variable``'s ``/value`` dropped)."""
  return keypath_str(path).removesuffix("/value")


def by_key(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> dict[str, Any]:
  """The leaves of ``tree`` by :func:`path_key`."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return {path_key(p): x for p, x in leaves}


def replace(tree: Any, key: str, value: Any) -> Any:
  """``tree`` with its leaf at ``key`` (a :func:`path_key`) replaced by ``value``."""
  found = []

  def swap(path, x):
    if path_key(path) == key:
      found.append(key)
      return value
    return x

  out = jax.tree_util.tree_map_with_path(swap, tree)
  if found != [key]:
    raise KeyError(f"{key!r} is not one leaf of a tree with leaves {sorted(by_key(tree))}")
  return out


def leaf_output_axes(
    fn: Callable[..., jax.Array],
    params: Any,
    key: str,
    *inputs: Any,
    feature_axes: Sequence[int] = (-1,),
    draws: int = 3,
    seed: int = 0,
) -> Spec:
  """:func:`output_axes` of the leaf ``key`` of ``params`` in ``fn(params, *inputs)``.

  Each draw randomizes that leaf, every other floating leaf of ``params`` and the floating
  ``inputs``.
  """

  def apply(w, p, *xs):
    return fn(replace(p, key, w), *xs)

  return output_axes(apply, by_key(params)[key], params, *inputs, feature_axes=feature_axes,
                     draws=draws, seed=seed)
