"""Tests for the Jacobian ground truth in ``_truth.py``, on hand-known answers."""

import _truth
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

_X = np.ones((2, 3, 4), np.float32)  # (batch, sequence, in); values are redrawn per draw.


class ReachTest(absltest.TestCase):

  def test_dense_pattern_is_the_identity_on_the_output_axis(self):
    pattern = _truth.reach(lambda w, x: x @ w, np.ones((4, 5), np.float32), _X)
    self.assertEqual(pattern.shape, (5, 4, 5))
    # Entry (i, j) reaches output feature j and no other.
    expected = np.broadcast_to(np.eye(5, dtype=bool)[:, None, :], (5, 4, 5))
    np.testing.assert_array_equal(pattern, expected)

  def test_feature_axes_keep_the_per_layer_axis(self):
    # A stack of 3 dense layers applied to the same input: (L, batch, out).
    def fn(w, x):
      return jnp.einsum("bi,lio->lbo", x, w)
    w = np.ones((3, 4, 5), np.float32)
    x = np.ones((2, 4), np.float32)
    self.assertEqual(_truth.reach(fn, w, x, feature_axes=(0, -1)).shape, (15, 3, 4, 5))
    self.assertEqual(_truth.output_axes(fn, w, x, feature_axes=(0, -1)), (0, 2))
    # Collapsing the layer axis as if it were a position says the layers share units.
    self.assertEqual(_truth.output_axes(fn, w, x, feature_axes=(-1,)), (2,))

  def test_unused_entries_raise(self):
    table = np.ones((6, 4), np.float32)
    tokens = np.array([[0, 1, 2]])  # rows 3, 4, 5 are never looked up.
    with self.assertRaisesRegex(ValueError, "12 of 24 weight entries reach no output"):
      _truth.output_axes(lambda t, ids: t[ids], table, tokens)

  def test_mixed_axis_raises(self):
    # Output features j and j + 1 are summed in pairs: entries (i, 0) and (i, 1) overlap,
    # (i, 0) and (i, 2) do not, so the second axis is neither output nor fan-in.
    def fn(w, x):
      return (x @ w).reshape(x.shape[:-1] + (2, 2)).sum(-1)
    with self.assertRaisesRegex(ValueError, "axis 1 .* neither an output nor a fan-in"):
      _truth.output_axes(fn, np.ones((4, 4), np.float32), _X)


class OutputAxesTest(parameterized.TestCase):
  """Hand-known answers."""

  @parameterized.named_parameters(
      ("dense_in_out", lambda w, x: x @ w, (4, 5), (-1,), (1,), ("fan-in", "output")),
      ("pytorch_out_in", lambda w, x: x @ w.T, (5, 4), (-1,), (0,), ("output", "fan-in")),
      ("bias", lambda b, x: x[..., :1] + b, (5,), (-1,), None, ("output",)),
      # (heads, head_dim), as an attention query bias.
      ("rank2_bias", lambda b, x: x[..., :3, None] + b, (3, 2), (-2, -1), None,
       ("output", "output")),
      # (in, heads, head_dim), as an attention query kernel.
      ("query", lambda w, x: jnp.einsum("btd,dnh->btnh", x, w), (4, 2, 3), (-2, -1), (1, 2),
       ("fan-in", "output", "output")),
  )
  def test_dense_layouts(self, fn, shape, feats, expected, roles):
    w = np.ones(shape, np.float32)
    pattern = _truth.reach(fn, w, _X, feature_axes=feats)
    self.assertEqual(_truth.axis_roles(pattern), roles)
    self.assertEqual(_truth.output_axes(fn, w, _X, feature_axes=feats), expected)

  def test_w_and_w_transposed_have_two_truths(self):
    w = np.ones((4, 4), np.float32)
    self.assertEqual(_truth.output_axes(lambda w, x: x @ w, w, _X), (1,))
    self.assertEqual(_truth.output_axes(lambda w, x: x @ w.T, w, _X), (0,))

  def test_conv_hwio_and_depthwise_size1_axis(self):
    x = np.ones((1, 5, 5, 4), np.float32)

    def conv(w, x, groups=1):
      return jax.lax.conv_general_dilated(
          x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
          feature_group_count=groups)

    self.assertEqual(_truth.output_axes(conv, np.ones((3, 3, 4, 6), np.float32), x), (3,))
    self.assertEqual(
        _truth.output_axes(lambda w, x: conv(w, x, 2), np.ones((3, 3, 2, 6), np.float32), x),
        (3,))
    def depthwise(w, x):
      return conv(w, x, 4)
    w = np.ones((3, 3, 1, 8), np.float32)
    self.assertEqual(_truth.axis_roles(_truth.reach(depthwise, w, x)),
                     ("fan-in", "fan-in", "size-1", "output"))
    self.assertEqual(_truth.output_axes(depthwise, w, x), (3,))

  def test_embedding_lookup_and_logits(self):
    table = np.ones((6, 4), np.float32)
    tokens = np.arange(6).reshape(2, 3)
    self.assertEqual(_truth.output_axes(lambda t, ids: t[ids], table, tokens), (1,))
    self.assertEqual(_truth.output_axes(lambda t, x: x @ t.T, table, _X), (0,))

  def test_direct_output_matters(self):
    # In x @ a @ b, `a` mixes into every output of the product: no axis of `a` is an output
    # axis of the layer's output; its own units are those of the hidden x @ a.
    b = np.random.default_rng(0).normal(size=(2, 5)).astype(np.float32)
    a = np.ones((4, 2), np.float32)
    self.assertEqual(_truth.output_axes(lambda a, x: x @ a @ b, a, _X), ())
    self.assertEqual(_truth.output_axes(lambda a, x: x @ a, a, _X), (1,))


class CanonicalTest(parameterized.TestCase):

  @parameterized.parameters(
      (-1, (3, 4), (1,)),
      ((0, 1), (2, 3), None),  # nothing to average over.
      ((1,), (1, 5), None),  # the fan-in is a single element.
      ((2, 3), (3, 3, 1, 8), (3,)),  # a size-1 output axis is dropped.
      ((3,), (3, 3, 1, 8), (3,)),
      ((), (2, 3), ()),
      (None, (2, 3), None),
  )
  def test_canonical(self, spec, shape, expected):
    self.assertEqual(_truth.canonical(spec, shape), expected)

  @parameterized.parameters(
      ((5,), None), ((4, 5), (1,)), ((3, 4, 5), (2,)),
      # An Equinox conv bias (C, 1, 1): the default keeps a size-1 axis and averages over C.
      ((8, 1, 1), ()))
  def test_default_spec(self, shape, expected):
    self.assertEqual(_truth.default_spec(shape), expected)


if __name__ == "__main__":
  absltest.main()
