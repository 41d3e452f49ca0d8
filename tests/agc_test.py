"""Tests for optax_gc.adaptive_grad_clip: unit-wise clipping over the spec's units."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import real_layers_test as rl
from absl.testing import absltest, parameterized

import optax_gc


def _np_agc(g, p, keep, clipping, eps=1e-3):
  """Reference AGC in NumPy float64, one unit at a time.

  A unit is one index along the ``keep`` axes; its norm runs over all the others. A leaf of
  rank below 2, with ``keep`` ``None``, or whose fan-in has one element is a single unit.
  """
  g, p = np.asarray(g, np.float64), np.asarray(p, np.float64)
  keep = () if keep is None or g.ndim < 2 else tuple(sorted(a % g.ndim for a in keep))
  if np.prod([n for a, n in enumerate(g.shape) if a not in keep]) == 1:
    keep = ()
  out = g.copy()
  for idx in np.ndindex(*[g.shape[a] for a in keep]):
    unit = [slice(None)] * g.ndim
    for a, i in zip(keep, idx, strict=True):
      unit[a] = i
    unit = tuple(unit)
    g_norm, p_norm = np.linalg.norm(g[unit]), np.linalg.norm(p[unit])
    max_norm = clipping * max(p_norm, eps)
    if g_norm >= max_norm:
      out[unit] = g[unit] * max_norm / max(g_norm, 1e-6)
  return out


def _clipped_units(g, out, keep):
  """How many units the clip changed, and how many it left alone."""
  changed = ~np.isclose(np.asarray(g), np.asarray(out), rtol=1e-6, atol=0)
  others = tuple(a for a in range(np.ndim(g)) if a not in keep)
  per_unit = changed.any(axis=others)
  return int(per_unit.sum()), int((~per_unit).sum())


def _draw(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _apply(tx, grads, params):
  return tx.update(grads, tx.init(params), params)[0]


def _dense_conv_model(p, x):
  h = jax.lax.conv_general_dilated(x, p["conv"]["kernel"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  h = jax.nn.relu(h + p["conv"]["bias"]).mean(axis=(1, 2))
  return h @ p["dense"]["kernel"] + p["dense"]["bias"]


def _attention_stack_model(p, x):
  q = jnp.einsum("btd,dnh->btnh", x, p["q"])
  h = jnp.einsum("btnh,nhd->btd", q, p["out"])

  def layer(h, w):
    return jnp.tanh(h @ w), None

  return jax.lax.scan(layer, h, p["stack"])[0]


_DENSE_CONV = {"conv": {"kernel": (3, 3, 4, 5), "bias": (5,)},
               "dense": {"kernel": (5, 7), "bias": (7,)}}
_ATTENTION_STACK = {"q": (6, 2, 3), "out": (2, 3, 6), "stack": (3, 6, 6)}


def _tree(shapes, seed, scale=1.0):
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
  return jax.tree.unflatten(treedef, [scale * _draw(s, seed + i) for i, s in enumerate(leaves)])


class WorkedExampleTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_dense_kernel(self):
    # (in, out): unit norms of the weights 5 and 1, of the gradients 10 and 1.
    params = {"w": jnp.array([[3.0, 1.0], [4.0, 0.0]])}
    grads = {"w": jnp.array([[6.0, 0.0], [8.0, 1.0]])}
    out = self.variant(lambda g, p: _apply(optax_gc.adaptive_grad_clip(0.5), g, p))(
        grads, params)
    # unit 0: 10 > 0.5 * 5, scaled to norm 2.5; unit 1: 1 > 0.5 * 1, scaled to norm 0.5.
    np.testing.assert_allclose(out["w"], [[1.5, 0.0], [2.0, 0.5]], rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_eps_floor_and_unclipped_unit(self):
    # unit 0: zero weights, so the floor eps=0.1 gives a max norm 2 * 0.1; unit 1 is below
    # 2 * 1 and passes unchanged.
    params = {"w": jnp.array([[0.0, 1.0], [0.0, 0.0]])}
    grads = {"w": jnp.array([[3.0, 1.0], [4.0, 1.0]])}
    tx = optax_gc.adaptive_grad_clip(2.0, eps=0.1)
    out = self.variant(lambda g, p: _apply(tx, g, p))(grads, params)
    np.testing.assert_allclose(out["w"], [[0.12, 1.0], [0.16, 1.0]], rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_vector_is_one_unit(self):
    params = {"b": jnp.array([3.0, 4.0])}  # norm 5
    grads = {"b": jnp.array([0.0, 10.0])}
    out = self.variant(lambda g, p: _apply(optax_gc.adaptive_grad_clip(0.1), g, p))(
        grads, params)
    np.testing.assert_allclose(out["b"], [0.0, 0.5], rtol=1e-6)


class MatchesOptaxTest(chex.TestCase):
  """Where Optax's rank rule names the right units (Dense (in, out), Conv HWIO)."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters("default", "inferred", "layout")
  def test_dense_and_conv_equal_optax(self, spec_kind):
    params, grads = _tree(_DENSE_CONV, 0), _tree(_DENSE_CONV, 10)
    x = jax.ShapeDtypeStruct((2, 6, 6, 4), jnp.float32)
    spec = {"default": -1,
            "inferred": optax_gc.infer_output_axes(_dense_conv_model, params, x),
            "layout": optax_gc.infer_layout(_dense_conv_model, params, x)}[spec_kind]
    ours = self.variant(lambda g, p: _apply(optax_gc.adaptive_grad_clip(1.0, spec), g, p))(
        grads, params)
    theirs = _apply(optax.adaptive_grad_clip(1.0), grads, params)
    chex.assert_trees_all_close(ours, theirs, rtol=1e-6, atol=1e-7)
    clipped, kept = _clipped_units(grads["conv"]["kernel"], ours["conv"]["kernel"], (3,))
    self.assertGreater(clipped, 0)
    self.assertGreater(kept, 0)

  def test_conv3d_equals_optax(self):
    params = {"w": _draw((2, 2, 2, 3, 4), 0)}
    grads = {"w": _draw((2, 2, 2, 3, 4), 1)}
    try:
      want = _apply(optax.adaptive_grad_clip(1.0), grads, params)
    except ValueError as e:  # optax <= 0.2.4 clips kernels of rank <= 4 only
      self.skipTest(f"this optax's adaptive_grad_clip refuses a rank-5 kernel: {e}")
    chex.assert_trees_all_close(_apply(optax_gc.adaptive_grad_clip(1.0), grads, params), want,
                                rtol=1e-6)


class UnitsFromTheModelTest(chex.TestCase):
  """Attention kernels and a scanned stack: the spec's units, not Optax's rank rule."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_equals_numpy_reference_and_differs_from_optax(self):
    params, grads = _tree(_ATTENTION_STACK, 0), _tree(_ATTENTION_STACK, 10)
    x = jax.ShapeDtypeStruct((2, 5, 6), jnp.float32)
    spec = optax_gc.infer_output_axes(_attention_stack_model, params, x)
    self.assertEqual(spec, {"q": (1, 2), "out": (2,), "stack": (0, 2)})
    ours = self.variant(lambda g, p: _apply(optax_gc.adaptive_grad_clip(1.0, spec), g, p))(
        grads, params)
    theirs = _apply(optax.adaptive_grad_clip(1.0), grads, params)
    for k in params:
      np.testing.assert_allclose(ours[k], _np_agc(grads[k], params[k], spec[k], 1.0),
                                 rtol=1e-5, atol=1e-6, err_msg=k)
      clipped, kept = _clipped_units(grads[k], ours[k], spec[k])
      self.assertTrue(clipped and kept, (k, clipped, kept))
    # Optax norms over axis 0 of every rank-3 leaf: right for q (in, heads, head_dim), wrong
    # for out (heads, head_dim, out) and for the stack (layers, in, out).
    np.testing.assert_allclose(ours["q"], theirs["q"], rtol=1e-6)
    self.assertFalse(np.allclose(ours["out"], theirs["out"]))
    self.assertFalse(np.allclose(ours["stack"], theirs["stack"]))

  def test_random_layouts_equal_numpy_reference(self):
    rng = np.random.default_rng(0)
    for seed in range(8):
      ndim = int(rng.integers(2, 5))
      shape = tuple(int(n) for n in rng.integers(1, 5, size=ndim))
      keep = tuple(sorted(int(a) for a in rng.choice(ndim, int(rng.integers(1, ndim)), False)))
      g, p = _draw(shape, seed), _draw(shape, seed + 100)
      out = _apply(optax_gc.adaptive_grad_clip(0.8, keep), g, p)
      np.testing.assert_allclose(out, _np_agc(g, p, keep, 0.8), rtol=1e-5, atol=1e-6,
                                 err_msg=str((shape, keep)))


class LayoutSpecTest(chex.TestCase):

  def test_layout_leaf_is_its_output_and_stack_axes(self):
    # A scanned (layers, in, out) stack: units along layers and out, for AGC and for GC.
    params, grads = {"w": _draw((3, 4, 5), 0)}, {"w": _draw((3, 4, 5), 1)}
    layout = {"w": optax_gc.Layout(fan_in=(1,), output=(2,), stack=(0,))}
    for tx, by_spec in ((optax_gc.adaptive_grad_clip(1.0, layout),
                         optax_gc.adaptive_grad_clip(1.0, {"w": (0, 2)})),
                        (optax_gc.centralize(layout), optax_gc.centralize({"w": (0, 2)}))):
      chex.assert_trees_all_close(_apply(tx, grads, params), _apply(by_spec, grads, params))
    np.testing.assert_allclose(_apply(optax_gc.adaptive_grad_clip(1.0, layout), grads,
                                      params)["w"],
                               _np_agc(grads["w"], params["w"], (0, 2), 1.0), rtol=1e-5)


class PassThroughAndErrorsTest(chex.TestCase):

  def test_pass_through_leaves(self):
    params = {"i": jnp.arange(4), "none": None, "empty": jnp.zeros((0, 3)),
              "w": jnp.ones((2, 2))}
    grads = {"i": jnp.arange(4) * 100, "none": None, "empty": jnp.zeros((0, 3)),
             "w": jnp.full((2, 2), 100.0)}
    out = _apply(optax_gc.adaptive_grad_clip(0.1), grads, params)
    np.testing.assert_array_equal(out["i"], grads["i"])
    self.assertIsNone(out["none"])
    self.assertEqual(out["empty"].shape, (0, 3))
    np.testing.assert_allclose(out["w"], np.full((2, 2), 0.1), rtol=1e-6)

  def test_inside_optax_masked(self):
    params = {"head": jnp.ones((2, 2)), "body": jnp.ones((2, 2))}
    grads = jax.tree.map(lambda p: 100 * p, params)
    tx = optax.masked(optax_gc.adaptive_grad_clip(0.1), {"head": False, "body": True})
    out = _apply(tx, grads, params)
    np.testing.assert_array_equal(out["head"], grads["head"])
    np.testing.assert_allclose(out["body"], np.full((2, 2), 0.1), rtol=1e-6)

  def test_needs_params(self):
    tx = optax_gc.adaptive_grad_clip(0.1)
    g = {"w": jnp.ones((2, 2))}
    with self.assertRaisesRegex(ValueError, "needs the params"):
      tx.update(g, tx.init(g))

  def test_bad_axis_names_the_leaf(self):
    params = {"layer": {"w": jnp.ones((2, 3))}}
    with self.assertRaisesRegex(ValueError, r"out of range for leaf \['layer'\]\['w'\] with "
                                r"shape \(2, 3\)"):
      optax_gc.adaptive_grad_clip(0.1, 5).init(params)

  def test_bfloat16_matches_float32(self):
    g, p = _draw((8, 4), 0), _draw((8, 4), 1)
    out16 = _apply(optax_gc.adaptive_grad_clip(0.7), jnp.asarray(g, jnp.bfloat16),
                   jnp.asarray(p, jnp.bfloat16))
    self.assertEqual(out16.dtype, jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(out16, np.float32), _np_agc(g, p, (1,), 0.7),
                               rtol=2e-2, atol=2e-2)

  def test_inject_hyperparams(self):
    params, grads = _tree(_ATTENTION_STACK, 0), _tree(_ATTENTION_STACK, 10)
    spec = {"q": (1, 2), "out": (2,), "stack": (0, 2)}
    tx = optax.inject_hyperparams(optax_gc.adaptive_grad_clip)(clipping=1.0, output_axis=spec)
    out = jax.jit(lambda g, s, p: tx.update(g, s, p)[0])(grads, tx.init(params), params)
    chex.assert_trees_all_close(out, _apply(optax_gc.adaptive_grad_clip(1.0, spec), grads,
                                            params), rtol=1e-6)

  def test_inject_hyperparams_int_axis(self):
    # An injected int output_axis arrives as a traced array: one branch per axis.
    params, grads = {"w": _draw((3, 4, 5), 0)}, {"w": _draw((3, 4, 5), 1)}
    tx = optax.inject_hyperparams(optax_gc.adaptive_grad_clip)(clipping=1.0, output_axis=1)
    out = jax.jit(lambda g, s, p: tx.update(g, s, p)[0])(grads, tx.init(params), params)
    np.testing.assert_allclose(out["w"], _np_agc(grads["w"], params["w"], (1,), 1.0),
                               rtol=1e-5, atol=1e-6)


# Real layers of each framework: the inferred spec's clip equals the NumPy reference on the
# hand-written table that real_layers_test checks against each layer's Jacobian.
_REAL = ("nnx_linear", "nnx_conv2d_grouped", "nnx_multi_head_attention", "nnx_scan_stack",
         "linen_dense", "linen_multi_head_attention", "linen_scan_remat", "haiku_conv2d",
         "haiku_multi_head_attention", "eqx_linear", "eqx_conv2d", "eqx_multihead_attention")


@pytest.mark.parametrize("name", _REAL)
def test_real_layers_equal_numpy_reference(name):
  layer = rl.build(name)
  spec = optax_gc.infer_output_axes(layer.fn, layer.params, *layer.args)
  params = layer.params
  leaves, treedef = jax.tree.flatten(params)
  grads = jax.tree.unflatten(treedef, [3 * _draw(np.shape(x), i) for i, x in enumerate(leaves)])
  tx = optax_gc.adaptive_grad_clip(1.0, spec)
  out = jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(grads, params)
  got, g_by, p_by = rl._flat(out), rl._flat(grads), rl._flat(params)
  assert set(got) == set(layer.expected)
  for k, keep in layer.expected.items():
    np.testing.assert_allclose(got[k], _np_agc(g_by[k], p_by[k], keep, 1.0), rtol=1e-5,
                               atol=1e-6, err_msg=f"{name}: {k}")


if __name__ == "__main__":
  absltest.main()
