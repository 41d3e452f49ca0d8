"""Models for 32x32 images in Flax NNX: CIFAR ResNets and a small Vision Transformer.

He et al.'s ResNet-20/32/56, ResNet-18/34/50 with a CIFAR stem, and a pre-LayerNorm ViT. Every
variant is a ``functools.partial`` of one class, :class:`ResNet` or :class:`ViT`:

=============  ============  =====================  ===========  ==========
name           blocks/stage  widths                 block        shortcut
=============  ============  =====================  ===========  ==========
``resnet20``   3, 3, 3       16, 32, 64             basic        zero-pad
``resnet32``   5, 5, 5       16, 32, 64             basic        zero-pad
``resnet56``   9, 9, 9       16, 32, 64             basic        zero-pad
``resnet18``   2, 2, 2, 2    64, 128, 256, 512      basic        projection
``resnet34``   3, 4, 6, 3    64, 128, 256, 512      basic        projection
``resnet50``   3, 4, 6, 3    64, 128, 256, 512 (x4) bottleneck   projection
``resnet8``    1, 1, 1       16, 32, 64             basic        zero-pad
``tiny``       1, 1, 1       4, 8, 16               basic        zero-pad
=============  ============  =====================  ===========  ==========

All use the CIFAR stem (one 3x3 conv, stride 1, no max-pool), BatchNorm after every conv, global
average pooling and one dense layer. ``resnet20/32/56`` follow He et al.'s CIFAR section
(option A: parameter-free zero-padded identity shortcuts, 0.27M parameters for ResNet-20);
``resnet18/34/50`` are the ImageNet stage layouts with projection (1x1 conv + BN) shortcuts,
as in the GC paper's CIFAR-100 experiments. ``resnet8`` and ``tiny`` are for quick runs and tests.

=============  =====  =====  =====  =====  ==========  ===========
name           patch  width  depth  heads  MLP width   parameters
=============  =====  =====  =====  =====  ==========  ===========
``vit_tiny``   4      128    4      4      256         0.54M
``vit_test``   8      16     1      2      32          5.8k
=============  =====  =====  =====  =====  ==========  ===========

The ViT cuts the image into non-overlapping patches (a strided conv), adds learned position
embeddings, runs pre-LayerNorm blocks (``nnx.MultiHeadAttention``, then a GELU MLP), and
classifies the mean over tokens after a final LayerNorm. It has no dropout and no BatchNorm, so
``train`` changes nothing. ``vit_tiny`` is small on purpose: a CIFAR run fits minutes on 2 CPU
cores.

ResNet kernels are in Flax layout ``(kh, kw, in, out)`` / ``(in, out)``: the output axis is the
last one, which is what ``optax_gc``'s default ``output_axis=-1`` expects. The ViT's attention
kernels are not: ``nnx.MultiHeadAttention``'s query, key and value kernels are
``(in, heads, head_dim)``, whose output units are indexed by ``(heads, head_dim)``, axes
``(1, 2)``; the default ``-1`` would average across heads.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["ResNet", "BasicBlock", "BottleneckBlock", "ViT", "ViTBlock", "MODELS",
           "create_model"]

Shortcut = Literal["pad", "projection"]

# He et al.'s initialization for convolutions (kaiming normal, fan-out), as in torchvision.
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
# The ViT's dense and attention kernels: Xavier uniform, as in the ViT paper's code.
_dense_init = nnx.initializers.xavier_uniform()


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
  """A bias-free conv with PyTorch-style symmetric padding (``kernel // 2`` on each side)."""
  pad = kernel // 2
  return nnx.Conv(
      in_ch, out_ch, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
      use_bias=False, kernel_init=_conv_init, rngs=rngs,
  )


def _bn(features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
  """BatchNorm with PyTorch's defaults (running-average momentum 0.1, i.e. Flax's 0.9)."""
  return nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, rngs=rngs)


class _Shortcut(nnx.Module):
  """The residual branch's identity path when the shape changes: zero-pad (A) or projection (B)."""

  def __init__(self, in_ch: int, out_ch: int, stride: int, kind: Shortcut, *, rngs: nnx.Rngs):
    self.kind = kind
    self.stride = stride
    self.extra_channels = out_ch - in_ch
    if kind == "projection":
      self.conv = _conv(in_ch, out_ch, 1, stride, rngs)
      self.bn = _bn(out_ch, rngs)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.kind == "projection":
      return self.bn(self.conv(x), use_running_average=not train)
    x = x[:, :: self.stride, :: self.stride, :]
    lo = self.extra_channels // 2
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (lo, self.extra_channels - lo)))


def _shortcut(
    in_ch: int, out_ch: int, stride: int, kind: Shortcut, rngs: nnx.Rngs
) -> _Shortcut | None:
  """The identity path: ``None`` if the block keeps the shape, else a :class:`_Shortcut`."""
  if stride == 1 and in_ch == out_ch:
    return None
  return _Shortcut(in_ch, out_ch, stride, kind, rngs=rngs)


def _residual(y: jax.Array, x: jax.Array, shortcut: _Shortcut | None, train: bool) -> jax.Array:
  """``relu(y + identity)``, the identity being ``x`` or ``shortcut(x)``."""
  return nnx.relu(y + (x if shortcut is None else shortcut(x, train)))


class BasicBlock(nnx.Module):
  """Two 3x3 convs with BatchNorm and a residual connection (ResNet-18/34 and CIFAR ResNets)."""

  expansion = 1

  def __init__(
      self, in_ch: int, width: int, stride: int, shortcut: Shortcut, *, rngs: nnx.Rngs
  ):
    out_ch = width * self.expansion
    self.conv1 = _conv(in_ch, width, 3, stride, rngs)
    self.bn1 = _bn(width, rngs)
    self.conv2 = _conv(width, out_ch, 3, 1, rngs)
    self.bn2 = _bn(out_ch, rngs)
    self.shortcut = _shortcut(in_ch, out_ch, stride, shortcut, rngs)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = nnx.relu(self.bn1(self.conv1(x), use_running_average=not train))
    y = self.bn2(self.conv2(y), use_running_average=not train)
    return _residual(y, x, self.shortcut, train)


class BottleneckBlock(nnx.Module):
  """1x1, 3x3, 1x1 convs (4x wider output) with a residual connection (ResNet-50)."""

  expansion = 4

  def __init__(
      self, in_ch: int, width: int, stride: int, shortcut: Shortcut, *, rngs: nnx.Rngs
  ):
    out_ch = width * self.expansion
    self.conv1 = _conv(in_ch, width, 1, 1, rngs)
    self.bn1 = _bn(width, rngs)
    self.conv2 = _conv(width, width, 3, stride, rngs)
    self.bn2 = _bn(width, rngs)
    self.conv3 = _conv(width, out_ch, 1, 1, rngs)
    self.bn3 = _bn(out_ch, rngs)
    self.shortcut = _shortcut(in_ch, out_ch, stride, shortcut, rngs)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = nnx.relu(self.bn1(self.conv1(x), use_running_average=not train))
    y = nnx.relu(self.bn2(self.conv2(y), use_running_average=not train))
    y = self.bn3(self.conv3(y), use_running_average=not train)
    return _residual(y, x, self.shortcut, train)


class ResNet(nnx.Module):
  """A ResNet for 32x32 images: CIFAR stem, stages of residual blocks, pooling, dense head.

  Args:
    stage_sizes: blocks per stage; every stage after the first halves the resolution.
    widths: channel width of each stage (times the block's ``expansion`` at its output).
    block: :class:`BasicBlock` or :class:`BottleneckBlock`.
    shortcut: ``"pad"`` (He et al.'s option A) or ``"projection"`` (option B).
    num_classes: size of the output layer.
    in_channels: channels of the input images.
    rngs: the random streams used to initialize parameters.
  """

  def __init__(
      self,
      *,
      stage_sizes: Sequence[int],
      widths: Sequence[int],
      block: type[BasicBlock] | type[BottleneckBlock] = BasicBlock,
      shortcut: Shortcut = "projection",
      num_classes: int = 10,
      in_channels: int = 3,
      rngs: nnx.Rngs,
  ):
    self.stem_conv = _conv(in_channels, widths[0], 3, 1, rngs)
    self.stem_bn = _bn(widths[0], rngs)
    stages = []
    in_ch = widths[0]
    for i, (size, width) in enumerate(zip(stage_sizes, widths, strict=True)):
      blocks = []
      for j in range(size):
        stride = 2 if i > 0 and j == 0 else 1
        blocks.append(block(in_ch, width, stride, shortcut, rngs=rngs))
        in_ch = width * block.expansion
      stages.append(nnx.List(blocks))
    self.stages = nnx.List(stages)
    self.head = nnx.Linear(in_ch, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Returns logits for float images ``x`` of shape ``(batch, height, width, channels)``.

    ``train=True`` normalizes with batch statistics and updates BatchNorm's running averages;
    ``train=False`` uses the running averages.
    """
    x = nnx.relu(self.stem_bn(self.stem_conv(x), use_running_average=not train))
    for stage in self.stages:
      for block in stage:
        x = block(x, train)
    return self.head(jnp.mean(x, axis=(1, 2)))


class ViTBlock(nnx.Module):
  """A pre-LayerNorm Transformer encoder block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

  def __init__(self, dim: int, num_heads: int, mlp_dim: int, *, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
        num_heads, dim, kernel_init=_dense_init, decode=False, deterministic=True,
        keep_rngs=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
    self.mlp1 = nnx.Linear(dim, mlp_dim, kernel_init=_dense_init, rngs=rngs)
    self.mlp2 = nnx.Linear(mlp_dim, dim, kernel_init=_dense_init, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln1(x))
    return x + self.mlp2(nnx.gelu(self.mlp1(self.ln2(x))))


class ViT(nnx.Module):
  """A Vision Transformer for small images: patches, position embeddings, blocks, mean pooling.

  Args:
    patch_size: side of the square, non-overlapping patches (must divide ``image_size``).
    dim: token width.
    depth: number of :class:`ViTBlock` blocks.
    num_heads: attention heads (must divide ``dim``).
    mlp_dim: hidden width of each block's MLP.
    num_classes: size of the output layer.
    in_channels: channels of the input images.
    image_size: side of the square input images.
    rngs: the random streams used to initialize parameters.
  """

  def __init__(
      self,
      *,
      patch_size: int,
      dim: int,
      depth: int,
      num_heads: int,
      mlp_dim: int,
      num_classes: int = 10,
      in_channels: int = 3,
      image_size: int = 32,
      rngs: nnx.Rngs,
  ):
    if image_size % patch_size:
      raise ValueError(f"patch_size {patch_size} must divide image_size {image_size}.")
    self.patch_embed = nnx.Conv(in_channels, dim, (patch_size, patch_size),
                                strides=patch_size, padding="VALID", rngs=rngs)
    num_patches = (image_size // patch_size) ** 2
    self.pos_embed = nnx.Param(
        nnx.initializers.normal(0.02)(rngs.params(), (1, num_patches, dim)))
    self.blocks = nnx.List([ViTBlock(dim, num_heads, mlp_dim, rngs=rngs) for _ in range(depth)])
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Returns logits for float images ``x`` of shape ``(batch, height, width, channels)``.

    ``train`` is accepted for the common model signature; this ViT has no dropout or BatchNorm,
    so it computes the same function either way.
    """
    del train
    x = self.patch_embed(x)
    x = x.reshape(x.shape[0], -1, x.shape[-1]) + self.pos_embed[...]
    for block in self.blocks:
      x = block(x)
    return self.head(jnp.mean(self.norm(x), axis=1))


_cifar = functools.partial(ResNet, widths=(16, 32, 64), block=BasicBlock, shortcut="pad")
_imagenet_widths = (64, 128, 256, 512)

MODELS: dict[str, Callable[..., ResNet | ViT]] = {
    "resnet20": functools.partial(_cifar, stage_sizes=(3, 3, 3)),
    "resnet32": functools.partial(_cifar, stage_sizes=(5, 5, 5)),
    "resnet56": functools.partial(_cifar, stage_sizes=(9, 9, 9)),
    "resnet18": functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), widths=_imagenet_widths),
    "resnet34": functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), widths=_imagenet_widths),
    "resnet50": functools.partial(
        ResNet, stage_sizes=(3, 4, 6, 3), widths=_imagenet_widths, block=BottleneckBlock
    ),
    "resnet8": functools.partial(_cifar, stage_sizes=(1, 1, 1)),
    "tiny": functools.partial(_cifar, stage_sizes=(1, 1, 1), widths=(4, 8, 16)),
    "vit_tiny": functools.partial(ViT, patch_size=4, dim=128, depth=4, num_heads=4, mlp_dim=256),
    "vit_test": functools.partial(ViT, patch_size=8, dim=16, depth=1, num_heads=2, mlp_dim=32),
}
"""Model name -> constructor taking ``num_classes`` and ``rngs`` (keyword-only)."""


def create_model(name: str, num_classes: int, seed: int) -> ResNet | ViT:
  """Builds the named model with parameters initialized from ``seed``."""
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; choose one of {sorted(MODELS)}.")
  return MODELS[name](num_classes=num_classes, rngs=nnx.Rngs(seed))
