"""Tests for optax_gc.muon_dimension_numbers: Muon on each leaf's true matrices.

The reference reshapes every weight by hand into its separate 2-D matrices (stack axes first,
then the fan-in, then the output axes, as ``(batch, fan_in, out)``), and runs Optax's Muon
with its default 2-D rule on those slices, or orthogonalizes them with a NumPy Newton-Schulz.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import real_layers_test as rl
from absl.testing import absltest, parameterized

import optax_gc
from optax_gc import Layout

if not hasattr(optax.contrib, "MuonDimensionNumbers"):
  pytest.skip(f"optax {optax.__version__} has no optax.contrib.MuonDimensionNumbers",
              allow_module_level=True)

pytestmark = pytest.mark.usefixtures("fast_compiles")  # conftest.py, at the root

Dims = optax.contrib.MuonDimensionNumbers

# name: (shape, layout, dimension numbers expected)
_CASES = {
    "stack": ((3, 6, 5), Layout((1,), (2,), (0,)), Dims((1,), (2,))),  # scanned (L, in, out)
    "experts": ((4, 6, 5), Layout((1,), (2,), (0,)), Dims((1,), (2,))),  # "ecd,edf->ecf"
    "q": ((6, 2, 3), Layout((0,), (1, 2)), Dims((0,), (1, 2))),  # (in, heads, head_dim)
    "attn_out": ((2, 3, 6), Layout((0, 1), (2,)), Dims((0, 1), (2,))),  # (heads, hd, out)
    "conv": ((3, 3, 4, 5), Layout((0, 1, 2), (3,)), Dims((0, 1, 2), (3,))),  # HWIO
    "out_in": ((5, 7), Layout((1,), (0,)), Dims((1,), (0,))),  # stored (out, in)
    "bias": ((5,), None, None),
    "depthwise": ((3, 3, 1, 4), Layout((0, 1, 2), (), (3,)), None),  # one output per filter
    "head": ((6, 10), Layout((0,), (1,), head=True), None),
}
_SHAPES = {k: v[0] for k, v in _CASES.items()}
_LAYOUT = {k: v[1] for k, v in _CASES.items()}


def _draw(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _tree(shapes, seed):
  return {k: jnp.asarray(_draw(s, seed + i)) for i, (k, s) in enumerate(shapes.items())}


def _matrices(shape, lay):
  """``(perm, (batch, fan_in, out))``: how to cut a leaf into its matrices, by hand."""
  named = lay.fan_in + lay.output + lay.stack
  batch = tuple(sorted(lay.stack + tuple(a for a in range(len(shape)) if a not in named)))
  size = lambda axes: math.prod(shape[a] for a in axes)  # noqa: E731
  return batch + lay.fan_in + lay.output, (size(batch), size(lay.fan_in), size(lay.output))


def _split(x, lay):
  """A leaf as a list of its 2-D matrices (fan_in, out); ``None`` layout: flat, for Adam."""
  if lay is None:
    return jnp.ravel(x)
  perm, flat = _matrices(x.shape, lay)
  y = jnp.transpose(x, perm).reshape(flat)
  return [y[i] for i in range(flat[0])]


def _merge(mats, shape, lay):
  if lay is None:
    return jnp.reshape(mats, shape)
  perm, _ = _matrices(shape, lay)
  y = jnp.stack(mats).reshape(tuple(shape[a] for a in perm))
  return jnp.transpose(y, np.argsort(perm))


def _reference_muon(grads_steps, params, layout, **muon_kwargs):
  """Optax's Muon with its default 2-D rule on the matrices cut by hand, merged back."""
  lays = rl._flat(layout, is_leaf=lambda x: x is None or isinstance(x, Layout))
  flat_params = rl._flat(params)
  split = lambda tree: {k: _split(x, lays[k]) for k, x in rl._flat(tree).items()}  # noqa: E731
  updates = jax.jit(_run, static_argnums=0)(
      optax.contrib.muon(**muon_kwargs), [split(g) for g in grads_steps], split(params))
  return {k: _merge(v, np.shape(flat_params[k]), lays[k]) for k, v in updates.items()}


def _run(tx, grads_steps, params):
  state = tx.init(params)
  for g in grads_steps:
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
  return updates


def _np_orthogonalize(m, coeffs=(3.4445, -4.7750, 2.0315), steps=5, eps=1e-8):
  """Muon's quintic Newton-Schulz iteration on one matrix, in NumPy float64."""
  x = np.asarray(m, np.float64)
  wide = x.shape[0] <= x.shape[1]
  x = x if wide else x.T
  x = x / (np.linalg.norm(x) + eps)
  a, b, c = coeffs
  for _ in range(steps):
    s = x @ x.T
    x = a * x + (b * s + c * s @ s) @ x
  return x if wide else x.T


class DimensionNumbersTest(parameterized.TestCase):

  def test_each_case(self):
    params = _tree(_SHAPES, 0)
    dims = optax_gc.muon_dimension_numbers(_LAYOUT, params)
    self.assertEqual(dims, {k: v[2] for k, v in _CASES.items()})

  def test_head_kept_on_request(self):
    dims = optax_gc.muon_dimension_numbers(_LAYOUT, _tree(_SHAPES, 0), exclude_head=False)
    self.assertEqual(dims["head"], Dims((0,), (1,)))

  def test_single_element_fan_in_or_output_goes_to_adam(self):
    params = {"a": jnp.ones((1, 4)), "b": jnp.ones((4, 1)), "c": jnp.ones((2, 1, 4))}
    layout = {"a": Layout((0,), (1,)), "b": Layout((0,), (1,)), "c": Layout((1,), (2,), (0,))}
    self.assertEqual(optax_gc.muon_dimension_numbers(layout, params),
                     {"a": None, "b": None, "c": None})

  def test_shapes_only_and_pass_through(self):
    params = {"w": jax.ShapeDtypeStruct((4, 3), jnp.bfloat16), "i": jnp.ones((4, 3), jnp.int32),
              "none": None}
    lay = Layout((0,), (1,))
    self.assertEqual(
        optax_gc.muon_dimension_numbers({"w": lay, "i": lay, "none": None}, params),
        {"w": Dims((0,), (1,)), "i": None, "none": None})

  def test_one_layout_or_a_callable(self):
    params = {"a": jnp.ones((3, 4)), "b": jnp.ones((5, 2))}
    lay = Layout((1,), (0,))
    want = {"a": Dims((1,), (0,)), "b": Dims((1,), (0,))}
    self.assertEqual(optax_gc.muon_dimension_numbers(lay, params), want)
    self.assertEqual(
        optax_gc.muon_dimension_numbers(lambda p: jax.tree.map(lambda _: lay, p), params),
        want)

  def test_prefix_tree(self):
    params = {"block": {"w1": jnp.ones((3, 4)), "w2": jnp.ones((4, 3))}}
    self.assertEqual(optax_gc.muon_dimension_numbers({"block": Layout((0,), (1,))}, params),
                     {"block": {"w1": Dims((0,), (1,)), "w2": Dims((0,), (1,))}})

  @parameterized.parameters(
      (Layout((0,), (0,)), "names an axis twice"),
      (Layout((0,), (3,)), r"output \(3,\) is out of range"),
      (Layout((0,), (1,)), r"leaves axes \(2,\)"),
      (Layout(0, (1,)), "fan_in must be a tuple of ints"),
  )
  def test_bad_layout_names_the_leaf(self, lay, words):
    params = {"layer": {"w": jnp.ones((2, 3, 4)), "b": jnp.ones(4)}}
    with self.assertRaisesRegex(ValueError, words + r".*leaf \['layer'\]\['w'\] with shape "
                                r"\(2, 3, 4\)"):
      optax_gc.muon_dimension_numbers({"layer": {"w": lay, "b": None}}, params)

  def test_tree_that_does_not_fit_names_the_leaf(self):
    with self.assertRaisesRegex(ValueError, r"`layout` tree does not match.*\['b'\]"):
      optax_gc.muon_dimension_numbers({"a": None}, {"a": jnp.ones(2), "b": jnp.ones((2, 2))})


class MuonEqualsHandCutMatricesTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_three_steps_equal_reference(self):
    params = _tree(_SHAPES, 0)
    grads_steps = [_tree(_SHAPES, 10 * (s + 1)) for s in range(3)]
    dims = optax_gc.muon_dimension_numbers(_LAYOUT, params)
    tx = optax.contrib.muon(0.02, muon_weight_dimension_numbers=dims)
    got = self.variant(lambda gs, p: _run(tx, gs, p))(grads_steps, params)
    to_muon = {k: v[1] if v[2] else None for k, v in _CASES.items()}  # the rest to Adam
    want = _reference_muon(grads_steps, params, to_muon, learning_rate=0.02)
    chex.assert_trees_all_close(got, want, rtol=2e-5, atol=2e-6)
    # Optax's own default cuts these leaves otherwise: the stored (out, in) kernel's width
    # scale is inverted, and the 3-D and 4-D kernels go to Adam.
    default = _run(optax.contrib.muon(0.02), grads_steps, params)
    for k in ("out_in", "stack", "experts", "q", "attn_out", "conv"):
      self.assertFalse(np.allclose(default[k], got[k], rtol=1e-3), k)

  def test_first_step_equals_numpy_newton_schulz(self):
    # beta=0, no Nesterov: the update is -lr * sqrt(max(1, out / fan_in)) * NS(g) per matrix.
    params, grads = _tree(_SHAPES, 0), _tree(_SHAPES, 10)
    dims = optax_gc.muon_dimension_numbers(_LAYOUT, params)
    tx = optax.contrib.muon(0.1, beta=0.0, nesterov=False, muon_weight_dimension_numbers=dims)
    got = _run(tx, [grads], params)
    for k, (shape, lay, d) in _CASES.items():
      g = np.asarray(grads[k], np.float64)
      if d is None:  # Adam's first step: -lr * g / (|g| + eps)
        np.testing.assert_allclose(got[k], -0.1 * g / (np.abs(g) + 1e-8), rtol=1e-5,
                                   err_msg=k)
        continue
      perm, (batch, fan_in, out) = _matrices(shape, lay)
      mats = np.transpose(g, perm).reshape(batch, fan_in, out)
      orth = np.stack([_np_orthogonalize(m) for m in mats])
      want = np.transpose(orth.reshape([shape[a] for a in perm]), np.argsort(perm))
      want = -0.1 * math.sqrt(max(1.0, out / fan_in)) * want
      np.testing.assert_allclose(got[k], want, rtol=1e-3, atol=1e-5, err_msg=k)


def _plain_model(p, x):
  """Conv, attention q and out, an (out, in)-stored dense and a head: no stacks."""
  h = jax.lax.conv_general_dilated(x, p["conv"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  h = h.reshape(h.shape[0], -1, h.shape[-1])  # (batch, tokens, 6)
  q = jnp.einsum("btd,dnh->btnh", h, p["q"]) + p["q_bias"]
  h = jnp.einsum("btnh,nhd->btd", jax.nn.softmax(q, axis=-2), p["attn_out"])
  h = jnp.einsum("btd,od->bto", jnp.tanh(h), p["out_in"])
  return h.mean(axis=1) @ p["head"]


_PLAIN = {"conv": (3, 3, 4, 6), "q": (6, 2, 3), "q_bias": (2, 3), "attn_out": (2, 3, 6),
          "out_in": (5, 6), "head": (5, 7)}
_PLAIN_LAYOUT = {"conv": Layout((0, 1, 2), (3,)), "q": Layout((0,), (1, 2)), "q_bias": None,
                 "attn_out": Layout((0, 1), (2,)), "out_in": Layout((1,), (0,)),
                 "head": Layout((0,), (1,))}


def _np_gc(g, lay):
  g = np.asarray(g, np.float64)
  return g if lay is None else g - g.mean(axis=lay.fan_in, keepdims=True)


def test_gc_and_muon_read_the_same_inferred_layout():
  """One step of optax.chain(centralize(layout), muon(dims)) against GC and Muon by hand."""
  params = _tree(_PLAIN, 0)
  grads = _tree(_PLAIN, 10)
  x = jax.ShapeDtypeStruct((2, 4, 4, 4), jnp.float32)
  layout = optax_gc.infer_layout(_plain_model, params, x)
  assert {k: (v.fan_in, v.output, v.stack) for k, v in layout.items() if v} == {
      k: (v.fan_in, v.output, v.stack) for k, v in _PLAIN_LAYOUT.items() if v}
  assert layout["q_bias"] is None
  dims = optax_gc.muon_dimension_numbers(layout, params, exclude_head=False)
  tx = optax.chain(optax_gc.centralize(layout),
                   optax.contrib.muon(0.1, beta=0.0, nesterov=False,
                                      muon_weight_dimension_numbers=dims))
  got = jax.jit(lambda g, p: _run(tx, [g], p))(grads, params)
  # The same layout as centralize's output axes: GC equals GC on infer_output_axes' spec.
  spec = optax_gc.infer_output_axes(_plain_model, params, x)
  chex.assert_trees_all_close(
      optax_gc.centralize(layout).update(grads, optax.EmptyState())[0],
      optax_gc.centralize(spec).update(grads, optax.EmptyState())[0])
  for k, lay in _PLAIN_LAYOUT.items():
    g = _np_gc(grads[k], lay)
    if lay is None:
      np.testing.assert_allclose(got[k], -0.1 * g / (np.abs(g) + 1e-8), rtol=1e-5)
      continue
    perm, (batch, fan_in, out) = _matrices(g.shape, lay)
    orth = np.stack([_np_orthogonalize(m)
                     for m in np.transpose(g, perm).reshape(batch, fan_in, out)])
    want = np.transpose(orth.reshape([g.shape[a] for a in perm]), np.argsort(perm))
    np.testing.assert_allclose(got[k], -0.1 * math.sqrt(max(1.0, out / fan_in)) * want,
                               rtol=1e-3, atol=1e-5, err_msg=k)


# Real layers of each framework (no stacks, so the layout has no stack axes): Muon on the
# inferred dimension numbers equals the reference cut by the hand-written table that
# real_layers_test checks against each layer's Jacobian. exclude_head=False, as each layer's
# last kernel is its model's head here.
_REAL = ("nnx_linear", "nnx_multi_head_attention", "linen_dense", "linen_multi_head_attention",
         "haiku_conv2d", "haiku_multi_head_attention", "eqx_linear", "eqx_conv2d",
         "eqx_multihead_attention")


def _table_layout(layer):
  """The Layout of each leaf from the hand-written output axes (no stacks)."""
  shapes = {k: np.shape(x) for k, x in rl._flat(layer.params).items()}
  return {k: None if out is None else
          Layout(tuple(a for a in range(len(shapes[k])) if a not in out), out)
          for k, out in layer.expected.items()}


@pytest.mark.parametrize("name", _REAL)
def test_real_layers_equal_reference(name):
  layer = rl.build(name)
  params = layer.params
  layout = optax_gc.infer_layout(layer.fn, params, *layer.args)
  dims = optax_gc.muon_dimension_numbers(layout, params, exclude_head=False)
  resolved = dims(params) if name.startswith("eqx") else dims  # an Equinox tree is wrapped
  table = _table_layout(layer)
  by_key = rl._flat(resolved, is_leaf=lambda x: x is None or isinstance(x, Dims))
  assert {k: by_key[k] for k in table} == {k: None if v is None else Dims(v.fan_in, v.output)
                                           for k, v in table.items()}, name
  assert all(by_key[k] is None for k in set(by_key) - set(table))  # Equinox's non-arrays
  leaves, treedef = jax.tree.flatten(params)
  grads_steps = [jax.tree.unflatten(treedef, [_draw(np.shape(x), 10 * s + i)
                                              for i, x in enumerate(leaves)])
                 for s in range(2)]
  tx = optax.contrib.muon(0.02, muon_weight_dimension_numbers=dims)
  got = rl._flat(jax.jit(lambda gs, p: _run(tx, gs, p))(grads_steps, params))
  # The reference, on plain dicts keyed by path.
  flat = lambda t: rl._flat(t)  # noqa: E731
  want = _reference_muon([flat(g) for g in grads_steps], flat(params),
                         {k: table[k] for k in flat(params)}, learning_rate=0.02)
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=2e-6, err_msg=f"{name}: {k}")


@pytest.mark.parametrize("name", ["nnx_embed_lookup", "linen_embed_lookup",
                                  "haiku_embed_array_index", "eqx_embedding"])
def test_lookup_tables_go_to_adam(name):
  """A table used only by a lookup has no layout by default, so Muon's Adam gets it."""
  layer = rl.build(name)
  layout = optax_gc.infer_layout(layer.fn, layer.params, *layer.args)
  dims = optax_gc.muon_dimension_numbers(layout, layer.params)
  resolved = dims(layer.params) if name.startswith("eqx") else dims
  assert list(jax.tree.leaves(resolved, is_leaf=lambda x: isinstance(x, Dims))) == []
  (table,) = jax.tree.leaves(layer.params)
  assert np.ndim(table) == 2  # so Optax's own default rule would put it on Muon


def test_nnx_optimizer():
  """nnx.Optimizer with GC and Muon on the pure state's layout, against the functional step."""
  from flax import nnx

  layer = rl.build("nnx_multi_head_attention")
  model = layer.nnx_model
  pure = nnx.as_pure(nnx.state(model, nnx.Param))
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  layout = optax_gc.infer_layout(lambda p, x: nnx.merge(graphdef, p, rest)(x), pure,
                                 *layer.args)
  dims = optax_gc.muon_dimension_numbers(layout, pure, exclude_head=False)
  assert dims["query"]["kernel"] == Dims((0,), (1, 2))
  assert dims["out"]["kernel"] == Dims((0, 1), (2,))
  tx = optax.chain(optax_gc.centralize(layout),
                   optax.contrib.muon(0.02, muon_weight_dimension_numbers=dims))
  grads = jax.tree.map(lambda p: jnp.asarray(_draw(p.shape, p.size)),
                       nnx.state(model, nnx.Param))  # as nnx.grad gives them: Params
  want = optax.apply_updates(pure, _run(tx, [nnx.as_pure(grads)], pure))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  optimizer.update(model, grads)
  chex.assert_trees_all_close(nnx.as_pure(nnx.state(model, nnx.Param)), want, rtol=1e-6)


if __name__ == "__main__":
  absltest.main()
