"""``optax_gc.infer_output_axes`` against the Jacobian truth, on real framework layers.

Each case is one real layer (Flax NNX, Flax Linen, Haiku, Equinox, Keras 3 on
JAX). For every parameter it holds three things:

- ``expected``: the output axes written by hand, as documentation;
- ``truths``: the output axes measured by ``_truth`` from the Jacobian of the
  direct output of the sub-computation that owns the parameter (the
  framework's own submodule: ``mha.query`` in NNX, ``capture_intermediates`` in
  Linen, ``intercept_methods`` in Haiku, ``mha.query_proj`` in Equinox, a
  Keras sublayer); for stacked layers, each layer on the same input (the
  single-layer module vmapped over the stack);
- the forward of the **whole** layer, which inference traces.

``test_truth`` checks the hand table against the Jacobian, ``test_inference``
checks inference against the hand table, so inference equals the truth for
every parameter. ``test_default_is_wrong`` lists where ``centralize()``'s
default ``output_axis=-1`` is wrong.
"""

import dataclasses
import os
import re
from collections.abc import Callable
from typing import Any

import _truth
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_gc

Spec = tuple[int, ...] | None


pytestmark = pytest.mark.usefixtures("fast_compiles")  # conftest.py, at the root


def _is_spec(x: Any) -> bool:
  return x is None or (isinstance(x, tuple) and all(isinstance(a, int) for a in x))


_flat = _truth.by_key
_replace = _truth.replace


def _spec_by_key(spec: Any, params: Any) -> dict[str, Any]:
  """The leaves of a spec tree, by the key of the parameter they belong to."""
  keys = list(_flat(params))
  return dict(zip(keys, jax.tree_util.tree_structure(params).flatten_up_to(spec), strict=True))


def _abstract(tree: Any) -> Any:
  """Every array leaf as a ``jax.ShapeDtypeStruct``."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
      if isinstance(x, (jax.Array, np.ndarray)) else x, tree)


def _filled(tree: Any, seed: int = 0) -> Any:
  """Concrete values for the ``jax.ShapeDtypeStruct`` leaves of an abstract (eval_shape) tree.

  The weights' values do not matter here (inference only traces; the truth redraws every
  weight), and filling them with NumPy skips compiling each framework's initializers, which
  would dominate these tests' time.
  """
  rng = np.random.default_rng(seed)

  def fill(x):
    if not isinstance(x, jax.ShapeDtypeStruct):
      return x
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(np.zeros(x.shape + (2,), np.uint32))
    if jnp.issubdtype(x.dtype, jnp.floating):
      return jnp.asarray(rng.standard_normal(x.shape), x.dtype)
    return jnp.zeros(x.shape, x.dtype)

  return jax.tree.map(fill, tree)


def measure(
    fn: Callable[..., Any], params: Any, key: str, *inputs: Any, features=(-1,)
) -> Callable[[], Spec]:
  """The Jacobian truth of leaf ``key`` of ``params`` in ``fn(params, *inputs)`` (lazy)."""
  return lambda: _truth.leaf_output_axes(fn, params, key, *inputs, feature_axes=features)


def measure_all(fn, params, *inputs, features=(-1,)) -> dict[str, Callable[[], Spec]]:
  """:func:`measure` for every leaf of ``params``, all owned by ``fn`` itself."""
  return {k: measure(fn, params, k, *inputs, features=features) for k in _flat(params)}


@dataclasses.dataclass
class Layer:
  """A real layer: the whole forward for inference, and the truth of each parameter."""

  fn: Callable[..., Any]  # the whole layer's forward, fn(params, *args)
  params: Any
  args: tuple[Any, ...]
  expected: dict[str, Spec]  # per parameter: the output axes, by hand
  truths: dict[str, Callable[[], Spec]]  # per parameter: the Jacobian truth
  default_wrong: tuple[str, ...]  # where centralize()'s default output_axis=-1 is wrong
  infer_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  nnx_model: Any = None  # for optax_gc.nnx_output_axes(nnx_model, *args)


CASES: dict[str, Callable[[], Layer]] = {}


def case(fn: Callable[[], Layer]) -> Callable[[], Layer]:
  CASES[fn.__name__] = fn
  return fn


def _x(*shape: int) -> jax.Array:
  """Random normal inputs (NumPy: nothing to compile)."""
  return jnp.asarray(np.random.default_rng(sum(shape)).standard_normal(shape), jnp.float32)


_TOKENS = jnp.arange(6).reshape(2, 3)  # every row of a 6-row table is looked up.


# ------------------------------------------------------------------------------------------
# Flax NNX
# ------------------------------------------------------------------------------------------


def _new(ctor: Callable[[], Any]) -> Any:
  """``ctor()``, an NNX module, built abstractly and filled (see :func:`_filled`)."""
  from flax import nnx

  graphdef, state = nnx.split(nnx.eval_shape(ctor))
  return nnx.merge(graphdef, _filled(state))


def _nnx(module, method: str = "__call__"):
  """``(fn, params)``: the module as a function of its ``nnx.Param`` state."""
  from flax import nnx

  graphdef, params, rest = nnx.split(module, nnx.Param, ...)

  def fn(p, *args):
    return getattr(nnx.merge(graphdef, p, rest), method)(*args)

  return fn, params


def _nnx_whole(module, *args, features=(-1,), expected, default_wrong=(), **kw) -> Layer:
  fn, params = _nnx(module)
  return Layer(fn, params, args, expected, measure_all(fn, params, *args, features=features),
               default_wrong, nnx_model=module, **kw)


@case
def nnx_linear():
  from flax import nnx

  m = _new(lambda: nnx.Linear(4, 5, rngs=nnx.Rngs(0)))
  return _nnx_whole(m, _x(2, 3, 4), expected={"kernel": (1,), "bias": None})


@case
def nnx_conv1d():
  from flax import nnx

  m = _new(lambda: nnx.Conv(3, 6, kernel_size=(3,), rngs=nnx.Rngs(0)))
  return _nnx_whole(m, _x(2, 7, 3), expected={"kernel": (2,), "bias": None})


@case
def nnx_conv2d_grouped():
  from flax import nnx

  m = _new(lambda: nnx.Conv(4, 6, kernel_size=(3, 3), feature_group_count=2, rngs=nnx.Rngs(0)))
  return _nnx_whole(m, _x(1, 5, 5, 4), expected={"kernel": (3,), "bias": None})


@case
def nnx_conv2d_depthwise():
  from flax import nnx

  # kernel (3, 3, 1, 6): the size-1 input axis is neither output nor fan-in.
  m = _new(lambda: nnx.Conv(3, 6, kernel_size=(3, 3), feature_group_count=3, rngs=nnx.Rngs(0)))
  return _nnx_whole(m, _x(1, 5, 5, 3), expected={"kernel": (3,), "bias": None})


@case
def nnx_conv_transpose():
  from flax import nnx

  m = _new(lambda: nnx.ConvTranspose(3, 5, kernel_size=(3, 3), strides=(2, 2), rngs=nnx.Rngs(0)))
  return _nnx_whole(m, _x(1, 4, 4, 3), expected={"kernel": (3,), "bias": None})


@case
def nnx_conv_transpose_transpose_kernel():
  from flax import nnx

  # transpose_kernel=True stores (kh, kw, out, in).
  m = _new(lambda: nnx.ConvTranspose(3, 5, kernel_size=(3, 3), strides=(2, 2),
                                     transpose_kernel=True, rngs=nnx.Rngs(0)))
  return _nnx_whole(m, _x(1, 4, 4, 3), expected={"kernel": (2,), "bias": None},
                    default_wrong=("kernel",))


@case
def nnx_linear_general():
  from flax import nnx

  m = _new(lambda: nnx.LinearGeneral(4, (3, 5), rngs=nnx.Rngs(0)))
  return _nnx_whole(m, _x(2, 3, 4), features=(-2, -1),
                    expected={"kernel": (1, 2), "bias": None},
                    default_wrong=("kernel", "bias"))


@case
def nnx_linear_general_batch_axis():
  from flax import nnx

  # One (in, out) kernel per index of the input's axis 0: kernel (3, 4, 5).
  m = _new(lambda: nnx.LinearGeneral(4, 5, axis=-1, batch_axis={0: 3}, rngs=nnx.Rngs(0)))
  return _nnx_whole(m, _x(3, 2, 4), features=(0, -1),
                    expected={"kernel": (0, 2), "bias": None},
                    default_wrong=("kernel", "bias"))


@case
def nnx_linear_general_two_in_axes():
  from flax import nnx

  # Two fan-in axes: kernel (3, 4, 5).
  m = _new(lambda: nnx.LinearGeneral((3, 4), 5, axis=(-2, -1), rngs=nnx.Rngs(0)))
  return _nnx_whole(m, _x(2, 3, 4), expected={"kernel": (2,), "bias": None})


@case
def nnx_multi_head_attention():
  from flax import nnx

  m = _new(lambda: nnx.MultiHeadAttention(
      num_heads=2, in_features=6, qkv_features=8, out_features=5, decode=False,
      rngs=nnx.Rngs(0)))
  x = _x(2, 3, 6)
  truths = {}
  for name in ("query", "key", "value"):
    fn, params = _nnx(getattr(m, name))
    for leaf in ("kernel", "bias"):
      truths[f"{name}/{leaf}"] = measure(fn, params, leaf, x, features=(-2, -1))
  fn, params = _nnx(m.out)
  for leaf in ("kernel", "bias"):
    truths[f"out/{leaf}"] = measure(fn, params, leaf, _x(2, 3, 2, 4))
  expected = {f"{n}/kernel": (1, 2) for n in ("query", "key", "value")}
  expected |= {f"{n}/bias": None for n in ("query", "key", "value", "out")}
  expected["out/kernel"] = (2,)
  fn, params = _nnx(m)
  return Layer(fn, params, (x,), expected, truths,
               default_wrong=tuple(f"{n}/{leaf}" for n in ("query", "key", "value")
                                   for leaf in ("kernel", "bias")), nnx_model=m)


@case
def nnx_einsum():
  from flax import nnx

  m = _new(lambda: nnx.Einsum("btd,ndh->btnh", (3, 4, 5), (3, 5), rngs=nnx.Rngs(0)))
  return _nnx_whole(m, _x(2, 3, 4), features=(-2, -1),
                    expected={"kernel": (0, 2), "bias": None},
                    default_wrong=("kernel", "bias"))


@case
def nnx_embed_lookup():
  from flax import nnx

  # A lookup's units are the feature axis; inference leaves lookups alone unless asked.
  m = _new(lambda: nnx.Embed(6, 4, rngs=nnx.Rngs(0)))
  return _nnx_whole(m, _TOKENS, expected={"embedding": (1,)},
                    infer_kwargs={"centralize_lookups": True})


@case
def nnx_embed_attend():
  from flax import nnx

  m = _new(lambda: nnx.Embed(6, 4, rngs=nnx.Rngs(0)))
  fn, params = _nnx(m, "attend")
  x = _x(2, 3, 4)
  return Layer(fn, params, (x,), {"embedding": (0,)}, measure_all(fn, params, x),
               default_wrong=("embedding",))


@case
def nnx_lora_linear():
  from flax import nnx

  m = _new(lambda: nnx.LoRALinear(4, 5, lora_rank=2, rngs=nnx.Rngs(0)))
  x = _x(2, 3, 4)
  fn, params = _nnx(m)
  truths = {k: measure(fn, params, k, x) for k in ("kernel", "bias", "lora/lora_b")}
  # lora_a's direct output is the rank-2 hidden x @ lora_a. With lora_b a selector
  # (rank r -> output r) and the base kernel zero, the layer's outputs 0 and 1 are it.
  lora_fn, lora_params = _nnx(m.lora)
  selector = jnp.eye(2, 5)

  def hidden(a, x):
    p = _replace(_replace(lora_params, "lora_a", a), "lora_b", selector)
    return lora_fn(p, x)

  truths["lora/lora_a"] = lambda: _truth.output_axes(
      hidden, _flat(lora_params)["lora_a"], x)
  return Layer(fn, params, (x,),
               {"kernel": (1,), "bias": None, "lora/lora_a": (1,), "lora/lora_b": (1,)},
               truths, default_wrong=(), nnx_model=m)


def _nnx_stack(forward: str):
  from flax import nnx

  class Stack(nnx.Module):
    """Three Linear(4, 4) layers, created with nnx.vmap (Flax's scan-over-layers idiom)."""

    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0, 0))
    def __init__(self, rngs: nnx.Rngs):
      self.linear = nnx.Linear(4, 4, rngs=rngs)

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def scan(self, x):
      return nnx.relu(self.linear(x))

    @nnx.vmap(in_axes=(0, None))
    def ensemble(self, x):
      return self.linear(x)

  m = _new(lambda: Stack(nnx.Rngs(0)))
  x = _x(2, 4)
  # Truth: each layer on the same input, the single-layer module vmapped over the stack.
  layer_fn, layer_params = _nnx(m.linear)
  stacked = lambda p, x: jax.vmap(lambda q: layer_fn(q, x))(p)  # noqa: E731
  truths = {f"linear/{k}": measure(stacked, layer_params, k, x, features=(0, -1))
            for k in ("kernel", "bias")}
  fn, params = _nnx(m, forward)
  return Layer(fn, params, (x,), {"linear/kernel": (0, 2), "linear/bias": None}, truths,
               default_wrong=("linear/kernel", "linear/bias"))


@case
def nnx_scan_stack():
  return _nnx_stack("scan")


@case
def nnx_vmap_stack():
  return _nnx_stack("ensemble")


# ------------------------------------------------------------------------------------------
# Flax Linen
# ------------------------------------------------------------------------------------------


def _linen(module, *args):
  """``(fn, params)``: ``module.apply`` as a function of its ``params`` collection."""
  params = _filled(jax.eval_shape(module.init, jax.random.key(0), *args))["params"]
  return (lambda p, *a: module.apply({"params": p}, *a)), params


def _linen_whole(module, *args, features=(-1,), expected, default_wrong=(), **kw) -> Layer:
  fn, params = _linen(module, *args)
  return Layer(fn, params, args, expected, measure_all(fn, params, *args, features=features),
               default_wrong, **kw)


def _linen_intermediate(module, name: str):
  """``fn(params, *args)``: the direct output of submodule ``name`` (capture_intermediates)."""

  def fn(p, *args):
    _, state = module.apply({"params": p}, *args, capture_intermediates=True,
                            mutable=["intermediates"])
    return state["intermediates"][name]["__call__"][0]

  return fn


@case
def linen_dense():
  import flax.linen as nn

  return _linen_whole(nn.Dense(5), _x(2, 3, 4), expected={"kernel": (1,), "bias": None})


@case
def linen_conv1d():
  import flax.linen as nn

  return _linen_whole(nn.Conv(6, (3,)), _x(2, 7, 3), expected={"kernel": (2,), "bias": None})


@case
def linen_conv2d_grouped():
  import flax.linen as nn

  return _linen_whole(nn.Conv(6, (3, 3), feature_group_count=2), _x(1, 5, 5, 4),
                      expected={"kernel": (3,), "bias": None})


@case
def linen_conv2d_depthwise():
  import flax.linen as nn

  return _linen_whole(nn.Conv(6, (3, 3), feature_group_count=3), _x(1, 5, 5, 3),
                      expected={"kernel": (3,), "bias": None})


@case
def linen_conv_transpose():
  import flax.linen as nn

  return _linen_whole(nn.ConvTranspose(5, (3, 3), strides=(2, 2)), _x(1, 4, 4, 3),
                      expected={"kernel": (3,), "bias": None})


@case
def linen_conv_transpose_transpose_kernel():
  import flax.linen as nn

  return _linen_whole(nn.ConvTranspose(5, (3, 3), strides=(2, 2), transpose_kernel=True),
                      _x(1, 4, 4, 3), expected={"kernel": (2,), "bias": None},
                      default_wrong=("kernel",))


@case
def linen_conv_local():
  import flax.linen as nn

  # One unshared kernel per output pixel: kernel (3, 3, 3 * 3 * 3, 6), bias (3, 3, 6).
  # VALID padding, so that every kernel entry sees an input.
  return _linen_whole(nn.ConvLocal(6, (3, 3), padding="VALID"), _x(1, 5, 5, 3),
                      features=(1, 2, 3), expected={"kernel": (0, 1, 3), "bias": None},
                      default_wrong=("kernel", "bias"))


@case
def linen_dense_general():
  import flax.linen as nn

  return _linen_whole(nn.DenseGeneral((3, 5)), _x(2, 3, 4), features=(-2, -1),
                      expected={"kernel": (1, 2), "bias": None},
                      default_wrong=("kernel", "bias"))


@case
def linen_dense_general_batch_dims():
  import flax.linen as nn

  return _linen_whole(nn.DenseGeneral(5, batch_dims=(0,)), _x(3, 2, 4), features=(0, -1),
                      expected={"kernel": (0, 2), "bias": None},
                      default_wrong=("kernel", "bias"))


@case
def linen_weight_norm():
  import flax.linen as nn

  # kernel * scale / ||kernel|| (norm over the fan-in of each output column).
  return _linen_whole(nn.WeightNorm(nn.Dense(5)), _x(2, 3, 4),
                      expected={"layer_instance/kernel": (1,), "layer_instance/bias": None,
                                "layer_instance/kernel/scale": None})


@case
def linen_multi_head_attention():
  import flax.linen as nn

  m = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, out_features=5)
  x = _x(2, 3, 6)
  fn, params = _linen(m, x)
  truths = {}
  for name in ("query", "key", "value", "out"):
    sub = _linen_intermediate(m, name)
    feats = (-1,) if name == "out" else (-2, -1)
    for leaf in ("kernel", "bias"):
      truths[f"{name}/{leaf}"] = measure(sub, params, f"{name}/{leaf}", x, features=feats)
  expected = {f"{n}/kernel": (1, 2) for n in ("query", "key", "value")}
  expected |= {f"{n}/bias": None for n in ("query", "key", "value", "out")}
  expected["out/kernel"] = (2,)
  return Layer(fn, params, (x,), expected, truths,
               default_wrong=tuple(f"{n}/{leaf}" for n in ("query", "key", "value")
                                   for leaf in ("kernel", "bias")))


@case
def linen_einsum():
  import flax.linen as nn

  return _linen_whole(nn.Einsum((3, 4, 5), "btd,ndh->btnh"), _x(2, 3, 4), features=(-2, -1),
                      expected={"kernel": (0, 2), "bias": None},
                      default_wrong=("kernel", "bias"))


@case
def linen_embed_lookup():
  import flax.linen as nn

  return _linen_whole(nn.Embed(6, 4), _TOKENS, expected={"embedding": (1,)},
                      infer_kwargs={"centralize_lookups": True})


@case
def linen_embed_attend():
  import flax.linen as nn

  m = nn.Embed(6, 4)
  _, params = _linen(m, _TOKENS)
  fn = lambda p, x: m.apply({"params": p}, x, method=m.attend)  # noqa: E731
  x = _x(2, 3, 4)
  return Layer(fn, params, (x,), {"embedding": (0,)}, measure_all(fn, params, x),
               default_wrong=("embedding",))


def _linen_block():
  import flax.linen as nn

  class Block(nn.Module):
    """Dense + relu as a scan body: (carry, x) -> (carry, y)."""

    @nn.compact
    def __call__(self, carry, _):
      return nn.relu(nn.Dense(4)(carry)), None

  return Block


@case
def linen_scan_remat():
  import flax.linen as nn

  block = _linen_block()
  stack = nn.scan(nn.remat(block), variable_axes={"params": 0}, split_rngs={"params": True},
                  length=3)()
  x = _x(2, 4)
  fn, params = _linen(stack, x, None)
  # Truth: each layer's Dense on the same input, the single block vmapped over the stack.
  dense = _linen_intermediate(block(), "Dense_0")
  per_layer = lambda p, x: jax.vmap(lambda q: dense(q, x, None))(p)  # noqa: E731
  truths = {k: measure(per_layer, params, k, x, features=(0, -1))
            for k in ("Dense_0/kernel", "Dense_0/bias")}
  return Layer(fn, params, (x, None), {"Dense_0/kernel": (0, 2), "Dense_0/bias": None},
               truths, default_wrong=("Dense_0/kernel", "Dense_0/bias"))


@case
def linen_vmap_ensemble():
  import flax.linen as nn

  ensemble = nn.vmap(nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=None, axis_size=3)(4)
  return _linen_whole(ensemble, _x(2, 4), features=(0, -1),
                      expected={"kernel": (0, 2), "bias": None},
                      default_wrong=("kernel", "bias"))


# ------------------------------------------------------------------------------------------
# Haiku
# ------------------------------------------------------------------------------------------


def _haiku(f, *args):
  """``(fn, params)`` for ``hk.transform(f)``."""
  import haiku as hk

  t = hk.transform(f)
  params = _filled(jax.eval_shape(t.init, jax.random.key(0), *args))
  return (lambda p, *a: t.apply(p, None, *a)), params


def _haiku_whole(f, *args, features=(-1,), expected, default_wrong=(), **kw) -> Layer:
  fn, params = _haiku(f, *args)
  return Layer(fn, params, args, expected, measure_all(fn, params, *args, features=features),
               default_wrong, **kw)


def _haiku_intercepted(f, module_name: str):
  """``fn(params, *args)``: the direct output of submodule ``module_name`` inside ``f``."""
  import haiku as hk

  def g(*args):
    captured = []

    def interceptor(next_f, a, kw, context):
      y = next_f(*a, **kw)
      if context.method_name == "__call__" and context.module.module_name == module_name:
        captured.append(y)
      return y

    with hk.intercept_methods(interceptor):
      f(*args)
    (y,) = captured
    return y

  t = hk.transform(g)
  return lambda p, *a: t.apply(p, None, *a)


@case
def haiku_linear():
  import haiku as hk

  return _haiku_whole(lambda x: hk.Linear(5)(x), _x(2, 3, 4),
                      expected={"linear/w": (1,), "linear/b": None})


@case
def haiku_conv2d():
  import haiku as hk

  return _haiku_whole(lambda x: hk.Conv2D(6, 3)(x), _x(1, 5, 5, 4),
                      expected={"conv2_d/w": (3,), "conv2_d/b": None})


@case
def haiku_conv2d_nchw():
  import haiku as hk

  # Channels first: w stays (kh, kw, in, out); b is (out, 1, 1).
  return _haiku_whole(lambda x: hk.Conv2D(6, 3, data_format="NCHW")(x), _x(1, 4, 5, 5),
                      features=(1,), expected={"conv2_d/w": (3,), "conv2_d/b": None},
                      default_wrong=("conv2_d/b",))


@case
def haiku_conv2d_transpose():
  import haiku as hk

  # w: (kh, kw, out, in).
  return _haiku_whole(lambda x: hk.Conv2DTranspose(5, 3, stride=2)(x), _x(1, 4, 4, 3),
                      expected={"conv2_d_transpose/w": (2,), "conv2_d_transpose/b": None},
                      default_wrong=("conv2_d_transpose/w",))


@case
def haiku_depthwise_conv2d():
  import haiku as hk

  # w: (kh, kw, 1, in * multiplier).
  return _haiku_whole(lambda x: hk.DepthwiseConv2D(2, 3)(x), _x(1, 5, 5, 3),
                      expected={"depthwise_conv2_d/w": (3,), "depthwise_conv2_d/b": None})


@case
def haiku_embed_array_index():
  import haiku as hk

  return _haiku_whole(lambda ids: hk.Embed(6, 4, lookup_style="ARRAY_INDEX")(ids), _TOKENS,
                      expected={"embed/embeddings": (1,)},
                      infer_kwargs={"centralize_lookups": True})


@case
def haiku_embed_one_hot():
  import haiku as hk

  # one_hot(ids) @ table: a contraction over the vocabulary, not a gather, so inference
  # treats it as a dense layer with or without centralize_lookups.
  return _haiku_whole(lambda ids: hk.Embed(6, 4, lookup_style="ONE_HOT")(ids), _TOKENS,
                      expected={"embed/embeddings": (1,)})


@case
def haiku_multi_head_attention():
  import haiku as hk

  def f(x):
    mha = hk.MultiHeadAttention(num_heads=2, key_size=4, model_size=5,
                                w_init=hk.initializers.VarianceScaling(1.0))
    return mha(x, x, x)

  x = _x(2, 3, 6)
  fn, params = _haiku(f, x)
  truths, expected = {}, {}
  for name in ("query", "key", "value", "linear"):
    full = f"multi_head_attention/{name}"
    sub = _haiku_intercepted(f, full)
    for leaf, spec in (("w", (1,)), ("b", None)):
      truths[f"{full}/{leaf}"] = measure(sub, params, f"{full}/{leaf}", x)
      expected[f"{full}/{leaf}"] = spec
  return Layer(fn, params, (x,), expected, truths, default_wrong=())


# ------------------------------------------------------------------------------------------
# Equinox (unbatched modules: a batch is a jax.vmap)
# ------------------------------------------------------------------------------------------


def _eqx_new(ctor: Callable[..., Any], *args, **kwargs) -> Any:
  """``ctor(*args, key=..., **kwargs)``, an Equinox module, built abstractly and filled."""
  import equinox as eqx

  return _filled(eqx.filter_eval_shape(ctor, *args, key=jax.random.key(0), **kwargs))


def _eqx(model, call: Callable[..., Any]):
  """``(fn, params)``: ``call(model, *args)`` as a function of the model's arrays."""
  import equinox as eqx

  params, static = eqx.partition(model, eqx.is_array)
  return (lambda p, *a: call(eqx.combine(p, static), *a)), params


def _eqx_whole(model, call, *args, features=(-1,), expected, default_wrong=(), **kw) -> Layer:
  fn, params = _eqx(model, call)
  return Layer(fn, params, args, expected, measure_all(fn, params, *args, features=features),
               default_wrong, **kw)


def _batched(m, x):
  return jax.vmap(m)(x)


@case
def eqx_linear():
  import equinox as eqx

  # weight (out, in), as in PyTorch.
  return _eqx_whole(_eqx_new(eqx.nn.Linear, 4, 5), _batched, _x(3, 4),
                    expected={"weight": (0,), "bias": None}, default_wrong=("weight",))


@case
def eqx_conv2d():
  import equinox as eqx

  # weight (out, in, kh, kw), bias (out, 1, 1); output (out, h, w).
  return _eqx_whole(_eqx_new(eqx.nn.Conv2d, 4, 6, 3), lambda m, x: m(x),
                    _x(4, 5, 5), features=(0,), expected={"weight": (0,), "bias": None},
                    default_wrong=("weight", "bias"))


@case
def eqx_conv2d_grouped():
  import equinox as eqx

  # weight (out, in // groups, kh, kw).
  return _eqx_whole(_eqx_new(eqx.nn.Conv2d, 4, 6, 3, groups=2), lambda m, x: m(x),
                    _x(4, 5, 5), features=(0,), expected={"weight": (0,), "bias": None},
                    default_wrong=("weight", "bias"))


@case
def eqx_conv_transpose2d():
  import equinox as eqx

  m = _eqx_new(eqx.nn.ConvTranspose2d, 3, 5, 3, stride=2)
  return _eqx_whole(m, lambda m, x: m(x), _x(3, 4, 4), features=(0,),
                    expected={"weight": (0,), "bias": None},
                    default_wrong=("weight", "bias"))


@case
def eqx_multihead_attention():
  import equinox as eqx

  m = _eqx_new(eqx.nn.MultiheadAttention, num_heads=2, query_size=6, qk_size=4, vo_size=4,
               output_size=5, use_query_bias=True, use_output_bias=True)
  x = _x(3, 6)
  fn, params = _eqx(m, lambda m, x: m(x, x, x))
  truths = {}
  for name in ("query_proj", "key_proj", "value_proj", "output_proj"):
    sub = getattr(m, name)
    sub_fn, sub_params = _eqx(sub, _batched)
    inp = x if name != "output_proj" else _x(3, 8)
    for leaf in _flat(sub_params):
      truths[f"{name}/{leaf}"] = measure(sub_fn, sub_params, leaf, inp)
  expected = {f"{n}/weight": (0,) for n in ("query_proj", "key_proj", "value_proj",
                                            "output_proj")}
  expected |= {"query_proj/bias": None, "output_proj/bias": None}
  return Layer(fn, params, (x,), expected, truths,
               default_wrong=tuple(k for k in expected if k.endswith("weight")))


@case
def eqx_embedding():
  import equinox as eqx

  return _eqx_whole(_eqx_new(eqx.nn.Embedding, 6, 4), _batched,
                    jnp.arange(6), expected={"weight": (1,)},
                    infer_kwargs={"centralize_lookups": True})


# ------------------------------------------------------------------------------------------
# Keras 3 on the JAX backend
# ------------------------------------------------------------------------------------------


def _keras_module():
  """Keras with ``KERAS_BACKEND=jax`` (set before the first import), or a skip."""
  import sys

  if "keras" not in sys.modules:
    os.environ.setdefault("KERAS_BACKEND", "jax")
  keras = pytest.importorskip("keras")
  if keras.backend.backend() != "jax":
    pytest.skip(f"Keras runs on {keras.backend.backend()}, not jax")
  return keras


def _keras(layer, *args):
  """``(fn, params)``: ``layer.stateless_call`` with ``params`` keyed by variable path."""
  layer(*args)  # builds the layer
  trainable = list(layer.trainable_variables)
  frozen = [v.value for v in layer.non_trainable_variables]
  params = {v.path: v.value for v in trainable}

  def fn(p, *a):
    return layer.stateless_call([p[v.path] for v in trainable], frozen, *a)[0]

  return fn, params


def _keras_whole(layer, *args, features=(-1,), expected, default_wrong=()) -> Layer:
  fn, params = _keras(layer, *args)
  return Layer(fn, params, args, expected, measure_all(fn, params, *args, features=features),
               default_wrong)


@case
def keras_dense():
  keras = _keras_module()
  return _keras_whole(keras.layers.Dense(5, name="dense"), _x(2, 3, 4),
                      expected={"dense/kernel": (1,), "dense/bias": None})


@case
def keras_einsum_dense():
  keras = _keras_module()
  layer = keras.layers.EinsumDense("abc,cde->abde", output_shape=(None, 3, 5), bias_axes="de",
                                   name="einsum_dense")
  return _keras_whole(layer, _x(2, 3, 4), features=(-2, -1),
                      expected={"einsum_dense/kernel": (1, 2), "einsum_dense/bias": None},
                      default_wrong=("einsum_dense/kernel", "einsum_dense/bias"))


@case
def keras_multi_head_attention():
  keras = _keras_module()
  mha = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, output_shape=5, name="mha")
  x = _x(2, 3, 6)
  fn, params = _keras(mha, x, x)
  truths, expected = {}, {}
  for sub, inp, feats in ((mha.query_dense, x, (-2, -1)), (mha.key_dense, x, (-2, -1)),
                          (mha.value_dense, x, (-2, -1)),
                          (mha.output_dense, _x(2, 3, 2, 4), (-1,))):
    sub_fn, sub_params = _keras(sub, inp)
    for k in sub_params:
      truths[k] = measure(sub_fn, sub_params, k, inp, features=feats)
      expected[k] = None if k.endswith("bias") else (1, 2) if len(feats) == 2 else (2,)
  return Layer(fn, params, (x, x), expected, truths,
               default_wrong=tuple(k for k in expected
                                   if "attention_output" not in k))


@case
def keras_conv2d_transpose():
  keras = _keras_module()
  # kernel (kh, kw, out, in).
  layer = keras.layers.Conv2DTranspose(5, 3, strides=2, name="conv_t")
  return _keras_whole(layer, _x(1, 4, 4, 3),
                      expected={"conv_t/kernel": (2,), "conv_t/bias": None},
                      default_wrong=("conv_t/kernel",))


@case
def keras_depthwise_conv2d():
  keras = _keras_module()
  # kernel (kh, kw, in, multiplier): output channel c * multiplier + m.
  layer = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="dw")
  return _keras_whole(layer, _x(1, 5, 5, 3),
                      expected={"dw/kernel": (2, 3), "dw/bias": None},
                      default_wrong=("dw/kernel",))


# ------------------------------------------------------------------------------------------
# PyTorch layouts, written in JAX (torch is not a test dependency)
# ------------------------------------------------------------------------------------------


@case
def pytorch_layout_conv_transpose2d():
  # torch.nn.ConvTranspose2d's weight is (in, out, kh, kw); its forward is the gradient of a
  # conv whose OIHW kernel is that weight, i.e. lax.conv_transpose with transpose_kernel.
  def fn(p, x):
    y = jax.lax.conv_transpose(x, p["weight"], (2, 2), "SAME", transpose_kernel=True,
                               dimension_numbers=("NCHW", "OIHW", "NCHW"))
    return y + p["bias"][:, None, None]

  params = {"weight": _x(3, 4, 3, 3), "bias": _x(4)}
  x = _x(2, 3, 5, 5)
  return Layer(fn, params, (x,), {"weight": (1,), "bias": None},
               measure_all(fn, params, x, features=(1,)), default_wrong=("weight",))


# ------------------------------------------------------------------------------------------
# The tests
# ------------------------------------------------------------------------------------------


_BUILT: dict[str, Layer] = {}


def build(name: str) -> Layer:
  if name not in _BUILT:
    _BUILT[name] = _skip_without_framework(CASES[name])
  return _BUILT[name]


def _skip_without_framework(make: Callable[[], Any]) -> Any:
  """``make()``, or a skip when the framework it builds a layer with is not installed."""
  try:
    return make()
  except ModuleNotFoundError as e:
    if (e.name or "").split(".")[0] not in ("flax", "haiku", "equinox", "keras"):
      raise
    pytest.skip(f"{e.name} is not installed")


def _shapes(layer: Layer) -> dict[str, tuple[int, ...]]:
  return {k: tuple(np.shape(x)) for k, x in _flat(layer.params).items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_truth(name):
  """The Jacobian truth of every parameter equals the hand-written table."""
  layer = build(name)
  shapes = _shapes(layer)
  assert set(layer.expected) == set(shapes) == set(layer.truths), (name, sorted(shapes))
  got = {k: layer.truths[k]() for k in shapes}
  want = {k: _truth.canonical(v, shapes[k]) for k, v in layer.expected.items()}
  assert got == want, {k: (shapes[k], got[k], want[k]) for k in shapes if got[k] != want[k]}


@pytest.mark.parametrize("name", sorted(CASES))
def test_default_is_wrong(name):
  """Where ``centralize()``'s default ``output_axis=-1`` disagrees with the truth."""
  layer = build(name)
  shapes = _shapes(layer)
  wrong = {k for k, s in shapes.items()
           if _truth.default_spec(s) != _truth.canonical(layer.expected[k], s)}
  assert wrong == set(layer.default_wrong), (name, sorted(wrong))


@pytest.mark.parametrize("name", sorted(CASES))
def test_inference(name):
  """Inference on the whole layer's forward equals the truth, for every parameter."""
  layer = build(name)
  spec = optax_gc.infer_output_axes(layer.fn, layer.params, *layer.args, **layer.infer_kwargs)
  got = _spec_by_key(spec, layer.params)
  shapes = _shapes(layer)
  for k, v in got.items():
    assert v is None or (isinstance(v, tuple) and list(v) == sorted(set(v))
                         and all(0 <= a < len(shapes[k]) for a in v)), (k, v)
  canon = {k: _truth.canonical(v, shapes[k]) for k, v in got.items()}
  want = {k: _truth.canonical(v, shapes[k]) for k, v in layer.expected.items()}
  assert canon == want, {k: (shapes[k], "inferred", canon[k], "truth", want[k])
                         for k in shapes if canon[k] != want[k]}
  # Trace-only: jax.ShapeDtypeStruct parameters and inputs give the same spec.
  abstract = optax_gc.infer_output_axes(layer.fn, _abstract(layer.params),
                                        *_abstract(layer.args), **layer.infer_kwargs)
  assert _spec_by_key(abstract, layer.params) == got
  if layer.nnx_model is not None:
    nnx_spec = optax_gc.nnx_output_axes(layer.nnx_model, *layer.args, **layer.infer_kwargs)
    # A pure nnx.State, the structure of nnx.state(model, nnx.Param) without Variables.
    assert _flat(nnx_spec, is_leaf=_is_spec) == got


_LOOKUPS = ("nnx_embed_lookup", "linen_embed_lookup", "haiku_embed_array_index",
            "eqx_embedding")


@pytest.mark.parametrize("name", _LOOKUPS)
def test_lookup_tables_are_left_alone_by_default(name):
  layer = build(name)
  spec = optax_gc.infer_output_axes(layer.fn, layer.params, *layer.args)
  assert list(_spec_by_key(spec, layer.params).values()) == [None]


def _tied_nnx():
  from flax import nnx

  m = _new(lambda: nnx.Embed(6, 4, rngs=nnx.Rngs(0)))
  fn, params = _nnx(m)
  return (lambda p, ids: fn(p, ids) @ p["embedding"][...].T), params, "embedding/value"


def _tied_nnx_attend():
  from flax import nnx

  m = _new(lambda: nnx.Embed(6, 4, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(m)

  def fn(p, ids):
    e = nnx.merge(graphdef, p)
    return e.attend(e(ids))

  return fn, params, "embedding/value"


def _tied_linen():
  import flax.linen as nn

  m = nn.Embed(6, 4)
  params = m.init(jax.random.key(0), _TOKENS)["params"]
  fn = lambda p, ids: m.apply({"params": p}, m.apply({"params": p}, ids),  # noqa: E731
                              method=m.attend)
  return fn, params, "embedding"


@pytest.mark.parametrize("make", [_tied_nnx, _tied_nnx_attend, _tied_linen])
def test_tied_embedding_is_a_conflict(make):
  """Lookup and logits imply different output axes: the error lists both uses."""
  fn, params, key = _skip_without_framework(make)
  with pytest.raises(ValueError) as e:
    optax_gc.infer_output_axes(fn, params, _TOKENS)
  msg = str(e.value)
  assert "(6, 4)" in msg and "embedding" in msg, msg
  assert "gather" in msg and "dot_general" in msg and "output axes (0,)" in msg, msg
  # The two truths: (1,) for the lookup, (0,) for the logits (see truth_test.py).
  spec = optax_gc.infer_output_axes(fn, params, _TOKENS, overrides={key: (0,)})
  assert list(_spec_by_key(spec, params).values()) == [(0,)]
  spec = optax_gc.infer_output_axes(fn, params, _TOKENS, overrides={key: None})
  assert list(_spec_by_key(spec, params).values()) == [None]


def _conflict_w_and_w_t(p, x):  # a tied autoencoder
  return (x @ p["w"]) @ p["w"].T


def _conflict_merging_reshape(p, x):  # (4, 5) -> (2, 10) mixes fan-in and output entries
  return x[..., :2] @ p["w"].reshape(2, 10)


def _opaque(p, x):  # a primitive without a rule
  w = jax.pure_callback(lambda w: w, jax.ShapeDtypeStruct((4, 4), jnp.float32), p["w"])
  return x @ w


@pytest.mark.parametrize("fn, shape, words", [
    (_conflict_w_and_w_t, (4, 4), ("contracting (0,)", "contracting (1,)")),
    (_conflict_merging_reshape, (4, 5), ("dot_general",)),
    (_opaque, (4, 4), ("pure_callback",)),
])
def test_conflicts_and_unfollowable_uses_raise(fn, shape, words):
  params = {"w": jnp.ones(shape), "b": jnp.ones(4)}
  x = _x(3, 4)
  with pytest.raises(ValueError, match=r"\['w'\] with shape " + re.escape(str(shape))) as e:
    optax_gc.infer_output_axes(lambda p, x: fn(p, x) + 0 * p["b"].sum(), params, x)
  assert "'b'" not in str(e.value).replace("['w']", "")
  for word in words:
    assert word in str(e.value), str(e.value)
  spec = optax_gc.infer_output_axes(lambda p, x: fn(p, x) + 0 * p["b"].sum(), params, x,
                                    overrides={"w": (1,)})
  assert spec == {"w": (1,), "b": None}
