"""The paper's optimizers with Gradient Centralization, as Optax chains.

Each alias is ``optax.chain`` of small Optax transformations and
:func:`optax_gc.centralize`, so it composes with every Optax wrapper and works
under ``optax.inject_hyperparams``.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_gc._src.centralize import Mask, OutputAxis, centralize, map_centralized

__all__ = ["gc_sgd", "gc_adam", "gc_adamw"]


def _min_ndim(conv_only: bool) -> int:
  # JAX dense kernels have rank 2, conv kernels rank >= 3.
  return 3 if conv_only else 2


class DecayState(NamedTuple):
  """The step count of a scheduled weight decay (``optax.EmptyState()`` for a constant one)."""

  count: jax.Array


def _decayed_weights(
    weight_decay: optax.ScalarOrSchedule, centralized: tuple[OutputAxis, int] | None = None
) -> optax.GradientTransformation:
  r"""Adds :math:`\lambda p` to the updates, or :math:`\lambda \Phi(p)` with ``centralized``.

  ``weight_decay`` is a number, an array (``optax.inject_hyperparams`` passes one) or a
  schedule of the step count, as ``optax.add_decayed_weights`` takes it in Optax >= 0.2.6 (this
  one also runs on older Optax). With ``centralized=(output_axis, min_ndim)``,
  ``chain(centralize(...), _decayed_weights(wd, centralized))`` is :math:`\Phi(g) + \lambda
  \Phi(p) = \Phi(g + \lambda p)` (:math:`\Phi` is linear): the paper's "decay, then
  centralize", computed without storing :math:`g + \lambda p`. That sum has two consumers (the
  means and the update), so XLA writes it to memory and reads it back; here each mean reads a
  buffer that already exists and the rest fuses into the optimizer's elementwise update.
  """
  scheduled = callable(weight_decay)

  def init_fn(params):
    del params
    return DecayState(jnp.zeros([], jnp.int32)) if scheduled else optax.EmptyState()

  def update_fn(updates, state, params=None):
    new_state = DecayState(optax.safe_int32_increment(state.count)) if scheduled else state
    if isinstance(weight_decay, (int, float)) and weight_decay == 0:
      return updates, new_state
    if params is None:
      raise ValueError(
          "optax_gc: weight_decay needs the parameters: call update(grads, state, params)."
      )
    rate = weight_decay(state.count) if scheduled else weight_decay
    decayed = params if centralized is None else map_centralized(params, params, *centralized)
    updates = jax.tree.map(
        lambda u, c: None if u is None else u + rate * c,
        updates, decayed, is_leaf=lambda x: x is None,
    )
    return updates, new_state

  return optax.GradientTransformation(init_fn, update_fn)


def gc_sgd(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float | None = None,
    nesterov: bool = False,
    accumulator_dtype: Any | None = None,
    *,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    conv_only: bool = False,
    output_axis: OutputAxis = -1,
) -> optax.GradientTransformationExtraArgs:
  r"""SGD with momentum and Gradient Centralization (the paper's SGD_GC / SGD_GCC).

  With gradient :math:`g`, parameters :math:`p` and :math:`\Phi` =
  :func:`optax_gc.centralize`, each step is, as in the paper's PyTorch code:

  .. math::

    d = \Phi(g + \lambda p), \quad b \leftarrow \mu b + d \; (b_1 = d), \quad
    p \leftarrow p - \eta \, s, \quad
    s = \begin{cases} d + \mu b & \text{Nesterov} \\ b & \text{else.}\end{cases}

  The weight decay is coupled (added to the gradient before GC), as in
  ``torch.optim.SGD``. The arguments before ``*`` are ``optax.sgd``'s, in its order and with
  its defaults. As there, ``momentum=None`` keeps no momentum buffer; a number, ``0.0``
  included, keeps one (for ``0.0`` it equals the current direction), so that ``momentum`` can
  be injected or scheduled with ``optax.inject_hyperparams``.

  Args:
    learning_rate: a float or an ``optax.Schedule``.
    momentum: the momentum :math:`\mu`, or ``None`` for plain SGD without a buffer; may be a
      traced array.
    nesterov: whether to use Nesterov momentum.
    accumulator_dtype: the dtype of the momentum buffer, as in ``optax.sgd`` (``None``: that
      of the parameters).
    weight_decay: the coupled L2 coefficient :math:`\lambda`, a float or an
      ``optax.Schedule``.
    conv_only: ``True`` centralizes only conv kernels (rank >= 3): the
      paper's GCC. ``False`` centralizes dense kernels too (GC). The
      authors' code tests rank > 3, written for 2-D convs; here 1-D conv
      kernels ``(k, in, out)`` count as conv kernels too. Their exact rule
      on a PyTorch-layout tree is ``centralize(0, min_ndim=4)``.
    output_axis: which axis holds output units, see :func:`optax_gc.centralize`.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` object.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_gc
    >>> params = {'w': jnp.array([[1., 2.], [3., 4.]])}
    >>> tx = optax_gc.gc_sgd(learning_rate=0.1, momentum=0.9)
    >>> grads = {'w': jnp.array([[1., 0.], [3., 0.]])}
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> print(updates['w'])
    [[ 0.1 -0. ]
     [-0.1 -0. ]]

  References:
    Yong, Huang, Hua and Zhang, `Gradient Centralization: A New Optimization
    Technique for Deep Neural Networks <https://arxiv.org/abs/2004.01461>`_,
    ECCV 2020.
  """
  if isinstance(accumulator_dtype, (int, float)) and not isinstance(accumulator_dtype, bool):
    raise TypeError(
        f"optax_gc.gc_sgd: accumulator_dtype={accumulator_dtype!r} is a number, not a dtype. "
        "The 4th argument is accumulator_dtype, as in optax.sgd; the coupled weight decay is "
        f"keyword-only: write weight_decay={accumulator_dtype!r}."
    )
  min_ndim = _min_ndim(conv_only)
  momentum_tx = (
      optax.identity() if momentum is None
      else optax.trace(decay=momentum, nesterov=nesterov, accumulator_dtype=accumulator_dtype)
  )
  return optax.chain(
      centralize(output_axis, min_ndim=min_ndim),
      _decayed_weights(weight_decay, (output_axis, min_ndim)),
      momentum_tx,
      optax.scale_by_learning_rate(learning_rate),
  )


def _placed(
    core: optax.GradientTransformation,
    gc: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    centralize_update: bool,
) -> optax.GradientTransformationExtraArgs:
  """GC then ``core`` then the learning rate, or GC on ``core``'s output.

  GC on the final update is applied before the learning-rate scaling, the same
  update since both are linear: the means then read ``core``'s output, which
  XLA stores anyway, not a second, scaled copy of it.
  """
  lr = optax.scale_by_learning_rate(learning_rate)
  if centralize_update:
    return optax.chain(core, gc, lr)
  return optax.chain(gc, core, lr)


def gc_adam(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any | None = None,
    *,
    nesterov: bool = False,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    conv_only: bool = False,
    output_axis: OutputAxis = -1,
    centralize_update: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Adam with Gradient Centralization (the paper's Adam_GC / Adam_GCC).

  With :math:`\Phi` = :func:`optax_gc.centralize`, coupled weight decay
  :math:`\lambda` and step :math:`t`:

  .. math::

    d = \Phi(g + \lambda p), \quad m \leftarrow \beta_1 m + (1-\beta_1) d, \quad
    v \leftarrow \beta_2 v + (1-\beta_2) d^2, \quad
    p \leftarrow p - \eta \frac{\hat m}{\sqrt{\hat v} + \epsilon},

  with bias-corrected :math:`\hat m, \hat v` and :math:`\epsilon` added to
  :math:`\sqrt{\hat v}` (as ``optax.adam`` and ``torch.optim.Adam``).

  With ``centralize_update=True`` (exactly the paper code's ``Adam_GC2``) the gradient
  goes into Adam's moments unchanged and :math:`\Phi` is applied to the final
  update :math:`-\eta \hat m / (\sqrt{\hat v} + \epsilon)` instead. Adam's
  per-element scaling does not keep the centralized gradient centralized, so
  only this form keeps every output unit's fan-in sum of weights exactly
  constant (the paper's projected-gradient view, Sec. 4.1).

  The arguments up to ``nesterov`` are ``optax.adam``'s, in its order and with its defaults.

  Args:
    learning_rate: a float or an ``optax.Schedule``.
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to :math:`\sqrt{\hat v}`.
    eps_root: added to :math:`\hat v` inside the square root, as in ``optax.adam``.
    mu_dtype: the dtype of the first moment, as in ``optax.adam`` (``None``: that of the
      parameters).
    nesterov: whether to use Nesterov momentum (NAdam), as in ``optax.adam``.
    weight_decay: coupled L2 coefficient added to the gradient before GC, a float or an
      ``optax.Schedule``.
    conv_only: ``True`` for GCC (conv kernels only), ``False`` for GC.
    output_axis: which axis holds output units, see :func:`optax_gc.centralize`.
    centralize_update: apply GC to the final update instead of the gradient.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` object.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_gc
    >>> params = {'w': jnp.zeros((3, 2))}
    >>> tx = optax_gc.gc_adam(learning_rate=1e-3)
    >>> grads = {'w': jnp.array([[1., 2.], [2., 2.], [3., 2.]])}
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> print(updates['w'].round(4) + 0.0)  # the column of 2s centralizes to 0
    [[ 0.001  0.   ]
     [ 0.     0.   ]
     [-0.001  0.   ]]

  References:
    Yong, Huang, Hua and Zhang, `Gradient Centralization: A New Optimization
    Technique for Deep Neural Networks <https://arxiv.org/abs/2004.01461>`_,
    ECCV 2020.

    Kingma and Ba, `Adam: A Method for Stochastic Optimization
    <https://arxiv.org/abs/1412.6980>`_, 2014.
  """
  core = optax.scale_by_adam(
      b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype, nesterov=nesterov
  )
  min_ndim = _min_ndim(conv_only)
  gc = centralize(output_axis, min_ndim=min_ndim)
  if centralize_update:
    return optax.chain(_decayed_weights(weight_decay), _placed(core, gc, learning_rate, True))
  return optax.chain(
      gc,
      _decayed_weights(weight_decay, (output_axis, min_ndim)),
      core,
      optax.scale_by_learning_rate(learning_rate),
  )


def gc_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any | None = None,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: Mask = None,
    *,
    nesterov: bool = False,
    conv_only: bool = False,
    output_axis: OutputAxis = -1,
    centralize_update: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""AdamW (decoupled weight decay) with Gradient Centralization.

  GC is applied to the raw gradient, then AdamW runs exactly as
  ``optax.adamw`` / ``torch.optim.AdamW``:

  .. math::

    d = \Phi(g), \quad
    p \leftarrow p - \eta \left(\frac{\hat m}{\sqrt{\hat v} + \epsilon}
    + \lambda p\right).

  With ``centralize_update=True``, :math:`\Phi` is applied instead to the final
  update, decoupled decay term included, so each output unit's fan-in sum of
  weights stays exactly constant.

  The paper code's ``AdamW_GC`` / ``AdamW_GC2`` match only in where GC is
  placed: their AdamW is an older formula, which scales the whole step, decay
  included, by :math:`\eta \sqrt{1-\beta_2^t} / (1-\beta_1^t)` and adds
  :math:`\epsilon` to the uncorrected :math:`\sqrt{v}`. This is the modern
  AdamW above.

  The arguments up to ``nesterov`` are ``optax.adamw``'s, in its order and with its defaults.

  Args:
    learning_rate: a float or an ``optax.Schedule``.
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to :math:`\sqrt{\hat v}`.
    eps_root: added to :math:`\hat v` inside the square root, as in ``optax.adamw``.
    mu_dtype: the dtype of the first moment, as in ``optax.adamw``.
    weight_decay: decoupled decay :math:`\lambda` (scaled by the learning rate), a float or
      an ``optax.Schedule``.
    mask: which leaves decay, as in ``optax.adamw``: a pytree of bools or a
      callable ``params -> such a pytree``.
    nesterov: whether to use Nesterov momentum, as in ``optax.adamw``.
    conv_only: ``True`` for GCC (conv kernels only), ``False`` for GC.
    output_axis: which axis holds output units, see :func:`optax_gc.centralize`.
    centralize_update: apply GC to the final update instead of the gradient.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` object.

  Examples:
    >>> import jax
    >>> import optax_gc
    >>> params = {'w': jax.numpy.ones((4, 3)), 'b': jax.numpy.ones(3)}
    >>> tx = optax_gc.gc_adamw(1e-3, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> print(updates['b'].round(4))  # no GC and no decay on the bias: -lr * sign(g)
    [-0.001 -0.001 -0.001]

  References:
    Yong, Huang, Hua and Zhang, `Gradient Centralization: A New Optimization
    Technique for Deep Neural Networks <https://arxiv.org/abs/2004.01461>`_,
    ECCV 2020.

    Loshchilov and Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, ICLR 2019.
  """
  adam = optax.scale_by_adam(
      b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype, nesterov=nesterov
  )
  min_ndim = _min_ndim(conv_only)
  gc = centralize(output_axis, min_ndim=min_ndim)

  def masked(decay: optax.GradientTransformation) -> optax.GradientTransformation:
    return decay if mask is None else optax.masked(decay, mask)

  if centralize_update:
    # Phi(u + wd*p) = Phi(u) + wd*Phi(p): the means read Adam's output and p,
    # so XLA does not store u + wd*p, a second kernel-sized temporary.
    decay = masked(_decayed_weights(weight_decay, (output_axis, min_ndim)))
    return optax.chain(adam, gc, decay, optax.scale_by_learning_rate(learning_rate))
  core = optax.chain(adam, masked(_decayed_weights(weight_decay)))
  return _placed(core, gc, learning_rate, centralize_update)

