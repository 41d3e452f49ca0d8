"""CIFAR ResNets in Flax NNX: He et al.'s ResNet-20/32/56, and ResNet-18/34/50 with a CIFAR stem.

Every variant is a ``functools.partial`` of one class, :class:`ResNet`:

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

Kernels are in Flax layout ``(kh, kw, in, out)`` / ``(in, out)``: the output axis is the last one,
which is what ``optax_gc``'s default ``output_axis=-1`` expects.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["ResNet", "BasicBlock", "BottleneckBlock", "MODELS", "create_model"]

Shortcut = Literal["pad", "projection"]

# He et al.'s initialization for convolutions (kaiming normal, fan-out), as in torchvision.
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


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


_cifar = functools.partial(ResNet, widths=(16, 32, 64), block=BasicBlock, shortcut="pad")
_imagenet_widths = (64, 128, 256, 512)

MODELS: dict[str, Callable[..., ResNet]] = {
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
}
"""Model name -> constructor taking ``num_classes`` and ``rngs`` (keyword-only)."""


def create_model(name: str, num_classes: int, seed: int) -> ResNet:
  """Builds the named model with parameters initialized from ``seed``."""
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; choose one of {sorted(MODELS)}.")
  return MODELS[name](num_classes=num_classes, rngs=nnx.Rngs(seed))
