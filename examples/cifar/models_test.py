"""Tests for the NNX ResNets: parameter counts, shapes, BatchNorm train/eval behaviour."""

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
