"""The example's ``--optimizer muon``: Muon on the kernels the inferred layout picks."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from examples.cifar import models, train
from examples.cifar.config import Config

pytestmark = pytest.mark.skipif(not hasattr(optax.contrib, "MuonDimensionNumbers"),
                                reason="Muon's dimension numbers need optax >= 0.2.6")

IMAGE = (32, 32, 3)


def _vit() -> nnx.Module:
  return models.create_model("vit_tiny", 10, 0)


def _leaves(tree):
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: x is None or isinstance(x, optax.contrib.MuonDimensionNumbers))[0]
  return {jax.tree_util.keystr(p, simple=True, separator="/"): x for p, x in leaves}


def test_inferred_dimension_numbers_of_the_vit():
  dims = _leaves(train.muon_dimension_numbers(Config(optimizer="muon"), _vit(), IMAGE))
  muon = optax.contrib.MuonDimensionNumbers
  assert dims["blocks/0/attn/query/kernel"] == muon((0,), (1, 2))  # (in, heads, head_dim)
  assert dims["blocks/0/attn/out/kernel"] == muon((0, 1), (2,))  # (heads, head_dim, out)
  assert dims["blocks/3/mlp2/kernel"] == muon((0,), (1,))
  assert dims["patch_embed/kernel"] == muon((0, 1, 2), (3,))  # a conv: (kh, kw, in, out)
  assert dims["head/kernel"] is None  # the head goes to AdamW
  assert dims["pos_embed"] is None and dims["blocks/0/attn/query/bias"] is None
  on_muon = [k for k, v in dims.items() if v is not None]
  assert len(on_muon) == 4 * 6 + 1  # q, k, v, out, mlp1, mlp2 per block, and the patch embedding
  assert train.muon_dimension_numbers(Config(optimizer="muon", muon_dims="optax"), _vit(),
                                      IMAGE) is None


def _first_update(config: Config, model: nnx.Module) -> tuple[dict[str, np.ndarray], dict]:
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  rng = np.random.default_rng(0)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
  spec = train.gc_output_axes(config, model, IMAGE)
  dims = train.muon_dimension_numbers(config, model, IMAGE)
  tx = train.make_optimizer(config, 4, spec, dims)
  updates, _ = tx.update(grads, tx.init(params), params)
  return {k: np.asarray(v) for k, v in _truth_leaves(updates).items()}, grads


def _truth_leaves(tree):
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p, simple=True, separator="/"): x for p, x in leaves}


def test_the_arms_differ_where_they_should():
  model = _vit()
  base = Config(optimizer="muon", gc="none", epochs=4, weight_decay=0.0,
                schedule="constant").resolved()
  inferred, grads = _first_update(base, model)
  default, _ = _first_update(dataclasses.replace(base, muon_dims="optax"), model)
  with_gc, _ = _first_update(dataclasses.replace(base, gc="gc"), model)
  q = "blocks/0/attn/query/kernel"
  # Optax's default sends the 3-D q kernel to Adam, whose first step is a constant times
  # -sign(g) (Muon's Adam uses Nesterov, so the constant is not the learning rate).
  sign = np.sign(_truth_leaves(grads)[q])
  step = -default[q] / np.where(sign == 0, 1, sign)
  np.testing.assert_allclose(step[sign != 0], step[sign != 0].max(), rtol=1e-3)  # eps aside
  # Inferred, it is orthogonalized as one (in, heads * head_dim) matrix: not a sign step.
  assert not np.allclose(inferred[q], default[q], atol=1e-6)
  def spread(update):  # of the singular values of the (in, heads * head_dim) matrix
    singular = np.linalg.svd(update.reshape(128, 128), compute_uv=False)
    return np.percentile(singular, 90) / np.percentile(singular, 10)

  assert spread(inferred[q]) < 2 < 4 < spread(default[q])  # nearly orthogonal; a sign matrix
  # GC changes what Muon sees; leaves that Muon and GC both leave alone are equal.
  assert not np.allclose(with_gc[q], inferred[q], atol=1e-6)
  np.testing.assert_array_equal(with_gc["head/bias"], inferred["head/bias"])


def test_muon_takes_gc_on_the_gradient_only():
  with pytest.raises(ValueError, match="--optimizer muon takes --gc none or gc"):
    Config(optimizer="muon", gc="gcc").resolved()
  with pytest.raises(ValueError, match="--optimizer muon takes --gc none or gc"):
    Config(optimizer="muon", gc_location="update").resolved()


def test_a_muon_run_trains(tmp_path: Path, fast_compiles) -> None:
  config = Config(dataset="digits", model="tiny", train_subset=256, batch_size=32, epochs=3,
                  optimizer="muon", learning_rate=1e-2, weight_decay=0.0, schedule="constant",
                  augment="none", progress=False)
  summary = train.train_and_evaluate(config, tmp_path)
  history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert history[-1]["train_loss"] < history[0]["train_loss"]
  assert summary["final_test_accuracy"] > 0.25  # chance is 0.1; 0.43 when written


def test_a_run_from_before_muon_dims_existed_resumes(tmp_path: Path) -> None:
  config = Config(dataset="digits", model="tiny").resolved()
  stored = config.to_dict()
  del stored["muon_dims"]  # written before the field existed: the run had its default
  (tmp_path / "config.json").write_text(json.dumps(stored))
  train._check_config(tmp_path, config)
  with pytest.raises(ValueError, match=r"another config \(muon_dims: 'inferred' -> 'optax'\)"):
    train._check_config(tmp_path, dataclasses.replace(config, muon_dims="optax"))
