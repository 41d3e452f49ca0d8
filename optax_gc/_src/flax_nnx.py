"""Output axes of a Flax NNX model, for ``nnx.Optimizer(model, tx, wrt=...)``.

Flax is imported when the function is called, so ``optax_gc`` itself needs only jax and optax.
"""

from collections.abc import Callable, Mapping
from typing import Any

from optax_gc._src.infer import infer_from

__all__ = ["nnx_layout", "nnx_output_axes"]


def nnx_output_axes(
    model: Any,
    *args: Any,
    wrt: Any = None,
    overrides: Mapping[str, int | tuple[int, ...] | None] | None = None,
    centralize_lookups: bool = False,
    report: Callable[[str], Any] | None = None,
    **kwargs: Any,
) -> Any:
  r"""The output axes of every parameter of a Flax NNX model, read from its forward pass.

  :func:`optax_gc.infer_output_axes` for an ``nnx.Module``: it traces ``model(*args,
  **kwargs)`` (nothing is compiled or run, and ``model`` may come from ``nnx.eval_shape``) and
  returns a spec with the structure of the optimizer's parameter tree, so that

  .. math::

    \texttt{nnx.Optimizer(model, optax.chain(optax\_gc.centralize(spec), tx), wrt=nnx.Param)}

  applies GC over each parameter's true fan-in. The model is split and merged inside the trace
  (``nnx.split`` outside, ``nnx.merge`` inside), which is the idiom that scanned and vmapped
  NNX models need. Variables outside ``wrt`` (BatchNorm statistics, RNG state) are traced as
  model state, not data, and the model is not modified.

  Args:
    model: an ``nnx.Module``.
    *args: example inputs, arrays or ``jax.ShapeDtypeStruct``\ s (other values, such as
      ``train=True``, are passed as they are).
    wrt: the filter of the optimized variables, as given to ``nnx.Optimizer`` (default
      ``nnx.Param``).
    overrides: as in :func:`optax_gc.infer_output_axes`.
    centralize_lookups: as in :func:`optax_gc.infer_output_axes`.
    report: as in :func:`optax_gc.infer_output_axes` (``report=print`` shows the table).
    **kwargs: keyword inputs of the model.

  Returns:
    An ``nnx.State`` with the structure of ``nnx.state(model, wrt)`` whose leaves are a sorted
    tuple of output axes or ``None``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_gc
    >>> from flax import nnx
    >>> model = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8,
    ...                                decode=False, rngs=nnx.Rngs(0))
    >>> x = jax.ShapeDtypeStruct((1, 5, 8), jnp.float32)
    >>> spec = optax_gc.nnx_output_axes(model, x)
    >>> tx = optax.chain(optax_gc.centralize(spec), optax.adamw(1e-3))
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> spec['query']['kernel'], spec['query']['bias'], spec['out']['kernel']
    ((1, 2), None, (2,))

  References:
    Yong, Huang, Hua and Zhang, `Gradient Centralization: A New Optimization
    Technique for Deep Neural Networks <https://arxiv.org/abs/2004.01461>`_,
    ECCV 2020.
  """
  return _infer_nnx(model, args, kwargs, wrt=wrt, overrides=overrides,
                    centralize_lookups=centralize_lookups, report=report, layout=False)


def nnx_layout(
    model: Any,
    *args: Any,
    wrt: Any = None,
    overrides: Mapping[str, int | tuple[int, ...] | None] | None = None,
    centralize_lookups: bool = False,
    report: Callable[[str], Any] | None = None,
    **kwargs: Any,
) -> Any:
  r"""The :class:`optax_gc.Layout` of every parameter of a Flax NNX model.

  :func:`optax_gc.infer_layout` for an ``nnx.Module``, traced as :func:`nnx_output_axes` traces
  it: the fan-in, output and stacked axes of each parameter, for GC, Muon
  (:func:`optax_gc.muon_dimension_numbers`) and unit-wise clipping alike.

  Args:
    model: an ``nnx.Module``.
    *args: example inputs, as in :func:`nnx_output_axes`.
    wrt: the filter of the optimized variables (default ``nnx.Param``).
    overrides: as in :func:`optax_gc.infer_layout`.
    centralize_lookups: as in :func:`optax_gc.infer_layout`.
    report: as in :func:`optax_gc.infer_layout` (``report=print`` shows the table).
    **kwargs: keyword inputs of the model.

  Returns:
    An ``nnx.State`` with the structure of ``nnx.state(model, wrt)`` whose leaves are a
    :class:`optax_gc.Layout` or ``None``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax_gc
    >>> from flax import nnx
    >>> model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    >>> layout = optax_gc.nnx_layout(model, jax.ShapeDtypeStruct((2, 8), jnp.float32))
    >>> layout['kernel'], layout['bias']
    (Layout(fan_in=(0,), output=(1,), stack=(), head=True), None)

  References:
    Yong, Huang, Hua and Zhang, `Gradient Centralization: A New Optimization
    Technique for Deep Neural Networks <https://arxiv.org/abs/2004.01461>`_,
    ECCV 2020.
  """
  return _infer_nnx(model, args, kwargs, wrt=wrt, overrides=overrides,
                    centralize_lookups=centralize_lookups, report=report, layout=True)


def _infer_nnx(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any], *, wrt: Any,
               overrides: Any, centralize_lookups: bool, report: Any, layout: bool) -> Any:
  """Splits the model outside the trace and merges it inside, then infers."""
  try:
    from flax import nnx  # Lazy: flax is not a dependency of the library.
  except ImportError as e:
    name = "nnx_layout" if layout else "nnx_output_axes"
    raise ModuleNotFoundError(
        f"optax_gc.{name} needs Flax, which could not be imported ({e}): install it with "
        "`pip install flax`. Without Flax, give optax_gc.infer_output_axes (or infer_layout) a "
        "function of the parameters."
    ) from e

  wrt = nnx.Param if wrt is None else wrt
  graphdef, params, rest = nnx.split(model, wrt, ...)

  def fn(p: Any, state: Any, *a: Any, **k: Any) -> Any:
    return nnx.merge(graphdef, p, state)(*a, **k)

  return infer_from(fn, nnx.as_pure(params), args, kwargs, state=nnx.as_pure(rest),
                    overrides=overrides, centralize_lookups=centralize_lookups, report=report,
                    layout=layout)
