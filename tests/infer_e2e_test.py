"""End to end: one GC + SGD step with inferred output axes, on real gradients.

``optax.chain(optax_gc.centralize(spec), optax.sgd(lr))`` with ``spec`` from inference, on a
small transformer block and a small CNN (Flax NNX, through ``nnx.Optimizer``) and on an
Equinox CNN (whose spec is an Equinox-module-shaped tree). Each kernel's update has zero mean
over its true fan-in, taken from the Jacobian truth (``_truth``), for every output unit;
biases and norm scales get exactly ``-lr * grad``.
"""

import _truth
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gc

nnx = pytest.importorskip("flax.nnx", reason="these end-to-end tests use Flax NNX models")

_LR = 0.1


pytestmark = pytest.mark.usefixtures("fast_compiles")  # conftest.py, at the root


def _x(*shape: int) -> jax.Array:
  """Random normal inputs (NumPy: nothing to compile)."""
  return jnp.asarray(np.random.default_rng(sum(shape)).standard_normal(shape), jnp.float32)


class Block(nnx.Module):
  """Pre-LayerNorm transformer block: self-attention and an MLP."""

  def __init__(self, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(8, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8,
                                       decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(8, rngs=rngs)
    self.fc1 = nnx.Linear(8, 12, rngs=rngs)
    self.fc2 = nnx.Linear(12, 8, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))


class CNN(nnx.Module):
  """Conv, grouped conv, a transposed conv with transpose_kernel=True, LayerNorm, a head."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(4, 6, (3, 3), feature_group_count=2, rngs=rngs)
    self.up = nnx.ConvTranspose(6, 5, (3, 3), strides=(2, 2), transpose_kernel=True,
                                rngs=rngs)
    self.norm = nnx.LayerNorm(5, rngs=rngs)
    self.head = nnx.Linear(5, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
    x = self.norm(self.up(x))
    return self.head(x.mean(axis=(1, 2)))


def _perturb_norms(model):
  """Random LayerNorm scales and biases, as after some training.

  At initialization (scale 1, bias 0) a LayerNorm's output has zero mean over its features,
  and so has the gradient of the next kernel over that fan-in: GC would have nothing to remove.
  """
  rng = np.random.default_rng(0)
  for _, m in nnx.iter_graph(model):
    if isinstance(m, nnx.LayerNorm):
      m.scale[...] = 1.0 + rng.standard_normal(m.scale.shape).astype(np.float32)
      m.bias[...] = rng.standard_normal(m.bias.shape).astype(np.float32)
  return model


def _kernel_truths_block(m: Block):
  """Per kernel: the truth on its own submodule's direct output."""
  x = _x(2, 3, 8)
  owners = {
      **{f"attn/{n}/kernel": (getattr(m.attn, n), x, (-2, -1))
         for n in ("query", "key", "value")},
      "attn/out/kernel": (m.attn.out, _x(2, 3, 2, 4), (-1,)),
      "fc1/kernel": (m.fc1, x, (-1,)),
      "fc2/kernel": (m.fc2, _x(2, 3, 12), (-1,)),
  }
  return {k: _nnx_truth(*v) for k, v in owners.items()}


def _kernel_truths_cnn(m: CNN):
  owners = {
      "conv1/kernel": (m.conv1, _x(1, 5, 5, 3), (-1,)),
      "conv2/kernel": (m.conv2, _x(1, 5, 5, 4), (-1,)),
      "up/kernel": (m.up, _x(1, 4, 4, 6), (-1,)),
      "head/kernel": (m.head, _x(2, 5), (-1,)),
  }
  return {k: _nnx_truth(*v) for k, v in owners.items()}


def _nnx_truth(module, x, features):
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  fn = lambda p, x: nnx.merge(graphdef, p, rest)(x)  # noqa: E731
  return _truth.leaf_output_axes(fn, params, "kernel", x, feature_axes=features)


def _unit_means(u, fan_in):
  """The mean of ``u`` over ``fan_in`` for every output unit, in float64."""
  return np.asarray(u, np.float64).mean(axis=fan_in)


def _check_step(grads, updates, truths, untouched):
  """Kernels: zero mean over the true fan-in. ``untouched`` leaves: exactly -lr * grad."""
  assert set(truths) | set(untouched) == set(grads), sorted(grads)
  for k, truth in truths.items():
    g, u = np.asarray(grads[k]), np.asarray(updates[k])
    fan_in = _truth.fan_in_axes(g.shape, truth)
    scale = np.abs(g).max()
    # The raw gradient has a non-zero mean over the fan-in; the update has none.
    assert np.abs(_unit_means(g, fan_in)).max() > 1e-3 * scale, k
    np.testing.assert_allclose(_unit_means(u, fan_in), 0.0, atol=1e-6 * _LR * scale,
                               err_msg=k)
    # And the update is -lr times the centralized gradient.
    gc = g - np.asarray(g, np.float64).mean(axis=fan_in, keepdims=True)
    np.testing.assert_allclose(u, -_LR * gc, rtol=1e-5, atol=1e-7, err_msg=k)
  for k in untouched:
    np.testing.assert_array_equal(updates[k], -_LR * np.asarray(grads[k]), err_msg=k)


def _nnx_step(model, x, loss_fn):
  """One step through nnx.Optimizer with the inferred spec; returns grads and updates."""
  spec = optax_gc.nnx_output_axes(model, x)
  tx = optax.chain(optax_gc.centralize(spec), optax.sgd(_LR))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  before = nnx.as_pure(nnx.state(model, nnx.Param))  # the trees nnx.Optimizer hands to tx
  raw_grads = nnx.jit(nnx.grad(loss_fn))(model)
  grads = nnx.as_pure(nnx.state(raw_grads, nnx.Param))
  nnx.jit(lambda o, m, g: o.update(m, g))(optimizer, model, raw_grads)  # a train step
  after = _truth.by_key(nnx.as_pure(nnx.state(model, nnx.Param)))
  # The updates themselves, from the same transformation on the same gradients.
  updates, _ = tx.update(grads, tx.init(before), before)
  flat_grads, flat_updates = _truth.by_key(grads), _truth.by_key(updates)
  # nnx.Optimizer applied these updates.
  for k, p in _truth.by_key(before).items():
    np.testing.assert_allclose(after[k], p + flat_updates[k], rtol=1e-6, atol=1e-7, err_msg=k)
  return spec, flat_grads, flat_updates


def test_transformer_block():
  model = _perturb_norms(nnx.jit(lambda: Block(nnx.Rngs(0)))())
  x, target = _x(2, 3, 8), _x(2, 3, 9)[..., :8]
  truths = _kernel_truths_block(model)
  spec, grads, updates = _nnx_step(model, x, lambda m: jnp.mean((m(x) - target) ** 2))
  untouched = [k for k in grads if k not in truths]
  assert sorted(untouched) == sorted(
      [f"attn/{n}/bias" for n in ("query", "key", "value", "out")]
      + [f"{n}/{p}" for n in ("ln1", "ln2") for p in ("scale", "bias")]
      + ["fc1/bias", "fc2/bias"])
  _check_step(grads, updates, truths, untouched)
  # The default output_axis=-1 keeps only head_dim: its means over the true fan-in of the
  # attention kernels are not zero.
  default, _ = optax_gc.centralize().update(grads, optax.EmptyState())
  q = np.asarray(default["attn/query/kernel"])
  assert truths["attn/query/kernel"] == (1, 2)
  assert np.abs(_unit_means(q, (0,))).max() > 1e-3 * np.abs(q).max()


def test_cnn():
  model = _perturb_norms(nnx.jit(lambda: CNN(nnx.Rngs(0)))())
  x, labels = _x(2, 5, 5, 3), jnp.array([0, 2])

  def loss_fn(m):
    return optax.softmax_cross_entropy_with_integer_labels(m(x), labels).mean()

  truths = _kernel_truths_cnn(model)
  assert truths["up/kernel"] == (2,)  # (kh, kw, out, in): the default -1 is wrong.
  spec, grads, updates = _nnx_step(model, x, loss_fn)
  untouched = [k for k in grads if k not in truths]
  assert sorted(untouched) == ["conv1/bias", "conv2/bias", "head/bias", "norm/bias",
                               "norm/scale", "up/bias"]
  _check_step(grads, updates, truths, untouched)


def test_equinox_cnn_spec_is_a_module_shaped_tree():
  eqx = pytest.importorskip("equinox")
  k1, k2 = jax.random.split(jax.random.key(0))
  model = eqx.filter_jit(lambda: [eqx.nn.Conv2d(3, 4, 3, key=k1), eqx.nn.Linear(4, 3, key=k2)])()

  class Net(eqx.Module):
    conv: eqx.nn.Conv2d
    head: eqx.nn.Linear

    def __call__(self, x):  # x: (C, H, W), unbatched
      return self.head(jax.nn.relu(self.conv(x)).mean(axis=(1, 2)))

  model = Net(*model)
  x, labels = _x(2, 3, 5, 5), jnp.array([0, 2])
  params, static = eqx.partition(model, eqx.is_array)

  def loss(p, x, labels):
    logits = jax.vmap(eqx.combine(p, static))(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  spec = optax_gc.infer_output_axes(loss, params, x, labels)
  assert isinstance(spec, Net) and callable(spec)  # an Equinox module, used as a tree
  assert (spec.conv.weight, spec.conv.bias, spec.head.weight, spec.head.bias) == (
      (0,), None, (0,), None)
  tx = optax.chain(optax_gc.centralize(spec), optax.sgd(_LR))
  grads = jax.jit(jax.grad(loss))(params, x, labels)
  updates, _ = tx.update(grads, tx.init(params), params)
  conv_fn = lambda p, x: eqx.combine(p, eqx.partition(model.conv, eqx.is_array)[1])(x)  # noqa: E731
  head_fn = lambda p, x: jax.vmap(  # noqa: E731
      eqx.combine(p, eqx.partition(model.head, eqx.is_array)[1]))(x)
  truths = {
      "conv/weight": _truth.leaf_output_axes(
          conv_fn, eqx.filter(model.conv, eqx.is_array), "weight", _x(3, 5, 5),
          feature_axes=(0,)),
      "head/weight": _truth.leaf_output_axes(
          head_fn, eqx.filter(model.head, eqx.is_array), "weight", _x(2, 4)),
  }
  assert truths == {"conv/weight": (0,), "head/weight": (0,)}
  _check_step(_truth.by_key(grads), _truth.by_key(updates), truths,
              untouched=["conv/bias", "head/bias"])
