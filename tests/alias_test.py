"""gc_sgd / gc_adam / gc_adamw against an independent NumPy reference of the paper.

The reference is written the way the paper's PyTorch code is: parameters in
PyTorch layout ``(out, in, kh, kw)`` / ``(out, in)``, GC as the mean over
axes ``1..n``. Our optimizers run on the same tree in Flax layout
``(kh, kw, in, out)`` / ``(in, out)``; results are transposed back to compare.
"""

import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

import optax_gc

# Flax layout <-> PyTorch layout.
_TO_TORCH = {4: (3, 2, 0, 1), 2: (1, 0), 1: (0,)}
_TO_FLAX = {4: (2, 3, 1, 0), 2: (1, 0), 1: (0,)}


def _to_torch(tree):
  return {k: np.transpose(np.asarray(v, np.float64), _TO_TORCH[v.ndim]) for k, v in tree.items()}


def _to_flax(tree):
  return {k: np.transpose(v, _TO_FLAX[v.ndim]) for k, v in tree.items()}


def _torch_gc(d, conv_only):
  """The paper's rule in PyTorch layout: GC for rank > 1, GCC for rank > 3."""
  if d.ndim > (3 if conv_only else 1):
    return d - d.mean(axis=tuple(range(1, d.ndim)), keepdims=True)
  return d


class ReferenceSGD:
  """SGD_GC / SGD_GCC from the paper's code (coupled decay, PyTorch momentum)."""

  def __init__(self, lr, momentum, nesterov, weight_decay, conv_only):
    self.lr, self.mu, self.nesterov = lr, momentum, nesterov
    self.wd, self.conv_only, self.buf = weight_decay, conv_only, {}

  def step(self, p, g):
    out = {}
    for k in p:
      d = g[k] + self.wd * p[k]
      d = _torch_gc(d, self.conv_only)
      if self.mu:
        self.buf[k] = d.copy() if k not in self.buf else self.mu * self.buf[k] + d
        d = d + self.mu * self.buf[k] if self.nesterov else self.buf[k]
      out[k] = p[k] - self.lr * d
    return out


class ReferenceAdam:
  """Adam_GC(C) and Adam_GC(C)2 (GC on the update), as in the paper's code; with ``decoupled``, the
  same placements in the modern AdamW (``optax.adamw`` / ``torch.optim.AdamW``), which is not the
  paper code's AdamW_GC(C)(2): those scale the whole step, decay included, by
  ``lr * sqrt(1 - b2**t) / (1 - b1**t)`` and add eps to the uncorrected ``sqrt(v)``."""

  def __init__(self, lr, b1, b2, eps, weight_decay, conv_only, decoupled, on_update):
    self.lr, self.b1, self.b2, self.eps, self.wd = lr, b1, b2, eps, weight_decay
    self.conv_only, self.decoupled, self.on_update = conv_only, decoupled, on_update
    self.m, self.v, self.t = {}, {}, 0

  def step(self, p, g):
    self.t += 1
    out = {}
    for k in p:
      d = g[k] if self.decoupled else g[k] + self.wd * p[k]
      if not self.on_update:
        d = _torch_gc(d, self.conv_only)
      self.m[k] = self.b1 * self.m.get(k, 0.0) + (1 - self.b1) * d
      self.v[k] = self.b2 * self.v.get(k, 0.0) + (1 - self.b2) * d * d
      m_hat = self.m[k] / (1 - self.b1**self.t)
      v_hat = self.v[k] / (1 - self.b2**self.t)
      step = m_hat / (np.sqrt(v_hat) + self.eps)
      if self.decoupled:
        step = step + self.wd * p[k]
      step = self.lr * step
      if self.on_update:
        step = _torch_gc(step, self.conv_only)
      out[k] = p[k] - step
    return out


def _flax_params(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "conv": rng.normal(size=(3, 3, 4, 6)).astype(np.float32),
      "dense": rng.normal(size=(6, 5)).astype(np.float32),
      "bias": rng.normal(size=(5,)).astype(np.float32),
  }


def _grads(params, step):
  # Depends on the parameters, so the trajectories feed back.
  rng = np.random.default_rng(100 + step)
  return {k: 0.3 * v + rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}


def _run_both(tx, reference, steps=6):
  params = {k: jnp.asarray(v) for k, v in _flax_params().items()}
  ref_params = _to_torch(params)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t in range(steps):
    grads = _grads({k: np.asarray(v) for k, v in params.items()}, t)
    ref_grads = _to_torch(grads)
    updates, state = update({k: jnp.asarray(v) for k, v in grads.items()}, state, params)
    params = optax.apply_updates(params, updates)
    ref_params = reference.step(ref_params, ref_grads)
    chex.assert_trees_all_close(
        {k: np.asarray(v, np.float64) for k, v in params.items()},
        _to_flax(ref_params), rtol=2e-5, atol=2e-5,
    )
  return params


class AgainstReferenceTest(parameterized.TestCase):

  @parameterized.product(
      momentum_nesterov=((0.0, False), (0.9, False), (0.9, True)),
      weight_decay=(0.0, 5e-4),
      conv_only=(False, True),
  )
  def test_gc_sgd(self, momentum_nesterov, weight_decay, conv_only):
    momentum, nesterov = momentum_nesterov
    tx = optax_gc.gc_sgd(0.05, momentum, nesterov, weight_decay=weight_decay,
                         conv_only=conv_only)
    _run_both(tx, ReferenceSGD(0.05, momentum, nesterov, weight_decay, conv_only))

  @parameterized.product(
      weight_decay=(0.0, 1e-2), conv_only=(False, True), centralize_update=(False, True)
  )
  def test_gc_adam(self, weight_decay, conv_only, centralize_update):
    tx = optax_gc.gc_adam(
        1e-2, 0.9, 0.99, 1e-8, weight_decay=weight_decay, conv_only=conv_only,
        centralize_update=centralize_update,
    )
    ref = ReferenceAdam(1e-2, 0.9, 0.99, 1e-8, weight_decay, conv_only, False, centralize_update)
    _run_both(tx, ref)

  @parameterized.product(conv_only=(False, True), centralize_update=(False, True))
  def test_gc_adamw(self, conv_only, centralize_update):
    tx = optax_gc.gc_adamw(
        1e-2, 0.9, 0.99, 1e-8, weight_decay=0.1, conv_only=conv_only,
        centralize_update=centralize_update,
    )
    ref = ReferenceAdam(1e-2, 0.9, 0.99, 1e-8, 0.1, conv_only, True, centralize_update)
    _run_both(tx, ref)

  def test_gc_adamw_equals_optax_adamw_without_gc_leaves(self):
    # With every leaf passing through GC (min_ndim above every rank), gc_adamw is optax.adamw.
    params = {k: jnp.asarray(v) for k, v in _flax_params().items()}
    grads = {k: jnp.asarray(v) for k, v in _grads(_flax_params(), 0).items()}
    ours = optax_gc.gc_adamw(1e-2, weight_decay=0.1, output_axis=None)
    theirs = optax.adamw(1e-2, weight_decay=0.1)
    a, _ = ours.update(grads, ours.init(params), params)
    b, _ = theirs.update(grads, theirs.init(params), params)
    chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-7)

  def test_gc_adamw_mask_selects_decay(self):
    params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
    grads = jax.tree.map(jnp.zeros_like, params)
    tx = optax_gc.gc_adamw(1.0, weight_decay=0.5, mask={"w": True, "b": False})
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.5 * jnp.ones((3, 2)), rtol=1e-6)
    np.testing.assert_array_equal(updates["b"], jnp.zeros(2))

  @parameterized.named_parameters(
      ("no_mask", None, 0.1),
      ("tree_mask", {"conv": True, "dense": False, "bias": False}, 0.1),
      ("callable_mask", lambda p: jax.tree.map(lambda x: x.ndim > 1, p), 0.1),
      ("decay_schedule", None, optax.linear_schedule(0.1, 0.0, transition_steps=4)),
  )
  def test_gc_adamw_on_the_update_is_gc_of_the_adamw_update(self, mask, weight_decay):
    # Phi applied to the whole AdamW update (decay included, mask respected), written
    # literally: AdamW's own chain, then optax_gc.centralize on its output.
    params = {k: jnp.asarray(v) for k, v in _flax_params().items()}
    ours = optax_gc.gc_adamw(1e-2, 0.9, 0.99, 1e-8, weight_decay=weight_decay, mask=mask,
                             centralize_update=True)

    def literal(decay):  # stateless but for Adam, so a schedule is its value at each step
      return optax.chain(
          optax.scale_by_adam(0.9, 0.99, 1e-8),
          optax.add_decayed_weights(decay, mask),
          optax.scale_by_learning_rate(1e-2),
          optax_gc.centralize(),
      )

    s_ours, s_lit = ours.init(params), literal(0.1).init(params)
    for t in range(4):
      grads = {k: jnp.asarray(v) for k, v in _grads(_flax_params(), t).items()}
      decay = weight_decay(t) if callable(weight_decay) else weight_decay
      a, s_ours = jax.jit(ours.update)(grads, s_ours, params)
      b, s_lit = jax.jit(literal(decay).update)(grads, s_lit, params)
      chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-8)
      params = optax.apply_updates(params, a)

  def test_schedule_learning_rate(self):
    sched = optax.linear_schedule(1.0, 0.0, transition_steps=4)
    tx = optax_gc.gc_sgd(sched)
    params = {"w": jnp.zeros((2, 2))}
    g = {"w": jnp.array([[1.0, 0.0], [3.0, 0.0]])}
    state = tx.init(params)
    scales = []
    for _ in range(3):
      u, state = tx.update(g, state, params)
      scales.append(float(u["w"][1, 0]))
    np.testing.assert_allclose(scales, [-1.0, -0.75, -0.5], rtol=1e-6)

  def test_weight_decay_needs_params(self):
    g = {"w": jnp.ones((3, 2))}
    for tx in (optax_gc.gc_sgd(0.1, weight_decay=1e-4), optax_gc.gc_adam(0.1, weight_decay=1e-4)):
      with self.assertRaisesRegex(ValueError, "weight_decay needs the parameters"):
        tx.update(g, tx.init(g))
    tx = optax_gc.gc_sgd(0.1)  # no decay: no params needed
    u, _ = tx.update(g, tx.init(g))
    np.testing.assert_allclose(u["w"], jnp.zeros((3, 2)), atol=1e-7)

  def test_returns_extra_args_transformations(self):
    for tx in (optax_gc.gc_sgd(0.1), optax_gc.gc_adam(0.1), optax_gc.gc_adamw(0.1)):
      self.assertIsInstance(tx, optax.GradientTransformationExtraArgs)


_ALIASES = (("sgd", optax_gc.gc_sgd, optax.sgd), ("adam", optax_gc.gc_adam, optax.adam),
            ("adamw", optax_gc.gc_adamw, optax.adamw))


def _parameters(fn):
  return list(inspect.signature(fn).parameters.values())


def _schedulable(fn):
  """The arguments that ``fn`` types as a scalar or a schedule."""
  return [p.name for p in _parameters(fn) if p.annotation == optax.ScalarOrSchedule]


class OptaxArgumentsTest(parameterized.TestCase):
  """Each alias takes its Optax counterpart's arguments first, as Optax takes them."""

  @parameterized.named_parameters(*_ALIASES)
  def test_signature_starts_with_optax_s(self, ours, theirs):
    # Names, order, kinds and defaults, against the installed Optax (the same from Optax 0.1.9 on).
    described = lambda fn: [(p.name, p.kind, p.default) for p in _parameters(fn)]  # noqa: E731
    n = len(_parameters(theirs))
    self.assertEqual(described(ours)[:n], described(theirs))
    # Then the paper's extras and the GC options, keyword-only.
    extras = _parameters(ours)[n:]
    self.assertIn("output_axis", [p.name for p in extras])
    self.assertTrue(all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extras), extras)
    # Whatever Optax types as a scalar or a schedule, the alias does too.
    self.assertContainsSubset(_schedulable(theirs), _schedulable(ours))

  def test_schedulable_arguments(self):
    self.assertEqual({name: _schedulable(ours) for name, ours, _ in _ALIASES},
                     {"sgd": ["learning_rate", "weight_decay"],
                      "adam": ["learning_rate", "weight_decay"],
                      "adamw": ["learning_rate", "weight_decay"]})

  @parameterized.named_parameters(
      ("sgd_no_momentum", optax_gc.gc_sgd, optax.sgd, dict(learning_rate=0.1)),
      ("sgd", optax_gc.gc_sgd, optax.sgd,
       dict(learning_rate=0.1, momentum=0.9, nesterov=True, accumulator_dtype=jnp.bfloat16)),
      ("adam", optax_gc.gc_adam, optax.adam,
       dict(learning_rate=0.1, b1=0.8, b2=0.9, eps=1e-3, eps_root=1e-4, mu_dtype=jnp.bfloat16,
            nesterov=True)),
      ("adamw", optax_gc.gc_adamw, optax.adamw,
       dict(learning_rate=0.1, b1=0.8, b2=0.9, eps=1e-3, eps_root=1e-4, mu_dtype=jnp.bfloat16,
            weight_decay=0.5, mask={"conv": True, "dense": False, "bias": True}, nesterov=True)),
  )
  def test_without_gc_the_alias_is_optax_s(self, ours, theirs, kwargs):
    # output_axis=None: no GC at all, so every Optax argument must reach Optax's own math.
    params = {k: jnp.asarray(v) for k, v in _flax_params().items()}
    txs = [ours(**kwargs, output_axis=None), theirs(**kwargs)]
    states = [tx.init(params) for tx in txs]
    for t in range(3):
      grads = {k: jnp.asarray(v) for k, v in _grads(_flax_params(), t).items()}
      (a, states[0]), (b, states[1]) = (
          tx.update(grads, s, params) for tx, s in zip(txs, states, strict=True))
      chex.assert_trees_all_equal(a, b)
    # The same buffers: none without momentum (as optax.sgd), the momentum in its dtype.
    self.assertEqual(sorted(str(x.dtype) for x in jax.tree.leaves(states[0])),
                     sorted(str(x.dtype) for x in jax.tree.leaves(states[1])))

  def test_momentum_zero_keeps_the_buffer_none_does_not(self):
    params = {"w": jnp.ones((3, 2))}
    self.assertEqual(jax.tree.leaves(optax_gc.gc_sgd(0.1).init(params)), [])
    self.assertLen(jax.tree.leaves(optax_gc.gc_sgd(0.1, momentum=0.0).init(params)), 1)

  def test_a_weight_decay_in_accumulator_dtype_s_place_is_named(self):
    with self.assertRaisesRegex(TypeError, r"accumulator_dtype=0.0005 is a number.*"
                                r"write weight_decay=0.0005"):
      optax_gc.gc_sgd(0.1, 0.9, False, 5e-4)


_SCHEDULED = (
    ("sgd", optax_gc.gc_sgd, dict(momentum=0.9)),
    ("sgd_no_momentum", optax_gc.gc_sgd, {}),
    ("adam", optax_gc.gc_adam, {}),
    ("adam_update", optax_gc.gc_adam, dict(centralize_update=True)),
    ("adamw", optax_gc.gc_adamw, {}),
    ("adamw_update", optax_gc.gc_adamw, dict(centralize_update=True)),
    ("adamw_update_masked", optax_gc.gc_adamw,
     dict(centralize_update=True, mask={"conv": True, "dense": False, "bias": False})),
)


class ScheduleTest(parameterized.TestCase):
  """Every scalar-or-schedule argument takes a schedule, read at the step count."""

  @parameterized.named_parameters(
      (f"{case}_{arg}", alias, kwargs, arg)
      for case, alias, kwargs in _SCHEDULED for arg in _schedulable(alias)
  )
  def test_schedule_is_its_value_at_each_step(self, alias, kwargs, arg):
    values = {"learning_rate": 0.1, "weight_decay": 0.05}
    constant = alias(**{**values, **kwargs})
    # 0.05 at step 0, then 0.1 at step 1: the first update matches the constant's, the second
    # does not.
    schedule = optax.linear_schedule(values[arg], 3 * values[arg], transition_steps=2)
    scheduled = alias(**{**values, **kwargs, arg: schedule})
    params = {k: jnp.asarray(v) for k, v in _flax_params().items()}
    s_const, s_sched = constant.init(params), scheduled.init(params)
    for t in range(2):
      grads = {k: jnp.asarray(v) for k, v in _grads(_flax_params(), t).items()}
      a, s_const = jax.jit(constant.update)(grads, s_const, params)
      b, s_sched = jax.jit(scheduled.update)(grads, s_sched, params)
      if t == 0:
        chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-7)
      else:
        self.assertFalse(np.allclose(a["conv"], b["conv"], rtol=1e-3), (arg, a["conv"]))
      params = optax.apply_updates(params, a)

  def test_coupled_weight_decay_schedule_is_centralized(self):
    # gc_sgd(weight_decay=schedule): the decay is added before GC, so each step's update of a
    # kernel keeps its fan-in sums: -lr * Phi(g + wd(t) p).
    params = {k: jnp.asarray(v) for k, v in _flax_params().items()}
    grads = {k: jnp.asarray(v) for k, v in _grads(_flax_params(), 0).items()}
    tx = optax_gc.gc_sgd(0.1, weight_decay=lambda count: 0.5 * (count + 1))
    state = tx.init(params)
    for t in range(2):
      u, state = tx.update(grads, state, params)
      wd = 0.5 * (t + 1)
      want = _to_flax({k: -0.1 * _torch_gc(v, False) for k, v in _to_torch(
          {k: grads[k] + wd * params[k] for k in params}).items()})
      chex.assert_trees_all_close({k: np.asarray(v, np.float64) for k, v in u.items()}, want,
                                  rtol=1e-5, atol=1e-6)


def _fan_in_sums(params):
  # Per output unit (last axis), the sum of its incoming weights.
  return {k: np.asarray(v, np.float64).sum(axis=tuple(range(v.ndim - 1)))
          for k, v in params.items() if v.ndim >= 2}


def _train(tx, steps=60):
  params = {k: jnp.asarray(v) for k, v in _flax_params(1).items()}
  state = tx.init(params)

  @jax.jit
  def step(params, state, t):
    grads = jax.tree.map(
        lambda p, k: 0.3 * p + jax.random.normal(k, p.shape),
        params,
        dict(zip(params, jax.random.split(jax.random.fold_in(jax.random.key(0), t), 3),
                 strict=True)),
    )
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  before = _fan_in_sums(params)
  for t in range(steps):
    params, state = step(params, state, t)
  return before, _fan_in_sums(params)


class WeightSpaceConstraintTest(parameterized.TestCase):
  """GC keeps each output unit's fan-in sum of weights fixed (paper Sec. 4.1)."""

  @parameterized.named_parameters(
      ("sgd_momentum", lambda: optax_gc.gc_sgd(0.05, momentum=0.9)),
      ("sgd_nesterov", lambda: optax_gc.gc_sgd(0.05, momentum=0.9, nesterov=True)),
      # Coupled decay is added before GC, so it is centralized too.
      ("sgd_coupled_decay", lambda: optax_gc.gc_sgd(0.05, 0.9, weight_decay=0.05)),
      ("adam_update", lambda: optax_gc.gc_adam(1e-2, weight_decay=1e-2, centralize_update=True)),
      ("adamw_update", lambda: optax_gc.gc_adamw(1e-2, weight_decay=0.1, centralize_update=True)),
      ("adamw_update_masked", lambda: optax_gc.gc_adamw(
          1e-2, weight_decay=0.1, mask=lambda p: jax.tree.map(lambda x: x.ndim > 2, p),
          centralize_update=True)),
  )
  def test_fan_in_sum_is_constant(self, make):
    before, after = _train(make())
    for k in before:
      np.testing.assert_allclose(after[k], before[k], atol=1e-4, err_msg=k)

  @parameterized.named_parameters(
      ("adam_gradient", lambda: optax_gc.gc_adam(1e-2)),
      ("no_gc", lambda: optax.sgd(0.05, momentum=0.9)),
  )
  def test_fan_in_sum_drifts(self, make):
    # GC before Adam's per-element scaling does not keep the update centralized,
    # and without GC nothing holds the sums.
    before, after = _train(make())
    drift = max(np.abs(after[k] - before[k]).max() for k in before)
    self.assertGreater(drift, 1e-2)


if __name__ == "__main__":
  absltest.main()
