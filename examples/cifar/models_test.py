"""Tests for the NNX models: parameter counts, shapes, BatchNorm train/eval behaviour, the ViT."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from examples.cifar import models


def _num_params(name: str, num_classes: int = 10) -> int:
  abstract = nnx.eval_shape(lambda: models.create_model(name, num_classes, 0))
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


@pytest.mark.parametrize("name, count", [
    ("resnet20", 269_722),  # He et al. report 0.27M.
    ("resnet32", 464_154),  # 0.46M.
    ("resnet56", 853_018),  # 0.85M.
    ("resnet18", 11_173_962),  # torchvision's CIFAR-stem ResNet-18 with 10 classes.
    ("resnet50", 23_520_842),
    # Patch conv 4*4*3*128 + 128, positions 64*128, 4 blocks of (2 LayerNorms 512, attention
    # 4 * (128*128 + 128), MLP 128*256 + 256 + 256*128 + 128), final LayerNorm 256, head 1290.
    ("vit_tiny", 6_272 + 8_192 + 4 * (512 + 66_048 + 65_920) + 256 + 1_290),
    ("vit_test", 8*8*3*16 + 16 + 16*16 + (64 + 4 * (16*16 + 16) + 16*32 + 32 + 32*16 + 16)
     + 32 + 16*10 + 10),
])
def test_parameter_counts_match_the_papers(name: str, count: int) -> None:
  assert _num_params(name) == count


def test_forward_shapes_and_kernel_layout() -> None:
  model = models.create_model("tiny", num_classes=7, seed=0)
  assert model(jnp.zeros((2, 32, 32, 3)), train=False).shape == (2, 7)
  assert model.stem_conv.kernel[...].shape == (3, 3, 3, 4)  # (kh, kw, in, out): output last.
  assert model.head.kernel[...].shape == (16, 7)
  assert model.stages[1][0].shortcut.kind == "pad"  # Option A: no parameters.
  resnet18 = nnx.eval_shape(lambda: models.create_model("resnet18", 10, 0))
  assert resnet18.stages[1][0].shortcut.conv.kernel.shape == (1, 1, 64, 128)


def test_batchnorm_updates_statistics_only_in_training() -> None:
  model = models.create_model("tiny", 10, 0)
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3)) + 3.0
  before = np.asarray(model.stem_bn.mean[...])
  model(x, train=False)
  np.testing.assert_array_equal(model.stem_bn.mean[...], before)
  model(x, train=True)
  assert not np.array_equal(model.stem_bn.mean[...], before)


def test_unknown_model_is_a_clear_error() -> None:
  with pytest.raises(ValueError, match="resnet20"):
    models.create_model("resnet21", 10, 0)


def test_vit_shapes_and_attention_kernel_layout() -> None:
  model = models.create_model("vit_test", num_classes=7, seed=0)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  logits = model(x, train=True)
  assert logits.shape == (2, 7)
  np.testing.assert_array_equal(logits, model(x, train=False))  # No dropout, no BatchNorm.
  assert model.patch_embed.kernel[...].shape == (8, 8, 3, 16)  # 16 patches of 8x8.
  assert model.pos_embed[...].shape == (1, 16, 16)
  attn = model.blocks[0].attn
  for name in ("query", "key", "value"):  # (in, heads, head_dim): output units on axes (1, 2).
    assert getattr(attn, name).kernel[...].shape == (16, 2, 8)
    assert getattr(attn, name).bias[...].shape == (2, 8)
  assert attn.out.kernel[...].shape == (2, 8, 16)
  assert model.head.kernel[...].shape == (16, 7)


def test_vit_patch_size_must_divide_the_image() -> None:
  with pytest.raises(ValueError, match="patch_size 5 must divide image_size 32"):
    models.ViT(patch_size=5, dim=8, depth=1, num_heads=2, mlp_dim=8, rngs=nnx.Rngs(0))
