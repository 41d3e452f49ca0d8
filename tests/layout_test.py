"""Tests for optax_gc.infer_layout: fan-in, output and stacked axes, and the head."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gc
from optax_gc import Layout

F32 = jnp.float32


def _input(*shape, dtype=F32):
  return jax.ShapeDtypeStruct(shape, dtype)


def test_attention_kernels_have_no_stack():
  def attention(p, x):
    q = jnp.einsum("btd,dnh->btnh", x, p["q"])
    k = jnp.einsum("btd,dnh->btnh", x, p["k"])
    scores = jax.nn.softmax(jnp.einsum("bqnh,bknh->bnqk", q, k), -1)
    return jnp.einsum("bnqk,bknh,nhd->bqd", scores, k, p["out"])

  params = {"q": jnp.ones((8, 2, 4)), "k": jnp.ones((8, 2, 4)), "out": jnp.ones((2, 4, 8))}
  layout = optax_gc.infer_layout(attention, params, _input(1, 5, 8))
  assert layout == {"q": Layout((0,), (1, 2), (), False), "k": Layout((0,), (1, 2), (), False),
                    "out": Layout((0, 1), (2,), (), True)}


def test_scanned_stack():
  def net(p, x):
    h = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["layers"])[0]
    return h @ p["head"]

  params = {"layers": jnp.ones((3, 6, 6)), "head": jnp.ones((6, 2))}
  layout = optax_gc.infer_layout(net, params, _input(2, 6))
  assert layout == {"layers": Layout((1,), (2,), (0,), False), "head": Layout((0,), (1,), (), True)}


def test_indexed_stack_in_a_loop():
  def net(ws, x):
    return jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ ws[i]), x)

  assert optax_gc.infer_layout(net, jnp.ones((3, 6, 6)), _input(2, 6)) == Layout(
      (1,), (2,), (0,), True)


def test_mixture_of_experts_batch_dims_and_grouped_matmul():
  def dispatched(p, x):  # x: (experts, capacity, d)
    return jnp.einsum("ecd,edf->ecf", x, p["experts"])

  params = {"experts": jnp.ones((4, 8, 16))}
  assert optax_gc.infer_layout(dispatched, params, _input(4, 2, 8)) == {
      "experts": Layout((1,), (2,), (0,), True)}
  if not hasattr(jax.lax, "ragged_dot"):
    pytest.skip("jax.lax.ragged_dot is newer than this JAX")

  def grouped(p, x):  # tokens sorted by expert, group sizes fixed here
    return jax.lax.ragged_dot(x, p["experts"], jnp.array([3, 1, 2, 2], jnp.int32))

  assert optax_gc.infer_layout(grouped, params, _input(8, 8)) == {
      "experts": Layout((1,), (2,), (0,), True)}


def test_an_axis_stacked_in_one_use_only_is_an_output_axis():
  def fn(w, x):  # once as a batch of matrices, once as one matrix's output axis
    per_layer = jnp.einsum("lbd,ldo->lbo", x, w)
    shared = jnp.einsum("bd,ldo->blo", x[0], w)
    return per_layer.sum() + shared.sum()

  assert optax_gc.infer_layout(fn, jnp.ones((3, 6, 4)), _input(3, 2, 6)) == Layout(
      (1,), (0, 2), (), True)


def test_output_axes_are_output_plus_stack():
  def net(p, x):
    h = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["layers"])[0]
    q = jnp.einsum("bd,dnh->bnh", h, p["q"])
    return jnp.einsum("bnh,nhd->bd", q, p["out"]) + p["bias"]

  params = {"layers": jnp.ones((3, 6, 6)), "q": jnp.ones((6, 2, 3)), "out": jnp.ones((2, 3, 6)),
            "bias": jnp.ones(6)}
  x = _input(2, 6)
  layout = optax_gc.infer_layout(net, params, x)
  spec = optax_gc.infer_output_axes(net, params, x)
  for key, leaf in layout.items():
    if leaf is None:
      assert spec[key] is None
    else:
      assert spec[key] == tuple(sorted(leaf.output + leaf.stack)), key
      assert sorted(leaf.fan_in + leaf.output + leaf.stack) == list(range(params[key].ndim))


def test_the_head_reaches_the_output_through_norms_and_a_loss():
  def mlp(p, x, labels):
    h = jax.nn.relu(x @ p["hidden"])
    h = h + jax.nn.relu(h @ p["residual"])  # a residual branch: not the head
    h = h / jnp.linalg.norm(h, axis=-1, keepdims=True)
    logits = h @ p["head"] + p["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  params = {"hidden": jnp.ones((6, 8)), "residual": jnp.ones((8, 8)), "head": jnp.ones((8, 3)),
            "bias": jnp.ones(3)}
  layout = optax_gc.infer_layout(mlp, params, _input(2, 6), _input(2, dtype=jnp.int32))
  assert {k: v.head for k, v in layout.items() if v is not None} == {
      "hidden": False, "residual": False, "head": True}


def test_overrides_give_output_axes_and_no_stack():
  def net(ws, x):
    return jax.lax.scan(lambda h, w: (h @ w, None), x, ws)[0]

  layout = optax_gc.infer_layout(net, {"w": jnp.ones((3, 6, 6))}["w"], _input(2, 6),
                                 overrides={"": (0, 2)})
  assert layout == Layout((1,), (0, 2), (), True)


def test_the_report_shows_the_three_columns():
  lines = []
  optax_gc.infer_layout(lambda ws, x: jax.lax.scan(lambda h, w: (h @ w, None), x, ws)[0],
                        np.ones((3, 6, 6), np.float32), _input(2, 6), report=lines.append)
  header, row = lines[0].splitlines()
  assert header.split() == ["path", "shape", "fan-in", "output", "stacked", "reason"]
  assert row.split()[:6] == ["<root>", "(3,", "6,", "6)", "(1,)", "(2,)"]
  assert "(0,)" in row and "stacked along (0,)" in row


def test_nnx_layout_of_a_scanned_stack():
  nnx = pytest.importorskip("flax.nnx")

  class Stack(nnx.Module):
    def __init__(self, rngs):
      @nnx.split_rngs(splits=3)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make(rngs):
        return nnx.Linear(6, 6, rngs=rngs)

      self.layers = make(rngs)
      self.head = nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, x):
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def step(h, layer):
        return jnp.tanh(layer(h))

      return self.head(step(x, self.layers))

  layout = optax_gc.nnx_layout(Stack(nnx.Rngs(0)), _input(2, 6))
  assert layout["layers"]["kernel"] == Layout((1,), (2,), (0,), False)
  assert layout["layers"]["bias"] is None
  assert layout["head"]["kernel"] == Layout((0,), (1,), (), True)
