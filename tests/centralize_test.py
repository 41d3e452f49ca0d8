"""Tests for optax_gc.centralize and optax_gc.gc_removed_fraction."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import absltest, parameterized

import optax_gc


def _apply(tx, updates, params=None):
  new, state = tx.update(updates, tx.init(updates if params is None else params), params)
  return new, state


def _np_gc(g, keep):
  """Reference GC in NumPy float64: mean over every axis not in ``keep``."""
  g = np.asarray(g, np.float64)
  keep = {a % g.ndim for a in keep}
  axes = tuple(a for a in range(g.ndim) if a not in keep)
  return g - g.mean(axis=axes, keepdims=True)


def _random_shape(rng, ndim):
  return tuple(int(s) for s in rng.integers(1, 6, size=ndim))


class WorkedExampleTest(chex.TestCase):
  """Hand-computed cases, as in Optax's own tests."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_dense_kernel_in_out(self):
    # Flax Dense kernel (in=3, out=2): each column is one output unit.
    g = jnp.array([[1.0, 10.0], [2.0, 20.0], [6.0, 0.0]])
    out = self.variant(lambda g: _apply(optax_gc.centralize(), g)[0])(g)
    # column means: 3 and 10.
    expected = np.array([[-2.0, 0.0], [-1.0, 10.0], [3.0, -10.0]])
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_conv_kernel_keeps_last_axis(self):
    # Flax Conv kernel (kh=1, kw=2, in=1, out=2). Filter 0 = [1, 3], filter 1 = [5, 5].
    g = jnp.array([[[[1.0, 5.0]], [[3.0, 5.0]]]])
    out = self.variant(lambda g: _apply(optax_gc.centralize(), g)[0])(g)
    expected = np.array([[[[-1.0, 0.0]], [[1.0, 0.0]]]])
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
    # optax.centralize() keeps axis 0 (kh, of size 1) and mixes the two filters.
    wrong, _ = _apply(optax.centralize(), g)
    np.testing.assert_allclose(wrong, g - g.mean(), atol=1e-6)
    self.assertFalse(np.allclose(wrong, expected))

  @chex.variants(with_jit=True, without_jit=True)
  def test_one_dim_passes_through(self):
    g = jnp.array([1.0, 2.0, 3.0])
    out = self.variant(lambda g: _apply(optax_gc.centralize(), g)[0])(g)
    np.testing.assert_array_equal(out, g)

  def test_state_is_empty(self):
    tx = optax_gc.centralize()
    self.assertEqual(tx.init({"w": jnp.ones((2, 2))}), optax.EmptyState())


class PropertiesTest(chex.TestCase):
  """The properties of an orthogonal projection, on random shapes and axes."""

  def _cases(self, seed):
    rng = np.random.default_rng(seed)
    ndim = int(rng.integers(2, 6))
    shape = _random_shape(rng, ndim)
    n_keep = int(rng.integers(1, ndim))
    keep = tuple(int(a) for a in rng.choice(ndim, size=n_keep, replace=False))
    g = rng.normal(size=shape).astype(np.float32) + rng.normal()
    return g, keep if len(keep) > 1 else keep[0]

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(range(12))
  def test_projection_properties(self, seed):
    g, axis = self._cases(seed)
    tx = optax_gc.centralize(axis)
    gc = self.variant(lambda g: tx.update(g, optax.EmptyState())[0])
    out = np.asarray(gc(jnp.asarray(g)), np.float64)
    keep = axis if isinstance(axis, tuple) else (axis,)
    reduced = tuple(a for a in range(g.ndim) if a not in {k % g.ndim for k in keep})
    fan_in = int(np.prod([g.shape[a] for a in reduced]))
    if fan_in == 1:  # GC would zero it: passes through.
      np.testing.assert_array_equal(out, g)
      return
    # Equals the float64 reference.
    np.testing.assert_allclose(out, _np_gc(g, keep), rtol=1e-5, atol=1e-5)
    # Zero mean over the reduced axes, for every output unit.
    np.testing.assert_allclose(out.mean(axis=reduced), 0.0, atol=1e-5)
    # Idempotent.
    np.testing.assert_allclose(gc(jnp.asarray(out, jnp.float32)), out, atol=1e-5)
    # The norm never grows.
    self.assertLessEqual(np.linalg.norm(out), np.linalg.norm(g) * (1 + 1e-6))
    # GC(g) is orthogonal to what it removed.
    removed = g - out
    scale = np.linalg.norm(g) ** 2
    self.assertLess(abs(np.vdot(out, removed)) / scale, 1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(0, 1, 2)
  def test_linear(self, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(2, 3, 3, 4, 5)).astype(np.float32)
    tx = optax_gc.centralize()
    gc = self.variant(lambda g: tx.update(g, optax.EmptyState())[0])
    lhs = gc(jnp.asarray(2.0 * a - 3.0 * b))
    rhs = 2.0 * gc(jnp.asarray(a)) - 3.0 * gc(jnp.asarray(b))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-5, atol=1e-5)

  def test_vmap_equals_loop(self):
    g = jax.random.normal(jax.random.key(0), (4, 3, 3, 2, 5))  # a batch of conv grads
    tx = optax_gc.centralize()

    def fn(x):
      return tx.update(x, optax.EmptyState())[0]

    np.testing.assert_allclose(
        jax.vmap(fn)(g), jnp.stack([fn(x) for x in g]), rtol=1e-6, atol=1e-6
    )


class LayoutTest(chex.TestCase):
  """The right axes for each framework's layout."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("flax_dense", (7, 5), -1),
      ("flax_conv1d", (3, 4, 6), -1),
      ("flax_conv2d", (3, 3, 4, 6), -1),
      ("flax_conv3d", (2, 3, 3, 4, 6), -1),
      ("flax_conv_transpose", (3, 3, 4, 6), -1),
      ("haiku_conv_transpose", (3, 3, 6, 4), -2),
      ("flax_dense_general", (8, 2, 4), (1, 2)),
      ("pytorch_conv2d", (6, 4, 3, 3), 0),
      ("pytorch_linear", (5, 7), 0),
  )
  def test_layout(self, shape, axis):
    g = jax.random.normal(jax.random.key(1), shape) + 0.5
    out = self.variant(lambda g: _apply(optax_gc.centralize(axis), g)[0])(g)
    keep = axis if isinstance(axis, tuple) else (axis,)
    np.testing.assert_allclose(out, _np_gc(g, keep), rtol=1e-5, atol=1e-5)

  def test_dense_general_equals_flattened_dense(self):
    # A (features, heads, head_dim) kernel is a Dense (features, heads * head_dim).
    g = jax.random.normal(jax.random.key(2), (8, 2, 4))
    out, _ = _apply(optax_gc.centralize((1, 2)), g)
    flat, _ = _apply(optax_gc.centralize(), g.reshape(8, 8))
    np.testing.assert_allclose(out.reshape(8, 8), flat, rtol=1e-6, atol=1e-6)

  @parameterized.parameters((7, 5), (3, 4, 6), (3, 3, 4, 6), (2, 3, 3, 4, 6))
  def test_output_axis_zero_equals_optax_centralize(self, *shape):
    g = jax.random.normal(jax.random.key(3), shape)
    ours, _ = _apply(optax_gc.centralize(0), g)
    theirs, _ = _apply(optax.centralize(), g)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)

  @parameterized.parameters((7, 5), (3, 3, 4, 6))
  def test_transposition_equivalence(self, *shape):
    # Flax (..., in, out) with output_axis=-1 == PyTorch-style W.T with output_axis=0.
    w = jax.random.normal(jax.random.key(4), shape)
    flax_out, _ = _apply(optax_gc.centralize(-1), w)
    torch_out, _ = _apply(optax_gc.centralize(0), w.T)
    np.testing.assert_allclose(flax_out, torch_out.T, rtol=1e-6, atol=1e-6)

  def test_real_flax_modules_store_outputs_last(self):
    """The layout table, checked against the shapes Flax NNX really creates."""
    nnx = pytest.importorskip("flax.nnx")

    rngs = nnx.Rngs(0)
    cases = {
        "Linear": (nnx.Linear(3, 5, rngs=rngs).kernel, -1, 5),
        "Conv": (nnx.Conv(3, 5, (2, 2), rngs=rngs).kernel, -1, 5),
        "Conv1D": (nnx.Conv(3, 5, (2,), rngs=rngs).kernel, -1, 5),
        "ConvTranspose": (nnx.ConvTranspose(3, 5, (2, 2), rngs=rngs).kernel, -1, 5),
        "LinearGeneral": (
            nnx.LinearGeneral(3, (2, 4), axis=-1, rngs=rngs).kernel, (1, 2), (2, 4)
        ),
    }
    for name, (kernel, axis, out_shape) in cases.items():
      shape = kernel.shape
      got = tuple(shape[a] for a in axis) if isinstance(axis, tuple) else shape[axis]
      self.assertEqual(got, out_shape, msg=name)

  def test_equinox_conv_bias_passes_through(self):
    # Equinox stores a conv bias as (C, 1, 1): optax.centralize() zeroes it.
    bias_grad = jnp.arange(1.0, 4.0).reshape(3, 1, 1)
    ours, _ = _apply(optax_gc.centralize(0), bias_grad)
    np.testing.assert_array_equal(ours, bias_grad)
    theirs, _ = _apply(optax.centralize(), bias_grad)
    np.testing.assert_array_equal(theirs, jnp.zeros_like(bias_grad))


class PerLeafSpecTest(chex.TestCase):

  def _tree(self):
    k = jax.random.split(jax.random.key(5), 4)
    return {
        "dense": {"kernel": jax.random.normal(k[0], (6, 4)), "bias": jnp.ones(4)},
        "attn": {"query": jax.random.normal(k[1], (4, 2, 3))},
        "torch": {"weight": jax.random.normal(k[2], (5, 6))},
    }

  def _expected(self, tree):
    return {
        "dense": {
            "kernel": _np_gc(tree["dense"]["kernel"], (-1,)),
            "bias": tree["dense"]["bias"],
        },
        "attn": {"query": _np_gc(tree["attn"]["query"], (1, 2))},
        "torch": {"weight": _np_gc(tree["torch"]["weight"], (0,))},
    }

  @chex.variants(with_jit=True, without_jit=True)
  def test_pytree_output_axis(self):
    tree = self._tree()
    spec = {
        "dense": {"kernel": -1, "bias": None},
        "attn": {"query": (1, 2)},
        "torch": {"weight": 0},
    }
    out = self.variant(lambda g: _apply(optax_gc.centralize(spec), g)[0])(tree)
    chex.assert_trees_all_close(out, self._expected(tree), rtol=1e-5, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_callable_output_axis(self):
    tree = self._tree()

    def spec(params):
      def one(path, p):
        name = jax.tree_util.keystr(path)
        return (1, 2) if "query" in name else 0 if "torch" in name else -1

      return jax.tree_util.tree_map_with_path(one, params)

    tx = optax_gc.centralize(spec)
    out = self.variant(lambda g, p: tx.update(g, optax.EmptyState(), p)[0])(tree, tree)
    chex.assert_trees_all_close(out, self._expected(tree), rtol=1e-5, atol=1e-5)
    # Without params the callable sees the updates.
    out = self.variant(lambda g: tx.update(g, optax.EmptyState())[0])(tree)
    chex.assert_trees_all_close(out, self._expected(tree), rtol=1e-5, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_mask_tree_and_callable(self):
    tree = {"a": jnp.arange(6.0).reshape(3, 2), "b": jnp.arange(6.0).reshape(3, 2)}
    masks = (
        {"a": True, "b": False},
        lambda p: {"a": True, "b": False},
        {"a": np.bool_(True), "b": np.bool_(False)},  # e.g. from a NumPy comparison
    )
    for mask in masks:
      tx = optax_gc.centralize(mask=mask)
      out = self.variant(lambda g, tx=tx: _apply(tx, g)[0])(tree)
      np.testing.assert_allclose(out["a"], _np_gc(tree["a"], (-1,)), atol=1e-6)
      np.testing.assert_array_equal(out["b"], tree["b"])


class TreeLikeSpecTest(chex.TestCase):
  """Spec and mask trees from real frameworks: prefixes of the updates, callable trees."""

  def test_equinox_module_trees_are_trees_not_callables(self):
    eqx = pytest.importorskip("equinox")

    model = eqx.nn.MLP(3, 2, 4, 1, key=jax.random.key(0))
    params = eqx.filter(model, eqx.is_array)
    spec = jax.tree.map(lambda p: 0 if p.ndim == 2 else None, params)
    mask = jax.tree.map(lambda p: p.shape[0] == 4, params)
    self.assertTrue(callable(spec) and callable(mask))  # eqx modules are callable
    grads = eqx.filter_grad(lambda m, x: jnp.sum(m(x) ** 2))(model, jnp.arange(3.0))
    for tx, centralized in ((optax_gc.centralize(spec), (0, 1)),
                            (optax_gc.centralize(0, mask=mask), (0,))):
      out, _ = tx.update(grads, tx.init(params), params)
      for i, layer in enumerate(out.layers):
        g = grads.layers[i].weight
        expected = _np_gc(g, (0,)) if i in centralized else g
        np.testing.assert_allclose(layer.weight, expected, atol=1e-6)
        np.testing.assert_array_equal(layer.bias, grads.layers[i].bias)

  def test_equinox_tree_of_the_wrong_structure_is_not_called(self):
    eqx = pytest.importorskip("equinox")

    small = eqx.nn.Linear(3, 2, key=jax.random.key(0))
    other = eqx.nn.Linear(3, 2, use_bias=False, key=jax.random.key(0))
    spec = jax.tree.map(lambda _: 0, eqx.filter(other, eqx.is_array))
    with self.assertRaisesRegex(ValueError, "does not match the structure"):
      optax_gc.centralize(spec).init(eqx.filter(small, eqx.is_array))

  def test_spec_is_a_prefix_of_nnx_variables(self):
    nnx = pytest.importorskip("flax.nnx")

    model = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    spec = nnx.as_pure(jax.tree.map(lambda p: (1,) if p.ndim == 2 else None,
                                    nnx.as_pure(nnx.state(model, nnx.Param))))
    tx = optax.chain(optax_gc.centralize(spec), optax.sgd(1.0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)  # init sees nnx.Param nodes
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.arange(6.0).reshape(2, 3)) ** 2))(model)
    updates = optimizer.update(model, grads)
    g = nnx.as_pure(nnx.state(grads, nnx.Param))
    np.testing.assert_allclose(updates["kernel"], -_np_gc(g["kernel"], (1,)), atol=1e-5)
    np.testing.assert_array_equal(updates["bias"], -g["bias"])

  def test_a_spec_leaf_covers_a_subtree(self):
    tree = {"enc": {"w": jnp.arange(6.0).reshape(3, 2), "v": jnp.arange(6.0).reshape(2, 3)},
            "dec": jnp.arange(6.0).reshape(3, 2)}
    out, _ = _apply(optax_gc.centralize({"enc": 0, "dec": None}), tree)
    np.testing.assert_allclose(out["enc"]["w"], _np_gc(tree["enc"]["w"], (0,)), atol=1e-6)
    np.testing.assert_allclose(out["enc"]["v"], _np_gc(tree["enc"]["v"], (0,)), atol=1e-6)
    np.testing.assert_array_equal(out["dec"], tree["dec"])

  def test_a_list_of_axes_suggests_the_tuple(self):
    with self.assertRaisesRegex(ValueError, re.escape(
        "output_axis [1, 2] is a list, which JAX reads as a pytree with one entry per leaf, "
        "not as a set of axes. Write the tuple (1, 2).")):
      optax_gc.centralize([1, 2]).init({"q": jnp.ones((4, 2, 3))})
    # A list that does fit the updates' structure is a per-leaf spec, as any pytree.
    tree = [jnp.ones((2, 3)), jnp.ones((3, 2))]
    out, _ = _apply(optax_gc.centralize([0, 1]), tree)
    np.testing.assert_allclose(out[0], 0.0)

  @parameterized.parameters(1.5, "last")
  def test_a_scalar_of_the_wrong_type(self, value):
    with self.assertRaisesRegex(ValueError, re.escape(
        f"`output_axis` must be an int, a tuple of ints, None, a pytree of those with the "
        f"structure of the updates, or a callable params -> such a pytree; got {value!r} "
        f"({type(value).__name__}).")):
      optax_gc.centralize(value).init({"w": jnp.ones((2, 3))})


class PassThroughTest(chex.TestCase):
  """Leaves that must come out bit for bit as they went in."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_pass_through_leaves(self):
    tree = {
        "bias": jnp.array([1.0, 2.0, 3.0]),
        "scalar": jnp.array(4.0),
        "int_kernel": jnp.arange(6, dtype=jnp.int32).reshape(2, 3),
        "empty": jnp.zeros((0, 4)),
        "empty_out": jnp.zeros((3, 0)),
        "fan_in_one": jnp.array([[1.0, 2.0, 3.0]]),  # (in=1, out=3)
        "axis_none": jnp.arange(6.0).reshape(2, 3),
        "bool_kernel": jnp.ones((2, 2), bool),
    }
    spec = {k: (None if k == "axis_none" else -1) for k in tree}
    tx = optax_gc.centralize(spec)
    out = self.variant(lambda g: _apply(tx, g)[0])(tree)
    for k, v in tree.items():
      self.assertEqual(out[k].dtype, v.dtype, msg=k)
      np.testing.assert_array_equal(out[k], v, err_msg=k)
      self.assertFalse(np.isnan(np.asarray(out[k], np.complex128)).any(), msg=k)

  def test_min_ndim_gcc_leaves_dense_alone(self):
    tree = {"dense": jnp.arange(6.0).reshape(3, 2), "conv": jnp.arange(24.0).reshape(2, 2, 3, 2)}
    out, _ = _apply(optax_gc.centralize(min_ndim=3), tree)
    np.testing.assert_array_equal(out["dense"], tree["dense"])
    np.testing.assert_allclose(out["conv"], _np_gc(tree["conv"], (-1,)), atol=1e-6)

  def test_none_and_masked_node(self):
    tree = {"w": jnp.arange(6.0).reshape(3, 2), "frozen": None, "m": optax.MaskedNode()}
    out, _ = _apply(optax_gc.centralize(), tree)
    self.assertIsNone(out["frozen"])
    self.assertIsInstance(out["m"], optax.MaskedNode)
    np.testing.assert_allclose(out["w"], _np_gc(tree["w"], (-1,)), atol=1e-6)

  def test_removed_fraction_keeps_none_and_masked_node(self):
    tree = {"w": jnp.ones((3, 2)), "frozen": None, "m": optax.MaskedNode()}
    r = optax_gc.gc_removed_fraction(tree)
    self.assertIsNone(r["frozen"])
    self.assertIsInstance(r["m"], optax.MaskedNode)


class ErrorTest(chex.TestCase):
  """Bad input raises a ValueError at trace time naming the leaf and its shape."""

  def _assert_trace_error(self, tx, updates, pattern):
    # jax.eval_shape only traces: the error must come from tracing, not from running.
    with self.assertRaisesRegex(ValueError, pattern):
      jax.eval_shape(lambda g: tx.update(g, optax.EmptyState())[0], updates)
    with self.assertRaisesRegex(ValueError, pattern):
      jax.jit(lambda g: tx.update(g, optax.EmptyState())[0])(updates)

  def test_axis_out_of_range(self):
    tree = {"layer": {"kernel": jnp.ones((3, 4))}}
    self._assert_trace_error(
        optax_gc.centralize(2), tree,
        re.escape("output_axis 2 is out of range for leaf ['layer']['kernel'] with shape (3, 4)"),
    )

  def test_axis_out_of_range_not_raised_for_pass_through_leaf(self):
    out, _ = _apply(optax_gc.centralize(3), {"bias": jnp.ones(4)})
    np.testing.assert_array_equal(out["bias"], jnp.ones(4))

  def test_duplicate_axis(self):
    self._assert_trace_error(
        optax_gc.centralize((1, -2)), {"q": jnp.ones((4, 2, 3))},
        re.escape("names the same axis twice for leaf ['q'] with shape (4, 2, 3)"),
    )

  def test_non_int_axis(self):
    self._assert_trace_error(
        optax_gc.centralize({"w": 1.5}), {"w": jnp.ones((2, 2))},
        re.escape("must be ints, got 1.5 for leaf ['w'] with shape (2, 2)"),
    )

  def test_spec_structure_mismatch(self):
    tree = {"a": jnp.ones((2, 2)), "b": {"kernel": jnp.ones((3, 3))}}
    self._assert_trace_error(
        optax_gc.centralize({"a": -1, "b": {"weight": 0}}), tree,
        re.escape("no entry for leaf ['b']['kernel'] with shape (3, 3)"),
    )

  def test_mask_structure_mismatch(self):
    tree = {"a": jnp.ones((2, 2)), "b": jnp.ones((3, 3))}
    self._assert_trace_error(
        optax_gc.centralize(mask={"a": True}), tree,
        re.escape("`mask` tree does not match the structure of the updates: no entry for "
                  "leaf ['b'] with shape (3, 3)"),
    )

  def test_a_list_inside_a_spec_tree_names_the_leaf_and_the_tuple(self):
    tree = {"dense": {"kernel": jnp.ones((4, 2, 3)), "bias": jnp.ones(3)}}
    self._assert_trace_error(
        optax_gc.centralize({"dense": {"kernel": [1, 2], "bias": None}}), tree,
        re.escape("at leaf ['dense']['kernel'] with shape (4, 2, 3): the `output_axis` tree has "
                  "the list [1, 2] there") + ".*" + re.escape("write the tuple (1, 2)."),
    )

  def test_spec_with_an_extra_entry(self):
    tree = {"a": jnp.ones((2, 2))}
    self._assert_trace_error(optax_gc.centralize({"a": -1, "b": 0}), tree,
                             re.escape("it has an entry at ['b'], where the updates have none"))

  def test_mask_entry_must_be_a_bool(self):
    # Optax masks hold one bool per leaf; an array of bools is not a per-element mask.
    tree = {"w": jnp.ones((2, 3))}
    self._assert_trace_error(
        optax_gc.centralize(mask={"w": jnp.array([True, False])}), tree,
        re.escape("`mask` entries must be a bool or None, one per leaf or sub-tree; got an "
                  "array of shape (2,) and dtype bool for leaf ['w'] with shape (2, 3)."),
    )
    out, _ = _apply(optax_gc.centralize(mask={"w": np.bool_(False)}), tree)
    np.testing.assert_array_equal(out["w"], tree["w"])

  def test_no_error_prints_array_values(self):
    # Distinctive values: none of them, and no array repr, may appear in any message.
    params = {"dense": {"kernel": jnp.full((3, 4), 7.25), "bias": jnp.full((4,), 3.5)}}
    specs = [
        dict(output_axis={"dense": {"kernel": [0, 1], "bias": None}}),
        dict(output_axis=[params]),  # a top-level list holding the params themselves
        dict(output_axis=[0, 1]),
        dict(output_axis={"dense": [1]}),
        dict(output_axis={"dense": {"kernel": (0, 1.5), "bias": None}}),
        dict(output_axis={"dense": {"kernel": 1}}),
        dict(output_axis={"dense": {"kernel": jnp.full((2,), 6.75), "bias": None}}),
        dict(output_axis=lambda p: {"dense": {"kernel": [1], "bias": None}}),
        dict(output_axis=np.full((2,), 6.75)),
        dict(output_axis=1.5),
        dict(mask={"dense": {"kernel": [True], "bias": None}}),
        dict(mask=[params]),
        dict(mask={"dense": {"kernel": jnp.array([True, False]), "bias": True}}),
        dict(mask=np.array([True, False])),
        dict(mask=0.5),
        dict(min_ndim=jnp.array(7)),
    ]
    for kwargs in specs:
      with self.subTest(**{k: type(v).__name__ for k, v in kwargs.items()}):
        with self.assertRaises(ValueError) as e:
          optax_gc.centralize(**kwargs).init(params)
        msg = str(e.exception)
        for value in ("7.25", "3.5", "6.75", "Array(", "array(", "True, False"):
          self.assertNotIn(value, msg)
        self.assertLess(len(msg), 400, msg)

  def test_bad_min_ndim(self):
    self._assert_trace_error(optax_gc.centralize(min_ndim=0), {"a": jnp.ones((2, 2))}, "min_ndim")

  def test_init_checks_params(self):
    with self.assertRaisesRegex(ValueError, re.escape("['w'] with shape (2, 3)")):
      optax_gc.centralize(5).init({"w": jnp.ones((2, 3))})


class DtypeTest(chex.TestCase):
  """Low precision, complex, NumPy and Python-scalar leaves."""

  @parameterized.parameters(jnp.bfloat16, jnp.float16)
  def test_low_precision_against_float32(self, dtype):
    # A large fan-in with a big common offset: a mean accumulated in bf16/f16
    # would be far off; ours is accumulated in float32.
    rng = np.random.default_rng(0)
    g32 = (3.0 + 0.5 * rng.normal(size=(4096, 8))).astype(np.float32)
    g = jnp.asarray(g32, dtype)
    out = jax.jit(lambda g: _apply(optax_gc.centralize(), g)[0])(g)
    self.assertEqual(out.dtype, dtype)
    ref = _np_gc(np.asarray(g, np.float64), (-1,))  # exact GC of the rounded input
    err = np.abs(np.asarray(out, np.float64) - ref)
    eps = float(jnp.finfo(dtype).eps)
    # Error within one rounding of the input's scale (|g| <= ~6).
    self.assertLess(err.max(), 6 * eps)
    np.testing.assert_allclose(np.asarray(out, np.float64).mean(0), 0.0, atol=6 * eps)
    # The naive mean in the low dtype is visibly worse: the test can tell them apart.
    naive = g - jnp.mean(g, axis=0, keepdims=True, dtype=dtype)
    naive_err = np.abs(np.asarray(naive, np.float64) - ref).max()
    self.assertGreater(naive_err, err.max())

  @chex.variants(with_jit=True, without_jit=True)
  def test_complex_leaves_are_centralized_part_by_part(self):
    re = jnp.arange(12.0).reshape(2, 3, 2) ** 2
    im = jnp.cos(jnp.arange(12.0)).reshape(2, 3, 2)
    g = {"w": (re + 1j * im).astype(jnp.complex64)}
    out = self.variant(lambda g: _apply(optax_gc.centralize(), g)[0])(g)["w"]
    self.assertEqual(out.dtype, jnp.complex64)
    np.testing.assert_allclose(out.real, _np_gc(re, (-1,)), atol=1e-4)
    np.testing.assert_allclose(out.imag, _np_gc(im, (-1,)), atol=1e-6)
    np.testing.assert_allclose(out, optax.centralize().update(
        jnp.moveaxis(g["w"], -1, 0), None)[0].transpose(1, 2, 0), atol=1e-4)

  def test_python_scalar_and_numpy_leaves(self):
    """Python scalars pass through; NumPy kernels are centralized with JAX's dtype rules."""
    g = {"lr": 0.5, "w": np.arange(6.0).reshape(3, 2)}  # float64, with x64 off.
    out, _ = _apply(optax_gc.centralize(), g)
    self.assertEqual(out["lr"], 0.5)
    self.assertEqual(out["w"].dtype, jnp.float32)
    np.testing.assert_allclose(out["w"], _np_gc(g["w"], (-1,)), atol=1e-6)


class RemovedFractionTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_values(self):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(5, 3)).astype(np.float32) + 2.0
    tree = {"w": jnp.asarray(w), "b": jnp.ones(3), "zero": jnp.zeros((2, 2))}
    r = self.variant(optax_gc.gc_removed_fraction)(tree)
    removed = w - _np_gc(w, (-1,))
    np.testing.assert_allclose(r["w"], np.linalg.norm(removed) / np.linalg.norm(w), rtol=1e-5)
    self.assertEqual(float(r["b"]), 0.0)
    self.assertEqual(float(r["zero"]), 0.0)  # no NaN for a zero gradient
    for v in jax.tree.leaves(r):
      self.assertEqual(v.dtype, jnp.float32)

  def test_centered_gradient_has_zero_fraction(self):
    g = jnp.asarray(_np_gc(np.arange(12.0).reshape(4, 3) ** 2, (-1,)), jnp.float32)
    self.assertLess(float(optax_gc.gc_removed_fraction(g)), 1e-6)

  def test_follows_output_axis(self):
    g = jnp.array([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])  # constant: all of it is mean
    self.assertAlmostEqual(float(optax_gc.gc_removed_fraction(g)), 1.0, places=6)
    self.assertAlmostEqual(float(optax_gc.gc_removed_fraction(g, min_ndim=3)), 0.0)


if __name__ == "__main__":
  absltest.main()
