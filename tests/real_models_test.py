"""``optax_gc`` inference on real model code: a small Gemma-style decoder, and a scanned one.

The decoder is written the way Flax's own Gemma example (``examples/gemma``) writes it:
``nnx.Einsum`` kernels for q, kv (grouped-query attention) and the fused qkv, RoPE, RMSNorm
with a ``1 + scale`` gain, a gated MLP, and one embedding table used for the lookup and, tied,
for the logits. It is built under an explicit-axes mesh with the example's FSDP/tensor
sharding annotations, so that the jaxpr holds ``reshard`` (``nnx.Embed`` with
``out_sharding`` reshards the table before the lookup), as the example's ``train.py`` sets it
up. One CPU device suffices for the mesh.

The truth of each parameter is the Jacobian sparsity of its own submodule's direct output
(``_truth``); for the scanned model, each layer on the same input.
"""

import dataclasses

import _truth
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import optax_gc

nnx = pytest.importorskip("flax.nnx", reason="the real models are Flax NNX models")

_MASK_VALUE = -2.3819763e38


pytestmark = pytest.mark.usefixtures("fast_compiles")  # conftest.py, at the root


@dataclasses.dataclass(frozen=True)
class Sharding:
  """FSDP + tensor-parallel annotations, named by the axes of each array."""

  emb_vd: P = P("tensor", "fsdp")
  q_ndh: P = P("tensor", "fsdp", None)
  kv_cndh: P = P(None, "tensor", "fsdp", None)
  o_nhd: P = P("tensor", None, "fsdp")
  ffw_df: P = P("fsdp", "tensor")
  ffw_fd: P = P("tensor", "fsdp")
  norm_d: P = P("tensor")
  act_btd: P = P("fsdp", None, "tensor")
  act_btf: P = P("fsdp", None, "tensor")
  act_btnh: P = P("fsdp", None, "tensor", None)
  act_sbtnh: P = P(None, "fsdp", None, "tensor", None)


NO_SHARDING = Sharding(**{f.name: None for f in dataclasses.fields(Sharding)})


@dataclasses.dataclass(frozen=True)
class Config:
  vocab: int = 6
  embed_dim: int = 8
  num_heads: int = 4
  head_dim: int = 2
  hidden_dim: int = 6
  kv_heads: tuple[int, ...] = (2, 4)  # per layer: GQA (q + kv einsums), then fused qkv
  shd: Sharding = Sharding()


def apply_rope(x: jax.Array, positions: jax.Array, max_wavelength: int = 10_000) -> jax.Array:
  """Rotary position embedding of ``x`` (B, T, N, H) at ``positions`` (B, T)."""
  half = x.shape[-1] // 2
  timescale = max_wavelength ** (jnp.arange(half) / half)
  angle = (positions[..., None] / timescale)[..., None, :]  # (B, T, 1, H/2)
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class ScaledEmbed(nnx.Embed):
  """The token embedding, scaled by sqrt(embed_dim); ``attend`` gives the tied logits."""

  def __call__(self, tokens, out_sharding=None):
    return super().__call__(tokens, out_sharding) * jnp.sqrt(self.features)


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, shd: P, *, rngs: nnx.Rngs):
    del rngs
    self.scale = nnx.Param(jnp.zeros((dim,)), out_sharding=shd)

  def __call__(self, x):
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + 1e-6)
    return x * (1.0 + self.scale[...])


class Attention(nnx.Module):

  def __init__(self, cfg: Config, kv_heads: int, *, rngs: nnx.Rngs):
    n, d, h, shd = cfg.num_heads, cfg.embed_dim, cfg.head_dim, cfg.shd
    self.shd = shd
    if kv_heads == n:
      self.qkv_einsum = nnx.Einsum("BTD,SNDH->SBTNH", (3, n, d, h),
                                   kernel_metadata={"out_sharding": shd.kv_cndh}, rngs=rngs)
    else:
      self.q_einsum = nnx.Einsum("BTD,NDH->BTNH", (n, d, h),
                                 kernel_metadata={"out_sharding": shd.q_ndh}, rngs=rngs)
      self.kv_einsum = nnx.Einsum("BSD,CKDH->CBSKH", (2, kv_heads, d, h),
                                  kernel_metadata={"out_sharding": shd.kv_cndh}, rngs=rngs)
    self.attn_vec_einsum = nnx.Einsum("BTNH,NHD->BTD", (n, h, d),
                                      kernel_metadata={"out_sharding": shd.o_nhd}, rngs=rngs)

  def __call__(self, x, positions, mask):
    if hasattr(self, "qkv_einsum"):
      q, k, v = self.qkv_einsum(x, out_sharding=self.shd.act_sbtnh)
    else:
      q = self.q_einsum(x, out_sharding=self.shd.act_btnh)
      k, v = self.kv_einsum(x, out_sharding=self.shd.act_sbtnh)
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = apply_rope(q, positions) * h**-0.5
    k = apply_rope(k, positions)
    # Grouped-query attention: each of the kv_heads serves n // kv_heads query heads.
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)
    logits = jnp.einsum("BTKGH,BSKH->BTKGS", q, k)
    logits = jnp.where(mask[:, :, None, None, :], logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1)
    encoded = jnp.einsum("BTKGS,BSKH->BTKGH", probs, v).reshape(b, t, n, h)
    return self.attn_vec_einsum(encoded, out_sharding=self.shd.act_btd)


class FeedForward(nnx.Module):

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    d, f, shd = cfg.embed_dim, cfg.hidden_dim, cfg.shd
    self.shd = shd
    self.gate_proj = nnx.Linear(d, f, use_bias=False, rngs=rngs,
                                kernel_metadata={"out_sharding": shd.ffw_df})
    self.up_proj = nnx.Linear(d, f, use_bias=False, rngs=rngs,
                              kernel_metadata={"out_sharding": shd.ffw_df})
    self.down_proj = nnx.Linear(f, d, use_bias=False, rngs=rngs,
                                kernel_metadata={"out_sharding": shd.ffw_fd})

  def __call__(self, x):
    gate = nnx.gelu(self.gate_proj(x, out_sharding=self.shd.act_btf))
    hidden = gate * self.up_proj(x, out_sharding=self.shd.act_btf)
    return self.down_proj(hidden, out_sharding=self.shd.act_btd)


class Block(nnx.Module):

  def __init__(self, cfg: Config, kv_heads: int, *, rngs: nnx.Rngs):
    self.pre_attention_norm = RMSNorm(cfg.embed_dim, cfg.shd.norm_d, rngs=rngs)
    self.attn = Attention(cfg, kv_heads, rngs=rngs)
    self.pre_ffw_norm = RMSNorm(cfg.embed_dim, cfg.shd.norm_d, rngs=rngs)
    self.mlp = FeedForward(cfg, rngs=rngs)

  def __call__(self, x, positions, mask):
    x = x + self.attn(self.pre_attention_norm(x), positions, mask)
    return x + self.mlp(self.pre_ffw_norm(x))


class Decoder(nnx.Module):
  """Gemma-style decoder with a tied embedding."""

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    self.shd = cfg.shd
    self.embedder = ScaledEmbed(cfg.vocab, cfg.embed_dim, rngs=rngs,
                                embedding_metadata={"out_sharding": cfg.shd.emb_vd})
    self.layers = nnx.List([Block(cfg, kv, rngs=rngs) for kv in cfg.kv_heads])
    self.final_norm = RMSNorm(cfg.embed_dim, cfg.shd.norm_d, rngs=rngs)

  def __call__(self, tokens, positions, mask):
    x = self.embedder(tokens, out_sharding=self.shd.act_btd)
    for layer in self.layers:
      x = layer(x, positions, mask)
    return self.embedder.attend(self.final_norm(x), out_sharding=self.shd.act_btd)


class ScannedDecoder(nnx.Module):
  """The same blocks (GQA), stacked with nnx.vmap and run with nnx.scan; an untied head."""

  def __init__(self, cfg: Config, num_layers: int, *, rngs: nnx.Rngs):
    self.embedder = nnx.Embed(cfg.vocab, cfg.embed_dim, rngs=rngs)

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return Block(cfg, cfg.kv_heads[0], rngs=rngs)

    self.blocks = create(rngs)
    self.final_norm = RMSNorm(cfg.embed_dim, None, rngs=rngs)
    self.head = nnx.Linear(cfg.embed_dim, cfg.vocab, rngs=rngs)

  def __call__(self, tokens, positions, mask):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(x, block):
      return block(x, positions, mask)

    x = run(self.embedder(tokens), self.blocks)
    return self.head(self.final_norm(x))


def _mesh():
  return jax.make_mesh((1, 1), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)


_B, _T = 2, 3
_TOKENS = jnp.arange(_B * _T).reshape(_B, _T)  # every row of the 6-row table is looked up.
_POSITIONS = jnp.broadcast_to(jnp.arange(_T), (_B, _T))
_MASK = jnp.broadcast_to(jnp.tril(jnp.ones((_T, _T), bool)), (_B, _T, _T))  # causal


def _x(*shape: int) -> jax.Array:
  """Random normal inputs (NumPy: nothing to compile)."""
  return jnp.asarray(np.random.default_rng(sum(shape)).standard_normal(shape), jnp.float32)


def _is_spec(x):
  return x is None or isinstance(x, tuple)


def _truth_of(module, leaf, *inputs, features, stacked=False):
  """The Jacobian truth of ``module``'s parameter ``leaf`` on the module's direct output.

  With ``stacked``, ``module`` holds a stack of layers: each layer runs on the same inputs
  (the single-layer module vmapped over the stack), and the output's leading layer axis is a
  feature axis.
  """
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)

  def fn(p, *xs):
    run = lambda q: nnx.merge(graphdef, q, rest)(*xs)  # noqa: E731
    return jax.vmap(run)(p) if stacked else run(p)

  return _truth.leaf_output_axes(fn, params, leaf, *inputs, feature_axes=features)


def _attend(embed, x):
  return embed.attend(x)


# Hand-written truths, checked against the Jacobian in test_*_truth.
_DECODER = {
    "layers/0/attn/q_einsum/kernel": (0, 2),  # (N, D, H)
    "layers/0/attn/kv_einsum/kernel": (0, 1, 3),  # (2, K, D, H)
    "layers/0/attn/attn_vec_einsum/kernel": (2,),  # (N, H, D)
    "layers/1/attn/qkv_einsum/kernel": (0, 1, 3),  # (3, N, D, H)
    "layers/1/attn/attn_vec_einsum/kernel": (2,),
    **{f"layers/{i}/mlp/{k}_proj/kernel": (1,) for i in (0, 1) for k in ("gate", "up", "down")},
    **{f"layers/{i}/{k}/scale": None for i in (0, 1)
       for k in ("pre_attention_norm", "pre_ffw_norm")},
    "final_norm/scale": None,
}
_EMBEDDING_LOOKUP, _EMBEDDING_LOGITS = (1,), (0,)

_SCANNED = {
    "embedder/embedding": None,  # lookup only: left alone
    "blocks/attn/q_einsum/kernel": (0, 1, 3),  # (L, N, D, H)
    "blocks/attn/kv_einsum/kernel": (0, 1, 2, 4),  # (L, 2, K, D, H)
    "blocks/attn/attn_vec_einsum/kernel": (0, 3),  # (L, N, H, D)
    **{f"blocks/mlp/{k}_proj/kernel": (0, 2) for k in ("gate", "up", "down")},
    "blocks/pre_attention_norm/scale": None,
    "blocks/pre_ffw_norm/scale": None,
    "final_norm/scale": None,
    "head/kernel": (1,),
    "head/bias": None,
}


@pytest.fixture(scope="module")
def mesh():
  return _mesh()


@pytest.fixture(scope="module")
def decoder(mesh):
  with jax.set_mesh(mesh):  # a sharded init, as Flax's guides write it
    return nnx.jit(lambda: Decoder(Config(), rngs=nnx.Rngs(0)))()


_SCANNED_CONFIG = Config(shd=NO_SHARDING)


@pytest.fixture(scope="module")
def scanned():
  return nnx.jit(lambda: ScannedDecoder(_SCANNED_CONFIG, num_layers=3, rngs=nnx.Rngs(0)))()


def _inputs(mesh):
  """Tokens sharded over the data axis, as the example's input pipeline places them."""
  return jax.sharding.reshard(_TOKENS, P("fsdp")), _POSITIONS, _MASK


def _shapes(model):
  return {k: x.shape for k, x in _truth.by_key(nnx.state(model, nnx.Param)).items()}


def test_decoder_truth(decoder, mesh):
  cfg = Config()
  x, h = _x(_B, _T, cfg.embed_dim), _x(_B, _T, cfg.num_heads, cfg.head_dim)
  got = {}
  with jax.set_mesh(mesh):
    for i, layer in enumerate(decoder.layers):
      # Output feature axes: q (B, T, N, H); kv (2, B, T, K, H); qkv (3, B, T, N, H).
      einsums = {"q_einsum": (x, (-2, -1)), "kv_einsum": (x, (0, -2, -1)),
                 "qkv_einsum": (x, (0, -2, -1)), "attn_vec_einsum": (h, (-1,))}
      for name, (inp, feats) in einsums.items():
        if hasattr(layer.attn, name):
          got[f"layers/{i}/attn/{name}/kernel"] = _truth_of(
              getattr(layer.attn, name), "kernel", inp, features=feats)
      for name in ("gate", "up"):
        got[f"layers/{i}/mlp/{name}_proj/kernel"] = _truth_of(
            getattr(layer.mlp, f"{name}_proj"), "kernel", x, features=(-1,))
      got[f"layers/{i}/mlp/down_proj/kernel"] = _truth_of(
          layer.mlp.down_proj, "kernel", _x(_B, _T, cfg.hidden_dim), features=(-1,))
      for name in ("pre_attention_norm", "pre_ffw_norm"):
        got[f"layers/{i}/{name}/scale"] = _truth_of(getattr(layer, name), "scale", x,
                                                    features=(-1,))
    got["final_norm/scale"] = _truth_of(decoder.final_norm, "scale", x, features=(-1,))
    # The tied table has two uses, with two different truths.
    lookup = _truth_of(decoder.embedder, "embedding", _TOKENS, features=(-1,))
    graphdef, params = nnx.split(decoder.embedder)
    logits = _truth.leaf_output_axes(
        lambda p, x: nnx.merge(graphdef, p).attend(x), params, "embedding", x)
  shapes = _shapes(decoder)
  assert set(got) | {"embedder/embedding"} == set(shapes)
  assert got == {k: _truth.canonical(v, shapes[k]) for k, v in _DECODER.items()}
  assert (lookup, logits) == (_EMBEDDING_LOOKUP, _EMBEDDING_LOGITS)


def test_decoder_jaxpr_has_reshard(decoder, mesh):
  graphdef, state = nnx.split(decoder)
  with jax.set_mesh(mesh):
    jaxpr = jax.make_jaxpr(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, *_inputs(mesh))
  assert "reshard" in {eqn.primitive.name for eqn in jaxpr.jaxpr.eqns}, jaxpr


def test_decoder_tied_embedding_is_a_conflict(decoder, mesh):
  with jax.set_mesh(mesh), pytest.raises(ValueError) as e:
    optax_gc.nnx_output_axes(decoder, *_inputs(mesh))
  msg = str(e.value)
  assert "1 parameter" in msg and "embedding" in msg and "(6, 8)" in msg, msg
  # Both uses are listed: the lookup (behind `reshard`) and the logits contraction.
  assert "gather" in msg and "dot_general, contracting (1,): output axes (0,)" in msg, msg


@pytest.mark.parametrize("override", [None, (0,)])
def test_decoder_inference_equals_truth(decoder, mesh, override):
  overrides = {"embedder/embedding": override}
  with jax.set_mesh(mesh):
    spec = optax_gc.nnx_output_axes(decoder, *_inputs(mesh), overrides=overrides)
  got = _truth.by_key(spec, is_leaf=_is_spec)
  shapes = _shapes(decoder)
  assert got.pop("embedder/embedding") == override
  want = {k: _truth.canonical(v, shapes[k]) for k, v in _DECODER.items()}
  assert {k: _truth.canonical(v, shapes[k]) for k, v in got.items()} == want


def test_decoder_shape_dtype_structs(decoder, mesh):
  """An nnx.eval_shape model and ShapeDtypeStruct inputs give the same spec."""
  overrides = {"embedder/embedding": (0,)}
  with jax.set_mesh(mesh):
    spec = optax_gc.nnx_output_axes(decoder, *_inputs(mesh), overrides=overrides)
    abstract = nnx.eval_shape(lambda: Decoder(Config(), rngs=nnx.Rngs(0)))
    inputs = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
              for x in _inputs(mesh)]
    abstract_spec = optax_gc.nnx_output_axes(abstract, *inputs, overrides=overrides)
  assert _truth.by_key(abstract_spec, is_leaf=_is_spec) == _truth.by_key(spec, is_leaf=_is_spec)


def test_scanned_truth(scanned):
  cfg = _SCANNED_CONFIG
  x, h = _x(_B, _T, cfg.embed_dim), _x(_B, _T, cfg.num_heads, cfg.head_dim)
  attn, mlp, blocks = scanned.blocks.attn, scanned.blocks.mlp, scanned.blocks
  # Per layer on the same input: a leading layer axis 0 is a feature axis.
  got = {
      "blocks/attn/q_einsum/kernel": _truth_of(attn.q_einsum, "kernel", x,
                                               features=(0, -2, -1), stacked=True),
      "blocks/attn/kv_einsum/kernel": _truth_of(attn.kv_einsum, "kernel", x,
                                                features=(0, 1, -2, -1), stacked=True),
      "blocks/attn/attn_vec_einsum/kernel": _truth_of(attn.attn_vec_einsum, "kernel", h,
                                                      features=(0, -1), stacked=True),
      "blocks/mlp/down_proj/kernel": _truth_of(mlp.down_proj, "kernel",
                                               _x(_B, _T, cfg.hidden_dim), features=(0, -1),
                                               stacked=True),
      "embedder/embedding": None,  # see test_scanned_inference: lookup only
      "final_norm/scale": _truth_of(scanned.final_norm, "scale", x, features=(-1,)),
      "head/kernel": _truth_of(scanned.head, "kernel", x, features=(-1,)),
      "head/bias": _truth_of(scanned.head, "bias", x, features=(-1,)),
  }
  for name in ("gate", "up"):
    got[f"blocks/mlp/{name}_proj/kernel"] = _truth_of(
        getattr(mlp, f"{name}_proj"), "kernel", x, features=(0, -1), stacked=True)
  for name in ("pre_attention_norm", "pre_ffw_norm"):
    got[f"blocks/{name}/scale"] = _truth_of(getattr(blocks, name), "scale", x,
                                            features=(0, -1), stacked=True)
  shapes = _shapes(scanned)
  assert set(got) == set(shapes)
  assert got == {k: _truth.canonical(v, shapes[k]) for k, v in _SCANNED.items()}
  # The lookup's own truth, which inference leaves alone by default.
  assert _truth_of(scanned.embedder, "embedding", _TOKENS, features=(-1,)) == (1,)


def test_scanned_inference(scanned):
  spec = optax_gc.nnx_output_axes(scanned, _TOKENS, _POSITIONS, _MASK)
  shapes = _shapes(scanned)
  got = {k: _truth.canonical(v, shapes[k])
         for k, v in _truth.by_key(spec, is_leaf=_is_spec).items()}
  assert got == {k: _truth.canonical(v, shapes[k]) for k, v in _SCANNED.items()}
  # The default -1 is wrong on every stacked kernel and every stacked norm scale (the
  # embedding's lookup truth is (1,), which -1 happens to match).
  wrong = {k for k in shapes if _truth.default_spec(shapes[k]) != got[k]} - {
      "embedder/embedding"}
  assert wrong == {k for k in shapes if k.startswith("blocks/")}
  # Trace-only: an nnx.eval_shape model and ShapeDtypeStruct inputs.
  abstract = nnx.eval_shape(lambda: ScannedDecoder(_SCANNED_CONFIG, 3, rngs=nnx.Rngs(0)))
  inputs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (_TOKENS, _POSITIONS, _MASK)]
  assert _truth.by_key(optax_gc.nnx_output_axes(abstract, *inputs), is_leaf=_is_spec) == \
      _truth.by_key(spec, is_leaf=_is_spec)


# ------------------------------------------------------------------------------------------
# The CIFAR example's Vision Transformer (examples/cifar/models.py)
# ------------------------------------------------------------------------------------------

_VIT = {
    "patch_embed/kernel": (3,), "patch_embed/bias": None,  # (p, p, C, dim)
    "pos_embed": None,  # (1, patches, dim), added to the tokens
    **{f"blocks/0/attn/{k}/kernel": (1, 2) for k in ("query", "key", "value")},  # (D, N, H)
    **{f"blocks/0/attn/{k}/bias": None for k in ("query", "key", "value")},  # (N, H)
    "blocks/0/attn/out/kernel": (2,), "blocks/0/attn/out/bias": None,  # (N, H, D)
    "blocks/0/mlp1/kernel": (1,), "blocks/0/mlp1/bias": None,
    "blocks/0/mlp2/kernel": (1,), "blocks/0/mlp2/bias": None,
    **{f"{ln}/{k}": None for ln in ("blocks/0/ln1", "blocks/0/ln2", "norm")
       for k in ("scale", "bias")},
    "head/kernel": (1,), "head/bias": None,
}


def test_vit_attention_kernels_inferred_equal_truth_and_the_default_is_wrong():
  from examples.cifar import models

  vit = models.create_model("vit_test", num_classes=10, seed=0)  # patch 8, dim 16, 2 heads
  block = vit.blocks[0]
  images, tokens = _x(2, 32, 32, 3), _x(2, 16, 16)
  probes = {  # each parameter's own submodule, its input and its output features
      "patch_embed": (vit.patch_embed, images, (-1,)),
      "blocks/0/attn/query": (block.attn.query, tokens, (-2, -1)),
      "blocks/0/attn/key": (block.attn.key, tokens, (-2, -1)),
      "blocks/0/attn/value": (block.attn.value, tokens, (-2, -1)),
      "blocks/0/attn/out": (block.attn.out, _x(2, 16, 2, 8), (-1,)),
      "blocks/0/mlp1": (block.mlp1, tokens, (-1,)),
      "blocks/0/mlp2": (block.mlp2, _x(2, 16, 32), (-1,)),
      "blocks/0/ln1": (block.ln1, tokens, (-1,)),
      "blocks/0/ln2": (block.ln2, tokens, (-1,)),
      "norm": (vit.norm, tokens, (-1,)),
      "head": (vit.head, _x(2, 16), (-1,)),
  }
  shapes = _shapes(vit)
  truth = {}
  for prefix, (module, x, features) in probes.items():
    for leaf in _truth.by_key(nnx.state(module, nnx.Param)):
      key = f"{prefix}/{leaf}"
      truth[key] = _truth_of(module, leaf, x, features=features)
  truth["pos_embed"] = _truth.output_axes(lambda pe, t: t + pe, _x(1, 16, 16), _x(2, 16, 16),
                                          feature_axes=(1, 2))
  assert truth == {k: _truth.canonical(v, shapes[k]) for k, v in _VIT.items()}

  spec = _truth.by_key(optax_gc.nnx_output_axes(vit, images, train=True), is_leaf=_is_spec)
  assert {k: _truth.canonical(v, shapes[k]) for k, v in spec.items()} == truth
  # The default -1 keeps head_dim alone on the attention's q/k/v kernels (averaging across
  # heads), centralizes their (heads, head_dim) biases and the position table.
  wrong = {k for k, s in shapes.items() if _truth.default_spec(s) != truth[k]}
  assert wrong == {f"blocks/0/attn/{k}/{w}" for k in ("query", "key", "value")
                   for w in ("kernel", "bias")} | {"pos_embed"}
