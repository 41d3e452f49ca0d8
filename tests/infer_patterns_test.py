"""Inference on patterns found in third-party model code, each checked against the Jacobian truth.

Each case is a minimal reproducer of a pattern that real models use (a tiled class token, a
learned query through a dense layer, a per-example ``vmap`` over ``cond``, a vmapped conv
kernel, weight norm over the output axis, ...). The expected spec of every weight is the one
``_truth`` measures from the Jacobian of the layer's direct output; a learned *input* (a class
token, a probe, latents) is not a weight of any contraction and is left alone (``None``), as a
position table is.
"""

import re

import _truth
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import optax_gc

F32 = jnp.float32


def _input(*shape):
  return jax.ShapeDtypeStruct(shape, F32)


def _random(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), F32)


def _check_against_truth(fn, params, inputs, feature_axes=(-1,), learned_inputs=()):
  """Inference on ``fn`` equals the Jacobian truth for every leaf not in ``learned_inputs``."""
  spec = optax_gc.infer_output_axes(fn, params, *[_input(*x.shape) for x in inputs])
  flat = _truth.by_key(spec, is_leaf=lambda x: x is None or isinstance(x, tuple))
  shapes = {k: np.shape(v) for k, v in _truth.by_key(params).items()}
  for key in shapes:
    if key in learned_inputs:
      assert flat[key] is None, (key, flat[key])
      continue
    want = _truth.leaf_output_axes(fn, params, key, *inputs, feature_axes=feature_axes)
    assert _truth.canonical(flat[key], shapes[key]) == want, (key, flat[key], want)
  return spec


def test_tile_of_a_class_token():
  def cls(p, x):  # x: (B, T, D)
    c = jnp.tile(p["cls"], (x.shape[0], 1, 1))
    return jnp.concatenate([c, x], 1) @ p["w"]

  params = {"cls": _random((1, 1, 8)), "w": _random((8, 5))}
  spec = _check_against_truth(cls, params, [_random((2, 3, 8))], learned_inputs={"cls"})
  assert spec == {"cls": None, "w": (1,)}


def _map_head(p, x):  # x: (B, T, D): a MAP pooling head's query side
  probe = jnp.broadcast_to(p["probe"], (x.shape[0], 1, x.shape[-1]))
  q = jnp.einsum("btd,dnh->btnh", probe, p["wq"]) + p["bq"]
  k = jnp.einsum("btd,dnh->btnh", x, p["wk"])
  return jax.nn.softmax(jnp.einsum("bqnh,bknh->bnqk", q, k), -1)


MAP_PARAMS = {"probe": _random((1, 1, 32)), "wq": _random((32, 4, 8), 1),
              "bq": _random((4, 8), 2), "wk": _random((32, 4, 8), 3)}


def test_learned_query_through_a_dense_layer():
  spec = optax_gc.infer_output_axes(_map_head, MAP_PARAMS, _input(2, 5, 32))
  assert spec == {"probe": None, "wq": (1, 2), "bq": None, "wk": (1, 2)}
  # On a batch of one the probe is not broadcast at all: a vector the contraction takes whole.
  assert optax_gc.infer_output_axes(_map_head, MAP_PARAMS, _input(1, 5, 32)) == spec
  # The truth of the query projection is read at its direct output, q (features: heads, dims).
  def q_of(p, x):
    probe = jnp.broadcast_to(p["probe"], (x.shape[0], 1, x.shape[-1]))
    return jnp.einsum("btd,dnh->btnh", probe, p["wq"]) + p["bq"]

  x = _random((2, 5, 32), 4)
  for key in ("wq", "bq"):
    want = _truth.leaf_output_axes(q_of, MAP_PARAMS, key, x, feature_axes=(2, 3))
    assert _truth.canonical(spec[key], MAP_PARAMS[key].shape) == want, key


def test_perceiver_latents_and_detr_queries():
  def cross_attention_q(p, x):  # latents (N, D) broadcast to the batch, then projected
    latents = jnp.broadcast_to(p["latents"], (x.shape[0], *p["latents"].shape))
    q = latents @ p["wq"]
    k = x @ p["wk"]
    return jnp.einsum("bnd,btd->bnt", q, k)

  params = {"latents": _random((3, 6)), "wq": _random((6, 4), 1), "wk": _random((6, 4), 2)}
  spec = optax_gc.infer_output_axes(cross_attention_q, params, _input(2, 5, 6))
  assert spec == {"latents": None, "wq": (1,), "wk": (1,)}
  # A batch of one still adds an axis that no parameter runs along.
  assert optax_gc.infer_output_axes(cross_attention_q, params, _input(1, 5, 6)) == spec
  want = _truth.leaf_output_axes(lambda p, x: jnp.broadcast_to(
      p["latents"], (x.shape[0], 3, 6)) @ p["wq"], params, "wq", _random((2, 5, 6)))
  assert want == (1,)


def test_a_learned_vector_times_a_matrix_is_that_matrix_input():
  def learned_bias(p, x):  # a bias made by a dense layer from a learned vector
    return x @ p["w"] + p["v"] @ p["b"]

  params = {"w": _random((6, 4)), "v": _random((3,), 1), "b": _random((3, 4), 2)}
  spec = _check_against_truth(learned_bias, params, [_random((2, 6))], learned_inputs={"v"})
  assert spec == {"w": (1,), "v": None, "b": (1,)}


def test_lora_and_weight_norm_products_stay_parameter_values():
  # No side of A @ B, nor of v * g / |v|, runs along an axis of its own: each product is a
  # parameter value, used where it meets the data.
  def lora(p, x):
    return x @ (p["w"] + p["a"] @ p["b"])

  params = {"w": _random((8, 6)), "a": _random((8, 2), 1), "b": _random((2, 6), 2)}
  spec = _check_against_truth(lora, params, [_random((3, 8))])
  assert spec == {"w": (1,), "a": (), "b": (1,)}

  def weight_norm(p, x):
    v = p["v"]
    return x @ (v / jnp.linalg.norm(v, axis=0, keepdims=True) * p["g"])

  params = {"v": _random((8, 6)), "g": _random((6,), 1)}
  spec = _check_against_truth(weight_norm, params, [_random((3, 8))])
  assert spec == {"v": (1,), "g": None}


def _per_example(p, x):  # x: (3,)
  return lax.cond(x.sum() > 0, lambda p, x: x @ p["w"], lambda p, x: -(x @ p["w"]), p, x)


def test_vmap_of_cond_keeps_the_contraction():
  model = lambda p, xs: jax.vmap(_per_example, in_axes=(None, 0))(p, xs)  # noqa: E731
  params = {"w": _random((3, 4))}
  assert optax_gc.infer_output_axes(_per_example, params, _input(3)) == {"w": (1,)}
  spec = _check_against_truth(model, params, [_random((5, 3))])
  assert spec == {"w": (1,)}


def test_vmap_of_cond_raises_no_false_conflict_on_a_later_parameter():
  # cond's operands include the whole params dict: under vmap every leaf is masked through
  # select_n with the data-dependent predicate, out2 included, which is used after the cond.
  def model(p, xs):
    h = jax.vmap(_per_example, in_axes=(None, 0))(p, xs)
    return h @ p["out"]

  params = {"w": _random((3, 4)), "out": _random((4, 2), 1)}
  spec = optax_gc.infer_output_axes(model, params, _input(5, 3))
  assert spec == {"w": (1,), "out": (1,)}  # w's truth is the test above's
  assert _truth.leaf_output_axes(model, params, "out", _random((5, 3))) == (1,)


def test_vmap_of_cond_still_raises_a_real_conflict():
  def per_example(p, x):  # a tied W / W.T pair: its uses disagree
    return lax.cond(x.sum() > 0, lambda p, x: (x @ p["w"]) @ p["w"].T, lambda p, x: x, p, x)

  model = lambda p, xs: jax.vmap(per_example, in_axes=(None, 0))(p, xs)  # noqa: E731
  with pytest.raises(ValueError, match=r"(?s)leaf \['w'\].*its uses disagree"):
    optax_gc.infer_output_axes(model, {"w": _random((3, 4))}, _input(5, 3))


def test_vmapped_conv_kernel():
  def model(p, x):  # p["k"]: (layers, kw, in, out), an ensemble of convs on one input
    conv = lambda k: lax.conv_general_dilated(  # noqa: E731
        x, k, (1,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"))
    return jax.vmap(conv)(p["k"])  # (layers, batch, width, out)

  params = {"k": _random((2, 3, 4, 5))}
  spec = _check_against_truth(model, params, [_random((1, 6, 4))], feature_axes=(0, 3))
  assert spec == {"k": (0, 3)}


def test_reshape_with_a_dimension_order():
  # reshape with ``dimensions`` transposes first: (in, out) -> (out, in) -> (out, 3, 2).
  def fn(w, x):
    split = lax.reshape(w, (4, 3, 2), dimensions=(1, 0))
    return jnp.einsum("bij,oij->bo", x.reshape(2, 3, 2), split)

  spec = _check_against_truth(fn, _random((6, 4)), [_random((2, 6))])
  assert spec == (1,)


def test_outer_product_and_an_elementwise_use_agree():
  def fn(p, x):  # no use gives w a fan-in: both leave it alone
    return jnp.einsum("ba,o->bao", x, p["w"]) + p["w"]

  params = {"w": _random((4,))}
  spec = _check_against_truth(fn, params, [_random((2, 3))])
  assert spec == {"w": None}


def test_no_fan_in_use_against_a_real_contraction_is_a_conflict():
  def fn(p, x):  # one use has a fan-in, the other none: they disagree, nothing is guessed
    outer = lax.dot_general(x, p["w"], (((), ()), ((), ())))  # (b, a, o): no fan-in
    return outer.sum(-1) + x @ p["w"][:3, None]  # (b, 3) @ (3, 1): w's axis 0 contracted

  with pytest.raises(ValueError, match="its uses disagree"):
    optax_gc.infer_output_axes(fn, {"w": _random((4,))}, _input(2, 3))


def test_weight_norm_over_the_output_and_input_axes():
  # Hugging Face's wav2vec2 positional conv: weight_v (out, in / groups, k) is normalized over
  # (out, in), transposed to (k, in / groups, out) and used by a grouped conv. Through the norm
  # every entry reaches every output: all of it is fan-in, and so is the gain over k.
  groups = 2

  def positional_conv(p, x):  # x: (B, T, C)
    v = p["weight_v"]
    kernel = v / jnp.linalg.norm(v, axis=(0, 1))[None, None, :] * p["weight_g"]
    return lax.conv_general_dilated(x, kernel.T, (1,), "SAME", feature_group_count=groups,
                                    dimension_numbers=("NWC", "WIO", "NWC"))

  params = {"weight_v": _random((4, 4 // groups, 3)), "weight_g": _random((1, 1, 3), 1)}
  spec = _check_against_truth(positional_conv, params, [_random((2, 5, 4))])
  assert spec["weight_v"] == ()


def test_error_locations_are_the_users_frames():
  flax_linen = pytest.importorskip("flax.linen")

  def tied(p, x):  # the Dense kernel is also used transposed: a conflict
    h = flax_linen.Dense(4).apply({"params": p}, x)
    return h @ p["kernel"].T

  params = {"kernel": _random((6, 4)), "bias": _random((4,), 1)}
  with pytest.raises(ValueError) as info:
    optax_gc.infer_output_axes(tied, params, _input(2, 6))
  locations = re.findall(r"\(at (.*)\)$", str(info.value), flags=re.M)
  assert len(locations) == 2, str(info.value)
  # The Dense use was emitted inside Flax: the location is the line of this file that called
  # it, followed by the Flax frame.
  for where in locations:
    assert where.startswith(f"{__file__}:"), where
  assert any(", in flax/linen/linear.py:" in w for w in locations), locations


def test_a_function_that_is_not_traceable():
  def branchy(p, x):
    if x.sum() > 0:  # a Python `if` on the data
      return x @ p["w"]
    return -(x @ p["w"])

  with pytest.raises(ValueError, match=r"fn cannot be traced \(TracerBoolConversionError\)") as e:
    optax_gc.infer_output_axes(branchy, {"w": _random((6, 4))}, _input(2, 6))
  assert "depends on args[0]" in str(e.value)
  assert "_arrays" not in str(e.value)

  def on_params(p, x):
    return x @ p["w"] if float(p["scale"][0]) > 0 else x

  with pytest.raises(ValueError, match=r"depends on params\['scale'\]"):
    optax_gc.infer_output_axes(on_params, {"w": _random((6, 4)), "scale": _random((1,))},
                               _input(2, 6), )
  with pytest.raises(ValueError, match=r"depends on kwargs\['x'\]"):
    optax_gc.infer_output_axes(lambda p, *, x: branchy(p, x), {"w": _random((6, 4))},
                               x=_input(2, 6))


def test_a_static_slice_by_gather_keeps_its_axis():
  # jnp indexing with a static slice lowers to gather on older JAX: a piece of an axis, many
  # entries long, is not a selection of one unit.
  def fn(w, x):
    def rows(start):  # w[start:start + 3], as a gather at a constant index
      return lax.gather(w, jnp.array([start]), lax.GatherDimensionNumbers(
          offset_dims=(0, 1), collapsed_slice_dims=(), start_index_map=(0,)), (3, 4))

    return x[:, :3] @ rows(0) + x[:, 3:] @ rows(3)

  spec = _check_against_truth(fn, _random((6, 4)), [_random((2, 6))])
  assert spec == (1,)
