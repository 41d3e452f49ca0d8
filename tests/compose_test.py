"""optax_gc inside Optax wrappers, under inject_hyperparams, and in Flax training."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import absltest, parameterized

import optax_gc


def _norm(tree):
  """The global L2 norm (``optax.tree.norm``, which Optax < 0.2.5 lacks, written out)."""
  return jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(tree)))


def _params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {
      "conv": {"kernel": jax.random.normal(k1, (3, 3, 2, 4)), "bias": jnp.zeros(4)},
      "dense": {"kernel": jax.random.normal(k2, (4, 3)), "bias": jnp.zeros(3)},
  }


def _grads(seed=1):
  return jax.tree.map(
      lambda p: jax.random.normal(jax.random.key(seed), p.shape) + 1.0, _params()
  )


def _gc_ref(tree, min_ndim=2):
  return jax.tree.map(
      lambda g: g - g.mean(axis=tuple(range(g.ndim - 1)), keepdims=True)
      if g.ndim >= min_ndim else g,
      tree,
  )


class WrappersTest(chex.TestCase):

  def test_masked(self):
    mask = {"conv": {"kernel": True, "bias": False}, "dense": {"kernel": False, "bias": False}}
    tx = optax.masked(optax_gc.centralize(), mask)
    g = _grads()
    out, _ = tx.update(g, tx.init(_params()), _params())
    np.testing.assert_allclose(out["conv"]["kernel"], _gc_ref(g)["conv"]["kernel"], atol=1e-6)
    np.testing.assert_array_equal(out["dense"]["kernel"], g["dense"]["kernel"])

  def test_masked_with_callable_output_axis(self):
    # Inside optax.masked the callable sees MaskedNode for masked-out leaves.

    def spec(p):
      return jax.tree.map(lambda _: -1, p)

    mask = {"conv": {"kernel": True, "bias": False}, "dense": {"kernel": True, "bias": False}}
    tx = optax.masked(optax_gc.centralize(spec), mask)
    g = _grads()
    out, _ = jax.jit(tx.update)(g, tx.init(_params()), _params())
    chex.assert_trees_all_close(out, _gc_ref(g), atol=1e-6)

  def test_multi_transform(self):
    labels = {
        "conv": {"kernel": "gc", "bias": "plain"},
        "dense": {"kernel": "plain", "bias": "plain"},
    }
    tx = optax.multi_transform(
        {"gc": optax.chain(optax_gc.centralize(), optax.sgd(1.0)), "plain": optax.sgd(1.0)}, labels
    )
    g = _grads()
    out, _ = tx.update(g, tx.init(_params()), _params())
    np.testing.assert_allclose(out["conv"]["kernel"], -_gc_ref(g)["conv"]["kernel"], atol=1e-6)
    np.testing.assert_allclose(out["dense"]["kernel"], -g["dense"]["kernel"], atol=1e-6)

  def test_multi_steps_accumulates_then_centralizes(self):
    tx = optax.MultiSteps(optax.chain(optax_gc.centralize(), optax.sgd(1.0)), every_k_schedule=2)
    params = _params()
    state = tx.init(params)
    g1, g2 = _grads(1), _grads(2)
    u1, state = tx.update(g1, state, params)
    chex.assert_trees_all_close(u1, jax.tree.map(jnp.zeros_like, u1))
    u2, state = tx.update(g2, state, params)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    chex.assert_trees_all_close(u2, jax.tree.map(lambda x: -x, _gc_ref(mean)), atol=1e-5)

  def test_apply_if_finite_skips_nan_step(self):
    tx = optax.apply_if_finite(optax_gc.gc_sgd(0.1, momentum=0.9), max_consecutive_errors=3)
    params = _params()
    state = tx.init(params)
    bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), _grads())
    updates, state = jax.jit(tx.update)(bad, state, params)
    chex.assert_trees_all_close(updates, jax.tree.map(jnp.zeros_like, updates))
    self.assertEqual(int(state.notfinite_count), 1)
    updates, state = jax.jit(tx.update)(_grads(), state, params)
    chex.assert_tree_all_finite(updates)
    self.assertEqual(int(state.notfinite_count), 0)
    # The skipped step did not touch the momentum: this step is a first step.
    ref = jax.tree.map(lambda g: -0.1 * g, _gc_ref(_grads()))
    chex.assert_trees_all_close(updates, ref, atol=1e-6)

  def test_clip_by_global_norm_then_gc(self):
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax_gc.centralize())
    g = _grads()
    out, _ = tx.update(g, tx.init(_params()))
    clipped = jax.tree.map(lambda x: x / _norm(g), g)
    chex.assert_trees_all_close(out, _gc_ref(clipped), atol=1e-6)
    self.assertLessEqual(float(_norm(out)), 1.0 + 1e-6)


class InjectHyperparamsTest(chex.TestCase):

  @parameterized.named_parameters(
      ("sgd", optax_gc.gc_sgd, dict(learning_rate=0.1, momentum=0.9, weight_decay=1e-3)),
      ("sgd_nesterov", optax_gc.gc_sgd, dict(learning_rate=0.1, momentum=0.9, nesterov=True)),
      ("adam", optax_gc.gc_adam, dict(learning_rate=1e-2, weight_decay=1e-3)),
      ("adam_gcc_update", optax_gc.gc_adam,
       dict(learning_rate=1e-2, conv_only=True, centralize_update=True)),
      ("adamw", optax_gc.gc_adamw, dict(learning_rate=1e-2, weight_decay=1e-2)),
  )
  def test_matches_plain_alias_under_jit(self, alias, kwargs):
    # Every int/float argument (momentum, output_axis too) arrives as a traced array.
    injected = optax.inject_hyperparams(alias)(**kwargs)
    plain = alias(**kwargs)
    params = _params()
    s_inj, s_plain = injected.init(params), plain.init(params)
    self.assertIn("momentum" if "momentum" in kwargs else "b1", s_inj.hyperparams)
    self.assertIn("output_axis", s_inj.hyperparams)
    step_inj, step_plain = jax.jit(injected.update), jax.jit(plain.update)
    for seed in range(3):
      u_inj, s_inj = step_inj(_grads(seed), s_inj, params)
      u_plain, s_plain = step_plain(_grads(seed), s_plain, params)
      chex.assert_trees_all_close(u_inj, u_plain, rtol=1e-5, atol=1e-6)

  def test_hyperparams_can_be_changed(self):
    tx = optax.inject_hyperparams(optax_gc.gc_sgd)(learning_rate=1.0, momentum=0.0)
    params = _params()
    state = tx.init(params)
    state.hyperparams["learning_rate"] = jnp.asarray(0.5)
    u, _ = jax.jit(tx.update)(_grads(), state, params)
    chex.assert_trees_all_close(u, jax.tree.map(lambda g: -0.5 * g, _gc_ref(_grads())), atol=1e-6)

  def test_injected_output_axis_zero_is_pytorch_layout(self):
    tx = optax.inject_hyperparams(optax_gc.gc_sgd)(learning_rate=1.0, output_axis=0)
    w = {"w": jax.random.normal(jax.random.key(3), (4, 3, 2))}
    u, _ = jax.jit(tx.update)(w, tx.init(w), w)
    ref, _ = optax.centralize().update(w, optax.EmptyState())
    chex.assert_trees_all_close(u, jax.tree.map(lambda x: -x, ref), atol=1e-6)

  def test_injected_output_axis_checked_at_init(self):
    with self.assertRaisesRegex(ValueError, r"out of range for leaf \['w'\] with shape \(4, 3\)"):
      optax.inject_hyperparams(optax_gc.gc_sgd)(learning_rate=1.0, output_axis=2).init(
          {"w": jnp.ones((4, 3))}
      )


class FlaxTrainingTest(absltest.TestCase):

  def _data(self):
    # Class 1 images have three times the contrast of class 0: zero-sum filters
    # (which GC keeps zero-sum) can tell them apart by their response energy.
    k1, k2 = jax.random.split(jax.random.key(0))
    y = jax.random.bernoulli(k1, 0.5, (64,)).astype(jnp.int32)
    x = jax.random.normal(k2, (64, 8, 8, 1)) * (0.5 + y[:, None, None, None])
    return x, y

  def test_nnx_optimizer_trains(self):
    nnx = pytest.importorskip("flax.nnx")

    class Net(nnx.Module):
      def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.dense = nnx.Linear(4, 2, rngs=rngs)

      def __call__(self, x):
        return self.dense(nnx.relu(self.conv(x)).mean(axis=(1, 2)))

    model = Net(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax_gc.gc_sgd(0.1, momentum=0.9), wrt=nnx.Param)
    x, y = self._data()
    fan_in_before = model.conv.kernel[...].sum(axis=(0, 1, 2))

    @nnx.jit
    def step(model, optimizer):
      def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

      loss, grads = nnx.value_and_grad(loss_fn)(model)
      optimizer.update(model, grads)
      return loss

    losses = [float(step(model, optimizer)) for _ in range(30)]
    self.assertLess(losses[-1], 0.8 * losses[0])
    # GC kept each conv filter's fan-in sum (SGD momentum, no decay): the
    # update was centralized over (kh, kw, in), per output channel.
    np.testing.assert_allclose(
        model.conv.kernel[...].sum(axis=(0, 1, 2)), fan_in_before, atol=1e-5
    )
    self.assertFalse(np.allclose(model.dense.bias[...], 0.0))

  def test_linen_train_state_trains(self):
    nn = pytest.importorskip("flax.linen")
    train_state = pytest.importorskip("flax.training.train_state")

    class Net(nn.Module):
      @nn.compact
      def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3))(x)).mean(axis=(1, 2))
        return nn.Dense(2)(x)

    x, y = self._data()
    model = Net()
    params = model.init(jax.random.key(0), x)["params"]
    tx = optax.chain(optax.clip_by_global_norm(5.0), optax_gc.gc_adam(3e-2))
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

    @jax.jit
    def step(state):
      def loss_fn(p):
        logits = state.apply_fn({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

      loss, grads = jax.value_and_grad(loss_fn)(state.params)
      return state.apply_gradients(grads=grads), loss

    losses = []
    for _ in range(60):
      state, loss = step(state)
      losses.append(float(loss))
    self.assertLess(losses[-1], 0.8 * losses[0])


if __name__ == "__main__":
  absltest.main()
