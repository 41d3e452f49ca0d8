"""Tests for optax_gc.infer_output_axes: one worked case per rule of the jaxpr walk.

Real layers of Flax, Haiku, Equinox and Keras, checked against the Jacobian ground truth, are in
``real_layers_test.py`` and ``real_models_test.py``; here each case is small enough that the
answer is known by hand.
"""

import functools
import logging
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import absltest, parameterized
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_gc

X = jax.ShapeDtypeStruct((2, 6), jnp.float32)  # a batch of 2 inputs of 6 features
W = jnp.ones((6, 4))  # a dense kernel (in=6, out=4)
AxisType = getattr(jax.sharding, "AxisType", None)
needs_explicit_sharding = absltest.skipIf(
    AxisType is None, "explicit sharding (AxisType, reshard, set_mesh) needs jax >= 0.5")


def infer(fn, params, *args, **kwargs):
  return optax_gc.infer_output_axes(fn, params, *args, **kwargs)


class DenseAndConvTest(parameterized.TestCase):
  """Contractions: the dimension numbers name the fan-in."""

  @parameterized.named_parameters(
      ("in_out", lambda w, x: x @ w, (6, 4), (1,)),
      ("out_in_pytorch", lambda w, x: x @ w.T, (4, 6), (0,)),
      ("einsum_qkv", lambda w, x: jnp.einsum("bd,dnh->bnh", x, w), (6, 2, 3), (1, 2)),
      ("einsum_out_proj", lambda w, x: jnp.einsum("bnh,nhd->bd", x.reshape(2, 2, 3), w),
       (2, 3, 4), (2,)),
      ("gemma_q", lambda w, x: jnp.einsum("bd,ndh->bnh", x, w), (2, 6, 3), (0, 2)),
      ("stacked_einsum_batch", lambda w, x: jnp.einsum("bd,ldo->lbo", x, w), (3, 6, 4), (0, 2)),
      ("vmapped_stack", lambda w, x: jax.vmap(lambda wi: x @ wi)(w), (3, 6, 4), (0, 2)),
      ("dot_with_w_on_the_left", lambda w, x: (w @ x.T).T, (4, 6), (0,)),
  )
  def test_dot_general(self, fn, shape, expected):
    self.assertEqual(infer(fn, jnp.ones(shape), X), expected)

  @parameterized.named_parameters(
      ("nhwc_hwio", "NHWC", "HWIO", (3, 3, 6, 4), (3,), 1),
      ("nchw_oihw_pytorch", "NCHW", "OIHW", (4, 6, 3, 3), (0,), 1),
      ("grouped", "NHWC", "HWIO", (3, 3, 3, 4), (3,), 2),
      ("depthwise", "NHWC", "HWIO", (3, 3, 1, 6), (3,), 6),
  )
  def test_conv(self, lhs_spec, rhs_spec, shape, expected, groups):
    x_shape = (2, 8, 8, 6) if lhs_spec == "NHWC" else (2, 6, 8, 8)

    def conv(w, x):
      return jax.lax.conv_general_dilated(
          x, w, (1, 1), "SAME", dimension_numbers=(lhs_spec, rhs_spec, lhs_spec),
          feature_group_count=groups)

    self.assertEqual(infer(conv, jnp.ones(shape), jax.ShapeDtypeStruct(x_shape, jnp.float32)),
                     expected)

  def test_conv_transpose_reads_the_swapped_kernel_spec(self):
    # lax.conv_transpose(transpose_kernel=True) flips the kernel and swaps its I and O.
    def convt(w, x):
      return jax.lax.conv_transpose(x, w, (2, 2), "SAME", dimension_numbers=(
          "NHWC", "HWIO", "NHWC"), transpose_kernel=True)

    x = jax.ShapeDtypeStruct((2, 8, 8, 6), jnp.float32)
    # With transpose_kernel the kernel's "O" (axis 3) is the *input* channel: output is axis 2.
    self.assertEqual(infer(convt, jnp.ones((3, 3, 4, 6)), x), (2,))
    self.assertEqual(infer(lambda w, x: jax.lax.conv_transpose(
        x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")),
        jnp.ones((3, 3, 6, 4)), x), (3,))

  @absltest.skipIf(not hasattr(jax.lax, "ragged_dot"), "jax.lax.ragged_dot needs jax >= 0.4.30")
  def test_ragged_dot_expert_stack(self):
    def moe(w, x):
      return jax.lax.ragged_dot(x, w, jnp.array([1, 1], jnp.int32))

    self.assertEqual(infer(moe, jnp.ones((2, 6, 4)), X), (0, 2))


class LeftAloneTest(absltest.TestCase):
  """Parameters that reach no contraction get None."""

  def test_biases_scales_and_unused(self):
    def fn(p, x):
      h = x @ p["w"] + p["b"]  # rank-1 bias
      h = h.reshape(2, 2, 2) * p["scale2d"]  # rank-2 scale (heads, head_dim)
      return h + p["scalar"]

    params = {"w": W, "b": jnp.ones(4), "scale2d": jnp.ones((2, 2)), "scalar": jnp.ones(()),
              "unused": jnp.ones((3, 3)), "not_an_array": "hello"}
    self.assertEqual(infer(fn, params, X), {
        "w": (1,), "b": None, "scale2d": None, "scalar": None, "unused": None,
        "not_an_array": None})

  def test_no_fan_in_is_left_alone(self):
    # A (1, 4) kernel: each output unit has one input, so GC would only zero it.
    self.assertIsNone(infer(lambda w, x: x[:, :1] @ w, jnp.ones((1, 4)), X))

  def test_lookup_only_embedding_and_opt_in(self):
    def embed(e, ids):
      return e[ids]

    ids = jax.ShapeDtypeStruct((2, 5), jnp.int32)
    self.assertIsNone(infer(embed, jnp.ones((10, 6)), ids))
    self.assertEqual(infer(embed, jnp.ones((10, 6)), ids, centralize_lookups=True), (1,))
    # One id at a time (as an Equinox Embedding does) is a lookup too.
    one = jax.ShapeDtypeStruct((), jnp.int32)
    self.assertIsNone(infer(embed, jnp.ones((10, 6)), one))
    self.assertEqual(infer(embed, jnp.ones((10, 6)), one, centralize_lookups=True), (1,))


class FollowTest(parameterized.TestCase):
  """Shape ops, elementwise ops and scaling on the way to the contraction."""

  @parameterized.named_parameters(
      ("transpose", lambda w, x: x @ w.T.T, (6, 4), (1,)),
      ("convert_and_scale", lambda w, x: x @ (2.0 * w.astype(jnp.bfloat16)), (6, 4), (1,)),
      ("reshape_split_output", lambda w, x: jnp.einsum("bd,dnh->bnh", x, w.reshape(6, 2, 2)),
       (6, 4), (1,)),
      ("reshape_merge_heads", lambda w, x: x @ w.reshape(6, 4), (6, 2, 2), (1, 2)),
      ("fused_qkv_slice", lambda w, x: x @ w[:, :4] + x @ w[:, 4:8], (6, 12), (1,)),
      ("split", lambda w, x: sum(x @ part for part in jnp.split(w, 3, axis=1)), (6, 12), (1,)),
      ("broadcast_batch", lambda w, x: jnp.einsum(
          "bd,bdo->bo", x, jnp.broadcast_to(w, (2, 6, 4))), (6, 4), (1,)),
      ("rev_and_pad", lambda w, x: jnp.pad(x, ((0, 0), (0, 2)))
       @ jnp.pad(w[::-1], ((1, 1), (0, 0))), (6, 4), (1,)),
      ("weight_norm", lambda w, x: x @ (w / jnp.linalg.norm(w, axis=0, keepdims=True)), (6, 4),
       (1,)),
      ("global_scale", lambda w, x: x @ (w / jnp.linalg.norm(w)), (6, 4), (1,)),
      ("merged_lora_b", lambda w, x: x @ (jnp.ones((6, 2)) @ w), (2, 4), (1,)),
      ("remat", jax.checkpoint(lambda w, x: x @ w), (6, 4), (1,)),
      ("jit", jax.jit(lambda w, x: x @ w), (6, 4), (1,)),
      ("stop_gradient_clip", lambda w, x: x @ jnp.clip(jax.lax.stop_gradient(w), -1, 1), (6, 4),
       (1,)),
  )
  def test_follows(self, fn, shape, expected):
    self.assertEqual(infer(fn, jnp.ones(shape), X), expected)

  def test_lora(self):
    def lora(p, x):
      return x @ p["w"] + (x @ p["a"]) @ p["b"] * 0.5

    params = {"w": W, "a": jnp.ones((6, 2)), "b": jnp.ones((2, 4))}
    self.assertEqual(infer(lora, params, X), {"w": (1,), "a": (1,), "b": (1,)})

  def test_weight_norm_gain(self):
    def wn(p, x):
      v = p["v"]
      return x @ (p["g"] * v / jnp.linalg.norm(v, axis=0))

    # The gain g (4,) runs along the output axis: no fan-in, so left alone.
    self.assertEqual(infer(wn, {"v": W, "g": jnp.ones(4)}, X), {"v": (1,), "g": None})

  def test_dropconnect_mask_from_a_key_is_not_data(self):
    def dropconnect(w, x, key):
      return x @ (w * jax.random.bernoulli(key, 0.9, w.shape))

    self.assertEqual(infer(dropconnect, W, X, jax.random.key(0)), (1,))

  def test_static_arguments_are_passed_as_they_are(self):
    def fn(w, x, *, train):
      return x @ (w if train else w.T)

    self.assertEqual(infer(fn, W, X, train=True), (1,))
    self.assertEqual(infer(fn, W.T, X, train=False), (0,))


class StackTest(absltest.TestCase):
  """A stacking axis, scanned, looped over or indexed per layer, is an output axis."""

  def test_scan_over_layers(self):
    def net(ws, x):
      return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]

    self.assertEqual(infer(net, jnp.ones((3, 6, 6)), X), (0, 2))

  def test_scan_with_biases_and_carry(self):
    def net(p, x):
      def layer(h, wb):
        w, b = wb
        return jnp.tanh(h @ w + b), None

      return jax.lax.scan(layer, x, (p["w"], p["b"]))[0]

    self.assertEqual(infer(net, {"w": jnp.ones((3, 6, 6)), "b": jnp.ones((3, 6))}, X),
                     {"w": (0, 2), "b": None})

  def test_fori_loop_indexing(self):
    def net(ws, x):
      return jax.lax.fori_loop(0, 3, lambda i, h: h @ ws[i], x)

    self.assertEqual(infer(net, jnp.ones((3, 6, 6)), X), (0, 2))

  def test_static_index(self):
    self.assertEqual(infer(lambda ws, x: x @ ws[0] @ ws[1], jnp.ones((2, 6, 6)), X), (0, 2))

  def test_rnn_with_learned_initial_state(self):
    def rnn(p, xs):
      def step(h, x):
        h = jnp.tanh(h @ p["wh"] + x @ p["wx"])
        return h, h

      h0 = jnp.broadcast_to(p["h0"], (2, 4))
      return jax.lax.scan(step, h0, xs)[1]

    params = {"wh": jnp.ones((4, 4)), "wx": jnp.ones((6, 4)), "h0": jnp.ones(4)}
    xs = jax.ShapeDtypeStruct((5, 2, 6), jnp.float32)
    self.assertEqual(infer(rnn, params, xs), {"wh": (1,), "wx": (1,), "h0": None})

  def test_while_and_cond(self):
    def net(p, x):
      h = jax.lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, c[1] @ p["a"]), (0, x))[1]
      return jax.lax.cond(h.sum() > 0, lambda h: h @ p["b"], lambda h: -(h @ p["b"]), h)

    self.assertEqual(infer(net, {"a": jnp.ones((6, 6)), "b": W}, X), {"a": (1,), "b": (1,)})


class CustomDerivativesTest(absltest.TestCase):

  def test_custom_jvp_and_vjp(self):
    @jax.custom_jvp
    def f(w, x):
      return x @ w

    f.defjvp(lambda primals, tangents: (f(*primals), f(*tangents)))

    @jax.custom_vjp
    def g(w, x):
      return x @ w.T

    g.defvjp(lambda w, x: (g(w, x), (w, x)), lambda res, ct: res)
    self.assertEqual(infer(lambda p, x: f(p["f"], x) + g(p["g"], x),
                           {"f": W, "g": W.T}, X), {"f": (1,), "g": (0,)})


class ShardingTest(absltest.TestCase):
  """Sharding annotations are followed like copies."""

  @needs_explicit_sharding
  def test_sharding_primitives(self):
    explicit = jax.make_mesh((1,), ("x",), axis_types=(AxisType.Explicit,))
    auto = jax.make_mesh((1,), ("x",), axis_types=(AxisType.Auto,))
    with jax.sharding.set_mesh(explicit):
      fn = lambda w, x: x @ jax.sharding.reshard(w, P(None, "x"))  # noqa: E731
      self.assertIn("reshard", str(jax.make_jaxpr(fn)(W, jnp.ones((2, 6)))))
      self.assertEqual(infer(fn, W, X), (1,))
      self.assertEqual(infer(lambda w, x: jax.sharding.auto_axes(
          lambda w: x @ w, out_sharding=P())(w), W, X), (1,))
    with jax.sharding.set_mesh(auto):
      self.assertEqual(infer(lambda w, x: jax.sharding.explicit_axes(
          lambda w: x @ w, in_sharding=P())(w), W, X), (1,))

  def test_sharding_annotations(self):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
    set_mesh = getattr(jax.sharding, "set_mesh", None)  # `with mesh:` before jax 0.7
    with mesh if set_mesh is None else set_mesh(mesh):
      self.assertEqual(infer(lambda w, x: x @ jax.lax.with_sharding_constraint(
          w, NamedSharding(mesh, P(None, "x"))), W, X), (1,))
      self.assertEqual(infer(lambda w, x: x @ jax.device_put(
          w, NamedSharding(mesh, P())), W, X), (1,))

  def test_shard_map(self):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
    if hasattr(jax, "shard_map"):
      shard_map = functools.partial(jax.shard_map, check_vma=False)
    else:  # jax < 0.6
      from jax.experimental.shard_map import shard_map as experimental

      shard_map = functools.partial(experimental, check_rep=False)

    def fsdp(w, x):
      def local(w, x):  # gather the sharded fan-in, then contract
        return x @ jax.lax.all_gather(w, "x", axis=0, tiled=True)

      return shard_map(local, mesh=mesh, in_specs=(P("x", None), P()), out_specs=P())(w, x)

    self.assertEqual(infer(fsdp, W, X), (1,))


class ErrorTest(absltest.TestCase):
  """Nothing is guessed: conflicts and unfollowable uses raise, naming the leaf and each use."""

  def test_tied_embedding(self):
    def tied(p, ids):
      return p["emb"][ids] @ p["emb"].T

    ids = jax.ShapeDtypeStruct((2, 5), jnp.int32)
    with self.assertRaises(ValueError) as ctx:
      infer(tied, {"emb": jnp.ones((10, 6))}, ids)
    msg = str(ctx.exception)
    self.assertIn("leaf ['emb'] with shape (10, 6): its uses disagree", msg)
    self.assertIn("gather (lookup at data indices): left alone", msg)
    self.assertIn("dot_general, contracting (1,): output axes (0,)", msg)
    self.assertIn("infer_test.py", msg)  # where in the code each use is
    # The documented way out: an override (None leaves it alone).
    self.assertEqual(infer(tied, {"emb": jnp.ones((10, 6))}, ids, overrides={"emb": None}),
                     {"emb": None})
    self.assertEqual(infer(tied, {"emb": jnp.ones((10, 6))}, ids, overrides={"e.*": -1}),
                     {"emb": (1,)})

  def test_tied_autoencoder(self):
    with self.assertRaisesRegex(ValueError, re.escape(
        "output axes (1,)")) as ctx:
      infer(lambda w, x: (x @ w) @ w.T, W, X)
    self.assertIn("output axes (0,)", str(ctx.exception))

  def test_reshape_merging_fan_in_and_output(self):
    with self.assertRaisesRegex(ValueError, r"axes \(0, 1\) are both contracted and kept"):
      infer(lambda w, x: x @ w.reshape(6, 4), jnp.ones((4, 6)), X)

  def test_primitive_without_rule(self):
    # A primitive the tables do not know (a new JAX's, or a library's own) is never guessed.
    from jax.extend.core import Primitive

    doubled = Primitive("doubled_by_a_library")
    doubled.def_abstract_eval(lambda w: w)

    with self.assertRaisesRegex(ValueError, r"doubled_by_a_library \(no rule for this primitive\)"):
      infer(lambda w, x: x @ doubled.bind(w), W, X)

  def test_pallas_kernel_is_opaque(self):
    from jax.experimental import pallas as pl

    def double(w_ref, o_ref):
      o_ref[...] = 2 * w_ref[...]

    def fn(w, x):
      w2 = pl.pallas_call(double, out_shape=jax.ShapeDtypeStruct(w.shape, w.dtype),
                          interpret=True)(w)
      return x @ w2

    with self.assertRaisesRegex(ValueError, "pallas_call .an opaque kernel"):
      infer(fn, W, X)

  @needs_explicit_sharding
  def test_a_lost_use_still_counts(self):
    # Each use counts even when another was understood: the lookup goes through reshard.
    mesh = jax.make_mesh((1,), ("x",), axis_types=(AxisType.Explicit,))

    def tied(e, ids):
      looked_up = jax.sharding.reshard(e, P())[ids]
      return looked_up @ e.T

    with jax.sharding.set_mesh(mesh):
      with self.assertRaisesRegex(ValueError, "uses disagree"):
        infer(tied, jnp.ones((10, 6)), jax.ShapeDtypeStruct((2, 5), jnp.int32))

  def test_all_bad_leaves_in_one_error(self):
    with self.assertRaises(ValueError) as ctx:
      infer(lambda p, x: (x @ p["a"]) @ p["a"].T + (x @ p["b"]) @ p["b"].T,
            {"a": W, "b": W}, X)
    self.assertIn("of 2 parameters", str(ctx.exception))
    self.assertIn("['a']", str(ctx.exception))
    self.assertIn("['b']", str(ctx.exception))

  def test_no_array_input(self):
    with self.assertRaisesRegex(ValueError, "no array among the example inputs"):
      infer(lambda w: jnp.ones((2, 6)) @ w, W)


class ReportTest(absltest.TestCase):

  def test_table_lists_every_leaf(self):
    lines = []
    spec = infer(lambda p, x: x @ p["w"] + p["b"], {"w": W, "b": jnp.ones(4)}, X,
                 report=lines.append)
    (table,) = lines
    rows = table.splitlines()
    self.assertEqual(rows[0].split(), ["path", "shape", "fan-in", "output", "stacked", "reason"])
    self.assertRegex(rows[1], r"^b\s+\(4,\)\s+-\s+None\s+-\s+elementwise only")
    self.assertRegex(rows[2],
                     r"^w\s+\(6, 4\)\s+\(0,\)\s+\(1,\)\s+-\s+dot_general, contracting \(0,\)")
    self.assertEqual(spec, {"w": (1,), "b": None})

  def test_report_comes_before_the_error(self):
    lines = []
    with self.assertRaises(ValueError):
      infer(lambda w, x: (x @ w) @ w.T, W, X, report=lines.append)
    self.assertIn("its uses disagree", lines[0])


class AbstractInputsTest(absltest.TestCase):

  def test_shape_dtype_structs_give_the_same_spec(self):
    def fn(p, x):
      return jnp.einsum("btd,dnh->btnh", x, p["q"]) + p["b"]

    params = {"q": jnp.ones((8, 2, 4)), "b": jnp.zeros((2, 4))}
    x = jnp.ones((1, 5, 8))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (params, x))
    self.assertEqual(infer(fn, params, x), infer(fn, *abstract))

  def test_nothing_is_compiled(self):
    # Read JAX's compile log: every compilation logs "Compiling ...". The control at the end
    # shows that this capture sees a compilation when there is one.
    fn = jax.jit(lambda w, x: x @ w)
    w = jax.ShapeDtypeStruct((6, 4), jnp.float32)
    with self.assertLogs("jax", level="WARNING") as logs, jax.log_compiles(True):
      logging.getLogger("jax").warning("capture started")  # assertLogs needs one record
      self.assertEqual(infer(fn, w, X), (1,))
      inferred = [r.getMessage() for r in logs.records]
      jax.jit(lambda w, x: x @ w + 1).lower(w, X).compile()
    self.assertFalse([m for m in inferred if "Compiling" in m], inferred)
    self.assertTrue([r for r in logs.records if "Compiling" in r.getMessage()])


class CentralizeTakesTheSpecTest(chex.TestCase):
  """The inferred spec goes into centralize as it is; the result is GC on the true fan-in."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_end_to_end(self):
    def fn(p, x):
      q = jnp.einsum("bd,dnh->bnh", x, p["q"]) + p["q_bias"]
      return jnp.einsum("bnh,nhd->bd", q, p["out"])

    k = jax.random.split(jax.random.key(0), 3)
    params = {"q": jax.random.normal(k[0], (6, 2, 3)), "q_bias": jnp.ones((2, 3)),
              "out": jax.random.normal(k[1], (2, 3, 6))}
    x = jax.random.normal(k[2], (2, 6))
    spec = infer(fn, params, x)
    grads = jax.grad(lambda p: jnp.sum(fn(p, x) ** 2 + fn(p, x)))(params)
    tx = optax.chain(optax_gc.centralize(spec), optax.sgd(0.1))
    updates = self.variant(lambda g: tx.update(g, tx.init(params), params)[0])(grads)
    np.testing.assert_allclose(updates["q"].mean(0), 0.0, atol=1e-6)  # fan-in (0,)
    np.testing.assert_allclose(updates["out"].mean((0, 1)), 0.0, atol=1e-6)  # fan-in (0, 1)
    np.testing.assert_array_equal(updates["q_bias"], -0.1 * grads["q_bias"])
    # The default -1 is wrong on q: it keeps head_dim only and mixes the heads.
    wrong = optax_gc.centralize().update(grads, optax.EmptyState())[0]
    self.assertGreater(float(jnp.abs(wrong["q"].mean(0)).max()), 1e-3)


if __name__ == "__main__":
  pytest.main([__file__])


def test_reshape_groups_are_minimal_and_cover_both_shapes():
  """The reshape rule's grouping: in order, equal products, and no group could be split."""
  from optax_gc._src.infer import _reshape_groups

  rng = np.random.default_rng(0)
  for _ in range(500):
    old = [int(x) for x in rng.integers(1, 5, size=rng.integers(0, 5))]
    new, rest = [], int(np.prod(old))
    while rest > 1:
      d = int(rng.choice([d for d in range(2, rest + 1) if rest % d == 0]))
      new.append(d)
      rest //= d
    new.insert(int(rng.integers(0, len(new) + 1)), 1)
    groups = _reshape_groups(old, new)
    assert [i for gi, _ in groups for i in gi] == list(range(len(old)))
    assert [j for _, gj in groups for j in gj] == list(range(len(new)))
    for gi, gj in groups:
      sizes_i, sizes_j = [old[i] for i in gi], [new[j] for j in gj]
      assert np.prod(sizes_i) == np.prod(sizes_j), (old, new, groups)
      # Minimal: no proper prefix of both sides has equal products (ignoring size-1 dims).
      for a in range(1, len(gi)):
        for b in range(1, len(gj)):
          if np.prod(sizes_i[:a]) == np.prod(sizes_j[:b]) > 1:
            assert np.prod(sizes_i[a:]) == np.prod(sizes_j[b:]) == 1, (old, new, groups)
