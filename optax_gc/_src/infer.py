"""Output axes read from the model itself: each parameter's fan-in, from its contractions.

:func:`infer_output_axes` traces ``fn(params, *args)`` with ``jax.make_jaxpr`` and follows every
parameter through the jaxpr, as JAX's own interpreters do: one walk over the equations, an
environment from variable to what is known of it, and a table of small per-primitive rules.
A parameter's *use* is where it meets the activations:

* a ``dot_general`` or ``conv_general_dilated``: its contracting (fan-in) dimensions are read
  from the dimension numbers; its free, batch and output-feature dimensions index output units;
* a lookup (``gather``/``dynamic_slice`` at data-dependent indices): left alone by default;
* an elementwise op with activations (a bias, a norm scale): left alone.

On the way, shape ops (transpose, reshape, broadcast, slice, ...) map the parameter's axes onto
the value's, an axis selected one index at a time (a scanned or indexed layer stack) becomes an
output axis (a *stacked* one, for :func:`infer_layout`), and sub-jaxprs (``jit``,
``custom_jvp``/``custom_vjp``, ``remat``, ``cond``, ``while``, ``scan``, ``shard_map``) are
followed by one generic recursion. Every primitive of the supported JAX versions is in exactly one
class: a rule, a call, or not followed with a stated reason (the tables below), and a parameter
that reaches one not followed, or none of them, raises: nothing is guessed.
"""

import collections
import dataclasses
import functools
import os
import re
import site
import sysconfig
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.extend import core as jex_core

from optax_gc._src.compat import keypath_str

__all__ = ["Layout", "infer_layout", "infer_output_axes"]

AxisSpec = tuple[int, ...] | None


class Layout(NamedTuple):
  """How one parameter's axes split between fan-in, output units and stacked matrices.

  Attributes:
    fan_in: the contracting axes, sorted: GC's mean, Muon's reduction, AGC's norm run over them.
    output: the axes that index output units of one matrix, sorted.
    stack: the axes along which separate matrices are stacked, sorted: scanned, vmapped or
      indexed layer axes, and a parameter axis that is a batch dimension of its contraction
      (mixture-of-experts kernels, grouped matmuls).
    head: ``True`` when the contraction's result reaches the model's output with no further
      contraction by a parameter: a classifier or logits head.

  Examples:
    >>> import optax_gc
    >>> layout = optax_gc.Layout(fan_in=(1,), output=(2,), stack=(0,))  # a scanned (L, in, out)
    >>> tuple(sorted(layout.output + layout.stack))  # what GC keeps: infer_output_axes's spec
    (0, 2)

  References:
    Yong, Huang, Hua and Zhang, `Gradient Centralization: A New Optimization
    Technique for Deep Neural Networks <https://arxiv.org/abs/2004.01461>`_,
    ECCV 2020.
  """

  fan_in: tuple[int, ...]
  output: tuple[int, ...]
  stack: tuple[int, ...] = ()
  head: bool = False
Axes = frozenset[int]
_NONE: Axes = frozenset()


# ------------------------------------------------------------------------------------------------
# What is known of a value: is it an activation (depends on the data), and which parameter axes
# does each of its axes run along.


@dataclasses.dataclass(frozen=True)
class _Origin:
  """How a value derived from one parameter (and no data) relates to that parameter's axes.

  Attributes:
    dims: per axis of the value, the parameter axes it runs along (several after a reshape that
      merges axes, none for a broadcast axis).
    mixed: parameter axes summed into every element (reduced, or contracted with other
      parameters): every element depends on all indices along them.
    indexed: parameter axes selected one index at a time (a layer stack scanned or indexed):
      each selection is a separate unit, so they are output axes.
  """

  dims: tuple[Axes, ...]
  mixed: Axes = _NONE
  indexed: Axes = _NONE

  def join(self, other: "_Origin") -> "_Origin":
    return _Origin(
        tuple(a | b for a, b in zip(self.dims, other.dims, strict=True)),
        self.mixed | other.mixed,
        self.indexed | other.indexed,
    )


@dataclasses.dataclass(frozen=True)
class _Info:
  """A value: ``tainted`` if it depends on the data; ``origins`` maps parameter index to origin.

  A tainted value carries no origins: a parameter that reaches the activations has been *used*.
  ``heads`` are the parameters whose contraction made this activation, with no contraction by
  a parameter since: the model's output carries its head.
  """

  tainted: bool = False
  origins: Mapping[int, _Origin] = dataclasses.field(default_factory=dict)
  heads: Axes = _NONE


_CONST = _Info()
_TAINTED = _Info(tainted=True)


def _activation(ins: Iterable[_Info], heads: Iterable[int] = ()) -> _Info:
  """A result that carries no parameter: an activation if an input is one (or ``heads`` made it).

  It keeps the heads of the activations it was computed from, or takes ``heads`` if given.
  """
  ins = list(ins)
  heads = frozenset(heads)
  if not heads:
    heads = _union(i.heads for i in ins if i.tainted)
  if heads or any(i.tainted for i in ins):
    return _Info(True, heads=heads)
  return _CONST


@dataclasses.dataclass(frozen=True)
class _Use:
  """One place where a parameter meets the activations (or cannot be followed).

  ``kind`` is ``contraction``, ``lookup``, ``activation`` (elementwise into the activations),
  ``inconsistent`` (one contraction uses an axis as both fan-in and output) or ``unfollowable``.
  ``output`` is the output axes this use implies (``None``: leave the parameter alone), and
  ``stack`` those of them along which separate matrices are stacked.
  """

  kind: str
  output: AxisSpec
  detail: str
  where: str
  stack: tuple[int, ...] = ()

  def describe(self) -> str:
    implied = {
        "contraction": f"output axes {self.output}",
        "lookup": "left alone" if self.output is None else f"output axes {self.output}",
        "activation": "left alone",
        "inconsistent": "no consistent output axes",
        "unfollowable": "cannot be followed",
    }[self.kind]
    return f"{self.detail}: {implied}" + (f" (at {self.where})" if self.where else "")


def _union(sets: Iterable[Axes]) -> Axes:
  out: set[int] = set()
  for s in sets:
    out |= s
  return frozenset(out)


def _sorted(axes: Iterable[int]) -> tuple[int, ...]:
  return tuple(sorted(axes))


def _with_origins(origins: Mapping[int, _Origin]) -> _Info:
  # A scalar derived from parameters (a norm, a trace) only scales what it multiplies.
  return _Info(False, {p: o for p, o in origins.items() if o.dims})


def _map_origins(info: _Info, fn: Callable[[_Origin], _Origin]) -> _Info:
  if info.tainted:  # an activation carries no origins: nothing to map
    return info
  return _with_origins({p: fn(o) for p, o in info.origins.items()})


# ------------------------------------------------------------------------------------------------
# The interpreter.


@functools.cache
def _library_dirs() -> tuple[str, ...]:
  """Where installed packages live (Flax, Keras, ...) and this package: not the user's code."""
  dirs = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
  dirs |= set(getattr(site, "getsitepackages", list)())
  dirs.add(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # optax_gc/
  return tuple(os.path.join(d, "") for d in sorted(dirs) if d)


def _where(eqn: Any) -> str:
  """The user's source line that emitted ``eqn`` (``""`` if unknown), for error messages.

  JAX's own frames are skipped, and so are those of installed libraries (Flax, Keras, ...): the
  location is the innermost frame of the user's code, followed by the innermost library frame
  when the equation was emitted inside one.
  """
  try:
    from jax._src import source_info_util

    try:
      frames = list(source_info_util.user_frames(eqn.source_info.traceback))
    except AttributeError:  # jax < 0.5 takes the source info itself
      frames = list(source_info_util.user_frames(eqn.source_info))
  except Exception:  # pragma: no cover - private API moved: the location is only a courtesy.
    return ""
  if not frames:
    return ""

  def show(frame: Any) -> str:
    return f"{frame.file_name}:{frame.start_line} ({frame.function_name})"

  libraries = _library_dirs()
  user = next((f for f in frames if not f.file_name.startswith(libraries)), None)
  if user is None:
    return show(frames[0])
  if user is frames[0]:
    return show(user)
  inner = frames[0]
  short = next((inner.file_name[len(d):] for d in libraries if inner.file_name.startswith(d)),
               inner.file_name)
  return f"{show(user)}, in {short}:{inner.start_line}"


def _sub_jaxpr(eqn: Any) -> tuple[Any, list[Any]] | None:
  """The one sub-jaxpr of a call-like equation whose inputs are the equation's, with its consts."""
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr", "call"):
    sub = eqn.params.get(key)
    if isinstance(sub, jex_core.ClosedJaxpr):
      jaxpr, consts = sub.jaxpr, list(sub.consts)
    elif isinstance(sub, jex_core.Jaxpr):
      jaxpr, consts = sub, []
    else:
      continue
    if len(jaxpr.invars) == len(eqn.invars) and len(jaxpr.outvars) == len(eqn.outvars):
      return jaxpr, consts
  return None


class _Interpreter:
  """Walks a jaxpr once, recording each parameter's uses."""

  def __init__(self, centralize_lookups: bool, shapes: Sequence[tuple[int, ...]]):
    self.centralize_lookups = centralize_lookups
    self.shapes = shapes  # of the parameters, by index
    self.uses: dict[int, dict[_Use, None]] = collections.defaultdict(dict)
    self._quiet = 0  # > 0 while a loop's carry is still being solved: record nothing yet.
    self._outer: list[str] = []  # where the enclosing call-like equations are, innermost last

  def where(self, eqn: Any) -> str:
    """Where ``eqn`` is in the user's code, or else where its enclosing call is."""
    here = _where(eqn)
    if here:
      return here
    return next((w for w in reversed(self._outer) if w), "")

  def is_input(self, info: _Info, shape: Sequence[int], free: Sequence[int],
               contracting: Sequence[int]) -> bool:
    """Whether a parameter value, as a side of a product with another, is that one's input.

    It is when one of its free axes is its own: no parameter axis runs along it, as along an
    axis made by a broadcast (of any size, a batch of one included) or a size-1 axis tiled to
    several entries. It is too when every free axis has one entry and the contraction takes all
    of it: a vector fed to the other side (a probe of shape ``(1, 1, d)`` on a batch of one).
    """
    def along(axis: int) -> list[int]:
      return [self.shapes[p][a] for p, o in info.origins.items() for a in o.dims[axis]]

    if any(not along(d) or (shape[d] > 1 and max(along(d)) == 1) for d in free):
      return True
    return (all(shape[d] == 1 for d in free)
            and any(n > 1 for d in contracting for n in along(d)))

  # -- recording ---------------------------------------------------------------------------------

  def record(self, param: int, use: _Use) -> None:
    if not self._quiet:
      self.uses[param][use] = None

  def sink(self, infos: Iterable[_Info], kind: str, detail: str, eqn: Any) -> None:
    """Every parameter carried by ``infos`` reaches the activations here, with no contraction."""
    for info in infos:
      for p in info.origins:
        self.record(p, _Use(kind, None, detail, self.where(eqn)))

  def contraction(self, origin: _Origin, param: int, contracting: Sequence[int], eqn: Any,
                  name: str, kind: str = "contraction", batch: Sequence[int] = ()) -> None:
    """Records a use whose value axes ``contracting`` are the fan-in; the rest index outputs.

    Parameter axes summed into every element of the value (``origin.mixed``: a norm over them)
    reach every output unit, so they are fan-in too. ``batch`` are the value axes that are batch
    dimensions of the contraction: separate matrices, stacked (as is an ``origin.indexed`` axis).
    """
    contracted = _union(origin.dims[d] for d in contracting)
    kept = _union(s for d, s in enumerate(origin.dims) if d not in contracting) | origin.indexed
    if contracted & kept:
      self.record(param, _Use("inconsistent", None, f"{name}: axes {_sorted(contracted & kept)} "
                              "are both contracted and kept", self.where(eqn)))
      return
    fan_in = contracted | origin.mixed
    output = kept - origin.mixed
    stack = (_union(origin.dims[d] for d in batch) | origin.indexed) - origin.mixed
    detail = f"{name}, contracting {_sorted(fan_in)}"
    if stack:
      detail += f", stacked along {_sorted(stack)}"
    self.record(param, _Use(kind, _sorted(output), detail, self.where(eqn), _sorted(stack)))

  def join(self, infos: Sequence[_Info], eqn: Any, what: str) -> _Info:
    """Elementwise combination: the union of origins, or an activation if any input is one."""
    if any(i.tainted for i in infos):
      self.sink(infos, "activation", f"{what} with activations", eqn)
      return _activation(infos)
    merged: dict[int, _Origin] = {}
    for info in infos:
      for p, o in info.origins.items():
        merged[p] = merged[p].join(o) if p in merged else o
    return _with_origins(merged)

  # -- the walk ------------------------------------------------------------------------------------

  def run(self, jaxpr: Any, consts: Sequence[_Info], args: Sequence[_Info]) -> list[_Info]:
    env: dict[Any, _Info] = {}

    def read(v: Any) -> _Info:
      return _CONST if isinstance(v, jex_core.Literal) else env.get(v, _CONST)

    for v, info in zip(jaxpr.constvars, consts, strict=True):
      env[v] = info
    for v, info in zip(jaxpr.invars, args, strict=True):
      env[v] = info
    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      if not any(i.origins for i in ins):
        # No parameter flows through: only whether the result depends on the data matters.
        outs = [_activation(ins)] * len(eqn.outvars)
      else:
        outs = self.apply(eqn, ins)
      for v, info in zip(eqn.outvars, outs, strict=True):
        if info.origins and not getattr(v.aval, "shape", ()):
          info = _CONST  # a scalar derived from parameters only scales what it multiplies
        env[v] = info
    return [read(v) for v in jaxpr.outvars]

  def run_inside(self, eqn: Any, jaxpr: Any, consts: Sequence[_Info], args: Sequence[_Info]
                 ) -> list[_Info]:
    """Runs the sub-jaxpr of ``eqn``, whose location stands in for its equations' unknown ones."""
    self._outer.append(_where(eqn))
    try:
      return self.run(jaxpr, consts, args)
    finally:
      self._outer.pop()

  def apply(self, eqn: Any, ins: list[_Info]) -> list[_Info]:
    name = eqn.primitive.name
    rule = _RULES.get(name)
    if rule is not None:
      return rule(self, eqn, ins)
    sub = _sub_jaxpr(eqn) if name in _CALLS else None
    if sub is not None:
      jaxpr, consts = sub
      return self.run_inside(eqn, jaxpr, [_CONST] * len(consts), ins)
    detail = f"{name} ({_UNFOLLOWED.get(name, 'no rule for this primitive')})"
    for info in ins:
      for p in info.origins:
        self.record(p, _Use("unfollowable", None, detail, self.where(eqn)))
    return [_activation(ins)] * len(eqn.outvars)

  def solve_loop(self, body: Callable[[list[_Info]], list[_Info]], carry: list[_Info],
                 eqn: Any) -> tuple[list[_Info], list[_Info]]:
    """Runs ``body(carry) -> (new carry, *rest)`` to a fixed point, then once more, recording.

    Returns the fixed-point carry and the outputs of that last, recording run.
    """
    self._quiet += 1
    try:
      for _ in range(32):
        out = body(carry)
        new = [self.join([c, o], eqn, "loop carry") for c, o in zip(carry, out, strict=False)]
        if new == carry:
          break
        carry = new
    finally:
      self._quiet -= 1
    out = body(carry)
    for c, o in zip(carry, out, strict=False):
      self.join([c, o], eqn, "loop carry")  # records a parameter that enters a tainted carry
    return carry, out


# ------------------------------------------------------------------------------------------------
# Rules, one small function per primitive (or family of primitives).

_RULES: dict[str, Callable[[_Interpreter, Any, list[_Info]], list[_Info]]] = {}

# Every primitive of every supported JAX version is in exactly one class: it has a rule
# (``_RULES``), it is a call whose sub-jaxpr is followed (``_CALLS``), or it is in ``_UNFOLLOWED``
# with the reason why nothing is guessed through it (a parameter that reaches it raises, naming
# the reason). tests/primitives_test.py checks this against the installed JAX, and that every
# name here is a primitive of some supported version; a name that is not one of the newest
# JAX's says which versions have it.

_ELEMENTWISE = (
    "abs acos acosh add add_any and asin asinh atan atan2 atanh bessel_i0e bessel_i1e cbrt ceil "
    "clamp clz complex conj convert_element_type copy cos cosh digamma div eq erf erf_inv "
    "erfc exp exp2 expm1 floor ge gt igamma igamma_grad_a igammac imag integer_pow is_finite le "
    "lgamma log log1p logistic lt max min mul ne neg nextafter not or polygamma population_count "
    "pow real reduce_precision regularized_incomplete_beta rem round rsqrt shift_left "
    "shift_right_arithmetic shift_right_logical sign sin sinh sqrt stop_gradient sub tan "
    "tanh xor zeta bitcast_convert_type "
    "eq_to le_to lt_to "  # comparisons of jax >= 0.4.30's lax internals
    "square "  # jax >= 0.4.38
    "reciprocal "  # jax >= 0.6
    "mulhi "  # jax >= 0.9
    "random_gamma_grad"  # jax <= 0.5
).split()
# One output per input, each the same value as far as axes go: copies, names, placement and
# sharding annotations, and collectives that keep the shape.
_IDENTITY = (
    "device_put sharding_constraint optimization_barrier pbroadcast psum pmax pmin ppermute "
    "reduce_scatter "
    "name "  # jax.ad_checkpoint.checkpoint_name
    "stage "  # jax >= 0.9
    "sharding_cast "  # jax 0.4.38 (mesh_cast's name there)
    "mesh_cast "  # jax 0.5-0.6
    "reshard "  # jax >= 0.5
    "psum2 "  # jax <= 0.5 (shard_map's psum)
    "pvary psum_invariant layout_constraint with_memory_space_constraint "  # jax >= 0.6
    "remove_memory_space "  # jax 0.7-0.8
    "preduced unreduced_psum reduced_vary_cast_p vary_unreduced_cast_p"  # jax >= 0.8
).split()
_REDUCTIONS = "reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor".split()
_CUMULATIVE = "cumsum cumprod cummax cummin cumlogsumexp".split()
# Call-like primitives: their sub-jaxpr takes the equation's inputs and gives its outputs.
_CALLS = frozenset({
    "jit",  # jax >= 0.7
    "pjit",  # jax <= 0.6 (jit's name there)
    "custom_vjp_call_jaxpr",  # jax <= 0.5
    "compute_on",  # jax >= 0.8
    "composite",  # jax >= 0.5
    "closed_call", "call", "remat2", "remat_opt", "custom_jvp_call", "custom_jvp_call_jaxpr",
    "custom_vjp_call",
    "custom_vmap_call", "shard_map", "eval_jaxpr",
})

_UNFOLLOWED: dict[str, str] = {}


def _unfollowed(reason: str, names: str) -> None:
  for name in names.split():
    _UNFOLLOWED[name] = reason


_unfollowed(
    "an opaque kernel: what it does with the parameter is not visible",
    "pallas_call ffi_call custom_partitioning call_exported "
    "tpu_custom_call "  # jax 0.4.38-0.9
    "cudnn_fusion scaled_matmul scaled_matmul_wrapper scaled_dot "
    "bias_fwd bias_bwd "  # jax 0.4.38-0.7
    "dot_product_attention_fwd dot_product_attention_bwd dot_product_attention_fwd_wrapper "
    "dot_product_attention_bwd_wrapper dot_product_attention_fp8_fwd "
    "dot_product_attention_fp8_bwd dot_product_attention_fp8_fwd_wrapper "
    "dot_product_attention_fp8_bwd_wrapper")
_unfollowed(
    "a host callback or transfer: what it computes is not visible",
    "pure_callback io_callback "
    "outside_call "  # jax <= 0.4.30
    "infeed outfeed")  # jax <= 0.6
_unfollowed(
    "an operation of a Pallas or Mosaic kernel body, which is opaque",
    "program_id num_programs masked_load masked_swap multiple_of delay run_scoped core_map "
    "semaphore_read semaphore_signal semaphore_wait get_global jaxpr_call mpmd_map "
    "atomic_cas atomic_rmw max_contiguous "  # jax <= 0.8 (max_contiguous) or 0.9
    "dma_start dma_wait get_barrier_semaphore bitcast repeat roll prng_seed prng_random_bits "
    "assume_for_verification pretend_for_verification "  # jax 0.4.38-0.9, 0.7 for the last two
    "device_id "  # jax 0.4.38
    "stochastic_round pack_elementwise unpack_elementwise "  # jax 0.8-0.9
    "add_dependency "  # jax 0.7-0.9
    "trace_value matmul_acc_lhs matmul_pop matmul_push_rhs")  # jax 0.9
_unfollowed(
    "a mutable reference: values flow through memory, which no rule follows",
    "get swap addupdate broadcast_to run_state new_ref freeze accum_grad_in_ref empty_ref "
    "free_ref create_linear pin unpin box_get box_set new_box new_log log_extend log_read "
    "mutable_array "  # jax <= 0.6
    "for")  # jax 0.4.38-0.6
_unfollowed(
    "a matrix decomposition or solve: each entry of the result mixes many entries",
    "cholesky cholesky_update eig eigh lu lu_pivots_to_permutation qr geqrf householder_product "
    "svd schur hessenberg tridiagonal tridiagonal_solve triangular_solve custom_linear_solve "
    "spsolve "
    "eigh_jacobi "  # jax <= 0.7
    "geqp3 symmetric_product "  # jax >= 0.5
    "symmetric_update "  # jax 0.4.38
    "ormqr")  # jax >= 0.9
_unfollowed("a Fourier transform: every entry along the transformed axes is mixed", "fft")
_unfollowed(
    "a windowed reduction (pooling) or its gradient",
    "reduce_window reduce_window_sum reduce_window_max reduce_window_min select_and_scatter "
    "select_and_scatter_add select_and_gather_add")
_unfollowed("a general reduction with a computation of its own", "reduce")
_unfollowed("a selection by value (top-k)", "top_k approx_top_k")
_unfollowed(
    "random numbers or a PRNG key",
    "random_bits random_seed random_split random_fold_in random_wrap random_unwrap random_clone "
    "random_gamma threefry2x32 rng_bit_generator rng_uniform iota_2x32_shape to_edtype "
    "from_edtype "
    "prng_join prng_split "  # jax 0.6-0.9
    "threefry4x32 philox2x32 philox4x32")  # jax >= 0.9
_unfollowed(
    "a collective that moves data between axes or devices",
    "all_to_all pgather axis_index ragged_all_to_all all_gather_invariant psend precv "
    "all_gather_reduced unreduced_reduce_scatter "
    "full_to_shard shard_to_full "  # jax <= 0.9
    "all_gather_start all_gather_done all_gather_reduced_start all_to_all_start "
    "all_to_all_done pbroadcast_start pbroadcast_done ppermute_start ppermute_done psum_start "
    "psum_done psum_invariant_start reduce_scatter_start reduce_scatter_done "
    "unreduced_psum_start unreduced_reduce_scatter_start "  # jax >= 0.9
    "global_array_to_host_local_array host_local_array_to_global_array "
    "ag_start ag_done "  # jax 0.9 (all_gather_start and _done there)
    "pdot "  # jax <= 0.4.30
    "xla_pmap")  # jax <= 0.9: pmap; trace the per-device function instead
_unfollowed(
    "a value made from no array (an index, a token, a shape)",
    "iota create_token after_all empty platform_index dim_as_value dimension_size "
    "empty2 "  # jax >= 0.7
    "id")  # jax <= 0.4.30
_unfollowed(
    "a sparse array, which is not followed",
    "bcoo_dot_general bcoo_dot_general_sampled bcoo_extract bcoo_fromdense bcoo_sort_indices "
    "bcoo_spdot_general bcoo_sum_duplicates bcoo_todense bcoo_transpose bcsr_dot_general "
    "bcsr_extract bcsr_fromdense bcsr_todense coo_fromdense coo_matmat coo_matvec coo_spmm "
    "coo_spmv coo_todense csr_fromdense csr_matmat csr_matvec csr_spmm csr_spmv csr_todense "
    "todense")
_unfollowed(
    "an internal of a JAX transformation, not found in a traced model",
    "custom_lin linear_call unreachable "
    "custom_transpose_call "  # jax <= 0.9
    "call_hi_primitive call_hi_primitive_linearized")  # jax >= 0.8


def _rule(*names: str) -> Callable[[Callable[..., list[_Info]]], Callable[..., list[_Info]]]:
  def register(fn: Callable[..., list[_Info]]) -> Callable[..., list[_Info]]:
    for n in names:
      _RULES[n] = fn
    return fn

  return register


@_rule(*_ELEMENTWISE)
def _elementwise(interp: _Interpreter, eqn: Any, ins: list[_Info]) -> list[_Info]:
  ndim = eqn.outvars[0].aval.ndim
  for v, info in zip(eqn.invars, ins, strict=True):
    if info.origins and v.aval.ndim != ndim:  # pragma: no cover - jaxprs broadcast explicitly
      return _unfollowable(interp, eqn, ins, "operands of different rank")
  return [interp.join(ins, eqn, eqn.primitive.name)] * len(eqn.outvars)


def _unfollowable(interp: _Interpreter, eqn: Any, ins: list[_Info], why: str) -> list[_Info]:
  for info in ins:
    for p in info.origins:
      interp.record(p, _Use("unfollowable", None, f"{eqn.primitive.name} ({why})",
                            interp.where(eqn)))
  return [_activation(ins)] * len(eqn.outvars)


@_rule(*_IDENTITY)
def _identity(interp: _Interpreter, eqn: Any, ins: list[_Info]) -> list[_Info]:
  if len(ins) < len(eqn.outvars) or any(
      v.aval.ndim != o.aval.ndim for v, o in zip(eqn.invars, eqn.outvars, strict=False)):
    return _unfollowable(interp, eqn, ins, "its outputs do not match its inputs")
  return list(ins[: len(eqn.outvars)])


@_rule("scatter", "scatter-add", "scatter-mul", "scatter-min", "scatter-max",
       "scatter-sub")  # jax >= 0.4.38
def _scatter(interp: _Interpreter, eqn: Any, ins: list[_Info]) -> list[_Info]:
  """``W.at[i].set(u)``: the result runs along ``W``'s axes; ``u`` is written into it."""
  operand, indices, updates = ins[:3]
  if indices.origins or updates.origins:
    return _unfollowable(interp, eqn, ins, "a parameter scattered into another value")
  if indices.tainted or updates.tainted:
    return [interp.join([operand, indices, updates], eqn, eqn.primitive.name)]
  return [operand]


@_rule("all_gather")
def _all_gather(interp: _Interpreter, eqn: Any, ins: list[_Info]) -> list[_Info]:
  if eqn.params.get("tiled"):
    return list(ins)
  axis = eqn.params["all_gather_dimension"]
  return [_map_origins(ins[0], lambda o: dataclasses.replace(
      o, dims=o.dims[:axis] + (_NONE,) + o.dims[axis:]))]


@_rule("transpose")
def _transpose(interp: _Interpreter, eqn: Any, ins: list[_Info]) -> list[_Info]:
  perm = eqn.params["permutation"]
  return [_map_origins(ins[0], lambda o: dataclasses.replace(
      o, dims=tuple(o.dims[p] for p in perm)))]


@_rule("broadcast_in_dim")
def _broadcast_in_dim(interp: _Interpreter, eqn: Any, ins: list[_Info]) -> list[_Info]:
  shape, bdims = eqn.params["shape"], eqn.params["broadcast_dimensions"]

  def fn(o: _Origin) -> _Origin:
    dims = [_NONE] * len(shape)
    for src, dst in enumerate(bdims):
      dims[dst] = o.dims[src]
    return dataclasses.replace(o, dims=tuple(dims))

  return [_map_origins(ins[0], fn)]


@_rule("squeeze")
def _squeeze(interp: _Interpreter, eqn: Any, ins: list[_Info]) -> list[_Info]:
  drop = {d % eqn.invars[0].aval.ndim for d in eqn.params["dimensions"]}
  return [_map_origins(ins[0], lambda o: dataclasses.replace(
      o, dims=tuple(s for d, s in enumerate(o.dims) if d not in drop)))]


def _reshape_groups(old: Sequence[int], new: Sequence[int]) -> list[tuple[list[int], list[int]]]:
  """Splits a reshape into groups of old and new dims with equal products, in order."""
  groups, i, j = [], 0, 0
  while i < len(old) or j < len(new):
    gi, gj = [], []
    pi = pj = 1
    while True:
      if i < len(old) and (pi < pj or (pi == pj and not gi) or (j >= len(new))):
        pi *= old[i]
        gi.append(i)
        i += 1
      elif j < len(new) and (pj < pi or not gj):
        pj *= new[j]
        gj.append(j)
        j += 1
      else:
        break
      if pi == pj and gi and gj:
        # Take trailing size-1 dims into the next group rather than this one.
        break
    groups.append((gi, gj))
  return groups


@_rule("reshape")
def _reshape(interp: _Interpreter, eqn: Any, ins: list[_Info]) -> list[_Info]:
  # ``dimensions`` (as vmap of a convolution emits) transposes the operand before reshaping it.
  order = eqn.params.get("dimensions")
  old = eqn.invars[0].aval.shape
  order = tuple(range(len(old))) if order is None else tuple(order)
  old = tuple(old[d] for d in order)
  new = eqn.outvars[0].aval.shape

  def fn(o: _Origin) -> _Origin:
    moved = tuple(o.dims[d] for d in order)
    dims = [_NONE] * len(new)
    for gi, gj in _reshape_groups(old, new):
      merged = _union(moved[d] for d in gi if old[d] != 1)
      for d in gj:
        if new[d] != 1:
          dims[d] = merged
    return dataclasses.replace(o, dims=tuple(dims))

  return [_map_origins(ins[0], fn)]


@_rule("tile")
def _tile(interp: _Interpreter, eqn: Any, ins: list[_Info]) -> list[_Info]:
  # Each result axis repeats the operand's axis: it runs along the same parameter axes.
  return [ins[0]]


@_rule("stack")  # jax >= 0.10
def _stack(interp: _Interpreter, eqn: Any, ins: list[_Info]) -> list[_Info]:
  # A new axis along which the operands lie: no parameter axis runs along it.
  axis = eqn.params["axis"]
  return [interp.join([_map_origins(i, lambda o: dataclasses.replace(
      o, dims=o.dims[:axis] + (_NONE,) + o.dims[axis:])) for i in ins], eqn, "stack")]


@_rule("unstack")  # jax >= 0.10
def _unstack(interp: _Interpreter, eqn: Any, ins: list[_Info]) -> list[_Info]:
  # Each result is one index along ``axis``: a selection, as ``w[i]`` is.
  axis = eqn.params["axis"]
  return [_map_origins(ins[0], lambda o: _Origin(o.dims[:axis] + o.dims[axis + 1:], o.mixed,
                                                 o.indexed | o.dims[axis]))] * len(eqn.outvars)


@_rule("tie")
def _tie(interp: _Interpreter, eqn: Any, ins: list[_Info]) -> list[_Info]:
  return [ins[1]]  # tie(x, y) is y, ordered after x


@_rule("zeros_like")
def _zeros_like(interp: _Interpreter, eqn: Any, ins: list[_Info]) -> list[_Info]:
  return [_CONST] * len(eqn.outvars)


@_rule("debug_callback", "inspect_sharding", "shape_assertion", "check",
       "debug_print",  # jax <= 0.8 and 0.10
       "dce_sink")  # jax >= 0.7
def _effect_only(interp: _Interpreter, eqn: Any, ins: list[_Info]) -> list[_Info]:
  # A side effect (printing, a check) whose results, if any, reach nothing that is computed.
  return [_CONST] * len(eqn.outvars)


@_rule("select_n")
def _select_n(interp: _Interpreter, eqn: Any, ins: list[_Info]) -> list[_Info]:
  """``select_n(which, *cases)``: each element is one case's element at the same position.

  A choice that depends on the data (``jnp.where`` on activations, or ``cond`` under ``vmap``,
  which selects between both branches' operands and results) makes no parameter meet the
  activations: a result made of parameter values runs along their axes.
  """
  which, cases = ins[0], ins[1:]
  if which.tainted and not any(c.tainted for c in cases):
    if any(c.origins for c in cases):
      return [interp.join(cases, eqn, "select_n")]
    return [_activation(ins)]
  return _elementwise(interp, eqn, ins)


def _select(o: _Origin, sizes: Sequence[int], shape: Sequence[int]) -> _Origin:
  """Slicing: an axis cut down to one element selects one unit of a stack."""
  chosen = _union(s for s, n, full in zip(o.dims, sizes, shape, strict=True) if n == 1 < full)
  return dataclasses.replace(o, indexed=o.indexed | chosen)


@_rule("rev", "pad", "cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp", "slice",
       "dynamic_update_slice", "concatenate", "split", "sort")
def _same_axes(interp: _Interpreter, eqn: Any, ins: list[_Info]) -> list[_Info]:
  """Ops whose result axes are the operands' axes (pieces of them, or with values moved along)."""
  name = eqn.primitive.name
  ndim = eqn.outvars[0].aval.ndim
  operands = [(v, i) for v, i in zip(eqn.invars, ins, strict=True) if v.aval.ndim == ndim]
  if name == "dynamic_update_slice":
    operands = operands[:2]
  info = interp.join([i for _, i in operands], eqn, name)
  if name == "slice":
    sizes = eqn.outvars[0].aval.shape
    info = _map_origins(info, lambda o: _select(o, sizes, eqn.invars[0].aval.shape))
  mixing_axis = {"sort": "dimension"}.get(name, "axis" if name in _CUMULATIVE else None)
  if mixing_axis is not None:
    axis = eqn.params[mixing_axis]
    info = _map_origins(info, lambda o: dataclasses.replace(o, mixed=o.mixed | o.dims[axis]))
  return [info] * len(eqn.outvars)


@_rule(*_REDUCTIONS, "argmax", "argmin")
def _reduce(interp: _Interpreter, eqn: Any, ins: list[_Info]) -> list[_Info]:
  axes = set(eqn.params["axes"])
  return [_map_origins(ins[0], lambda o: dataclasses.replace(
      o, dims=tuple(s for d, s in enumerate(o.dims) if d not in axes),
      mixed=o.mixed | _union(o.dims[d] for d in axes)))]


@_rule("dynamic_slice")
def _dynamic_slice(interp: _Interpreter, eqn: Any, ins: list[_Info]) -> list[_Info]:
  operand, indices = ins[0], ins[1:]
  if any(i.origins for i in indices):
    return _unfollowable(interp, eqn, ins, "a parameter used as an index")
  sizes, shape = eqn.params["slice_sizes"], eqn.invars[0].aval.shape
  if any(i.tainted for i in indices):  # a lookup at data-dependent indices
    fan_in = [d for d, (n, full) in enumerate(zip(sizes, shape, strict=True)) if n < full]
    return [_lookup(interp, eqn, operand, fan_in)]
  return [_map_origins(operand, lambda o: _select(o, sizes, shape))]


@_rule("gather")
def _gather(interp: _Interpreter, eqn: Any, ins: list[_Info]) -> list[_Info]:
  operand, indices = ins
  if indices.origins:
    return _unfollowable(interp, eqn, ins, "a parameter used as an index")
  dn = eqn.params["dimension_numbers"]
  shape = eqn.invars[0].aval.shape
  sizes = eqn.params["slice_sizes"]
  batching = getattr(dn, "operand_batching_dims", ())  # jax >= 0.4.31
  picked = set(dn.start_index_map) | set(batching)
  if indices.tainted:  # an embedding lookup
    return [_lookup(interp, eqn, operand, sorted(d for d in picked if sizes[d] < shape[d]))]
  # A selection at fixed indices: the kept dims map to the offset dims, the rest are gone.
  kept = [d for d in range(len(shape))
          if d not in dn.collapsed_slice_dims and d not in batching]
  out_ndim = eqn.outvars[0].aval.ndim

  def fn(o: _Origin) -> _Origin:
    dims = [_NONE] * out_ndim
    for src, dst in zip(kept, dn.offset_dims, strict=True):
      dims[dst] = o.dims[src]
    chosen = _union(o.dims[d] for d in picked if sizes[d] == 1 < shape[d])  # one unit each
    return _Origin(tuple(dims), o.mixed, o.indexed | chosen)

  return [_map_origins(operand, fn)]


def _lookup(interp: _Interpreter, eqn: Any, operand: _Info, fan_in: Sequence[int]) -> _Info:
  """An embedding-style lookup: the looked-up axes act as a one-hot fan-in."""
  for p, o in operand.origins.items():
    if interp.centralize_lookups:
      interp.contraction(o, p, fan_in, eqn, f"{eqn.primitive.name} (lookup)", kind="lookup")
    else:
      interp.record(p, _Use("lookup", None, f"{eqn.primitive.name} (lookup at data indices)",
                            interp.where(eqn)))
  return _activation([], heads=operand.origins)


def _contract(interp: _Interpreter, eqn: Any, ins: list[_Info], contracting: Sequence[
    Sequence[int]], batch: Sequence[Sequence[int]], free: Sequence[Sequence[int]],
              out_dims: Callable[[int, _Origin], tuple[Axes, ...]]) -> list[_Info]:
  """A bilinear op: a parameter side meeting activations is a use; between parameters, a value.

  Between two parameter values, one side is the other's *input* when it has an axis of its own
  that stays free: an axis that no parameter axis (of more than one entry) runs along, a batch
  it was broadcast or tiled to, as a learned query, latent array or class token is; or when it
  is a vector that the contraction takes whole (a probe on a batch of one). The
  other side's contracting axes are then its fan-in, as with any input, the result counts as
  activations, and the input side is left alone. LoRA's ``A @ B`` and a weight scaled by a norm
  have no such axis: their product is a parameter value, used where it meets the activations.
  """
  name = eqn.primitive.name
  sides = list(zip(ins, contracting, batch, strict=True))
  if not any(i.tainted for i in ins):
    inputs = [k for k, (info, f, cs) in enumerate(zip(ins, free, contracting, strict=True))
              if info.origins and interp.is_input(info, eqn.invars[k].aval.shape, f, cs)]
    if len(inputs) == 1 and all(i.origins for i in ins):
      learned = ins[inputs[0]]
      for p in learned.origins:
        interp.record(p, _Use("activation", None, f"{name} input (a learned input, broadcast to "
                              "a batch)", interp.where(eqn)))
      weights = [side for k, side in enumerate(sides) if k != inputs[0]]
      return [_contraction_uses(interp, eqn, weights)]
  if any(i.tainted for i in ins):
    return [_contraction_uses(interp, eqn, sides)]
  merged: dict[int, _Origin] = {}
  for side, (info, cs, _) in enumerate(sides):
    for p, o in info.origins.items():
      new = _Origin(out_dims(side, o), o.mixed | _union(o.dims[d] for d in cs), o.indexed)
      merged[p] = merged[p].join(new) if p in merged else new
  return [_with_origins(merged)]


def _contraction_uses(interp: _Interpreter, eqn: Any, sides: Sequence[tuple[_Info, Sequence[
    int], Sequence[int]]]) -> _Info:
  """Records every parameter of ``sides`` (value, contracting, batch) as meeting its input."""
  heads: set[int] = set()
  for info, cs, bs in sides:
    for p, o in info.origins.items():
      interp.contraction(o, p, cs, eqn, eqn.primitive.name, batch=bs)
      heads.add(p)
  return _activation([i for i, _, _ in sides], heads=heads)


@_rule("dot_general")
def _dot_general(interp: _Interpreter, eqn: Any, ins: list[_Info]) -> list[_Info]:
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  nl, nr = (v.aval.ndim for v in eqn.invars)
  lfree = [d for d in range(nl) if d not in lc and d not in lb]
  rfree = [d for d in range(nr) if d not in rc and d not in rb]

  def out_dims(side: int, o: _Origin) -> tuple[Axes, ...]:
    batch, free = (lb, lfree) if side == 0 else (rb, rfree)
    pad = [_NONE] * (len(rfree) if side == 0 else len(lfree))
    own = [o.dims[d] for d in free]
    return tuple([o.dims[d] for d in batch] + (own + pad if side == 0 else pad + own))

  return _contract(interp, eqn, ins, (lc, rc), (lb, rb), (lfree, rfree), out_dims)


@_rule("ragged_dot_general")
def _ragged_dot_general(interp: _Interpreter, eqn: Any, ins: list[_Info]) -> list[_Info]:
  # Grouped matmuls (mixture of experts): the rhs group dim indexes experts, a stacking axis.
  dn = eqn.params["ragged_dot_dimension_numbers"]
  (lc, rc), (_, rb) = dn.dot_dimension_numbers
  if not any(i.tainted for i in ins) or ins[0].origins or ins[2].origins:
    return _unfollowable(interp, eqn, ins, "grouped matmul between parameters")
  stack = [*rb, *dn.rhs_group_dimensions]
  return [_contraction_uses(interp, eqn, [(ins[1], rc, stack)])]


@_rule("ragged_dot")  # jax 0.4.30-0.4.38: lhs (m, k), rhs (groups, k, n), group sizes
def _ragged_dot(interp: _Interpreter, eqn: Any, ins: list[_Info]) -> list[_Info]:
  if not any(i.tainted for i in ins) or ins[0].origins or ins[2].origins:
    return _unfollowable(interp, eqn, ins, "grouped matmul between parameters")
  return [_contraction_uses(interp, eqn, [(ins[1], (1,), (0,))])]


@_rule("conv_general_dilated")
def _conv(interp: _Interpreter, eqn: Any, ins: list[_Info]) -> list[_Info]:
  lhs, rhs = ins
  if lhs.origins or not lhs.tainted:
    return _unfollowable(interp, eqn, ins, "a parameter as the convolution's input, or a "
                         "convolution between parameters")
  rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, *spatial)
  return [_contraction_uses(interp, eqn, [(lhs, (), ()), (rhs, rhs_spec[1:], ())])]


@_rule("scan")
def _scan(interp: _Interpreter, eqn: Any, ins: list[_Info]) -> list[_Info]:
  p = eqn.params
  body, nc, ncarry = p["jaxpr"], p["num_consts"], p["num_carry"]
  consts, carry, xs = ins[:nc], ins[nc:nc + ncarry], ins[nc + ncarry:]
  # Each iteration sees one slice of xs: the stacked axis is selected one index at a time.
  xs = [_map_origins(x, lambda o: _Origin(o.dims[1:], o.mixed, o.indexed | o.dims[0]))
        for x in xs]
  consts_in = [_CONST] * len(body.consts)

  def step(c: list[_Info]) -> list[_Info]:
    return interp.run_inside(eqn, body.jaxpr, consts_in, [*consts, *c, *xs])

  carry, out = interp.solve_loop(step, list(carry), eqn)
  ys = out[ncarry:]
  ys = [_map_origins(y, lambda o: dataclasses.replace(o, dims=(_NONE, *o.dims))) for y in ys]
  return [*carry, *ys]


@_rule("while")
def _while(interp: _Interpreter, eqn: Any, ins: list[_Info]) -> list[_Info]:
  p = eqn.params
  cn, bn = p["cond_nconsts"], p["body_nconsts"]
  cconsts, bconsts, carry = ins[:cn], ins[cn:cn + bn], ins[cn + bn:]
  cond, body = p["cond_jaxpr"], p["body_jaxpr"]

  def step(c: list[_Info]) -> list[_Info]:
    interp.run_inside(eqn, cond.jaxpr, [_CONST] * len(cond.consts), [*cconsts, *c])
    return interp.run_inside(eqn, body.jaxpr, [_CONST] * len(body.consts), [*bconsts, *c])

  return interp.solve_loop(step, list(carry), eqn)[0]


@_rule("cond")
def _cond(interp: _Interpreter, eqn: Any, ins: list[_Info]) -> list[_Info]:
  if ins[0].origins:
    return _unfollowable(interp, eqn, ins, "a parameter as the branch index")
  outs = [interp.run_inside(eqn, b.jaxpr, [_CONST] * len(b.consts), ins[1:])
          for b in eqn.params["branches"]]
  merged = [interp.join(list(vals), eqn, "cond output") for vals in zip(*outs, strict=True)]
  if ins[0].tainted:  # a data-dependent choice: still the branches' values, along their axes
    merged = [m if m.origins or m.tainted else _activation(ins[:1]) for m in merged]
  return merged


# ------------------------------------------------------------------------------------------------
# The public function.


@dataclasses.dataclass(frozen=True)
class _Leaf:
  """What was inferred for one parameter: the spec, and why."""

  path: str
  keypath: str
  shape: tuple[int, ...] | None
  output: AxisSpec
  reason: str
  uses: tuple[_Use, ...]
  error: str | None = None
  stack: tuple[int, ...] = ()
  head: bool = False

  @property
  def layout(self) -> "Layout | None":
    if self.output is None or self.shape is None:
      return None
    return Layout(tuple(a for a in range(len(self.shape)) if a not in self.output),
                  tuple(a for a in self.output if a not in self.stack), self.stack, self.head)


def _is_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def _decide(shape: tuple[int, ...], uses: Sequence[_Use]
            ) -> tuple[AxisSpec, tuple[int, ...], str, str | None]:
  """The spec from a parameter's uses: ``(output, stack, reason, error)``.

  A contraction that leaves the parameter no fan-in (an outer product, a fan-in of one entry)
  implies that GC leaves it alone, as an elementwise use does: the two agree.
  """
  bad = [u for u in uses if u.kind in ("unfollowable", "inconsistent")]

  def implied(u: _Use) -> AxisSpec:
    if u.output is None:
      return None
    fan_in = [shape[a] for a in range(len(shape)) if a not in u.output]
    return None if int(np.prod(fan_in)) == 1 else u.output

  outputs = {implied(u) for u in uses}
  if bad:
    return None, (), "a use cannot be followed", "a use cannot be followed"
  if len(outputs) > 1:
    return None, (), "its uses disagree", "its uses disagree"
  if not uses:
    return None, (), "no use reaches the activations: left alone", None
  output = next(iter(outputs))
  if output is None:
    no_fan_in = [u for u in uses if u.output is not None]
    if no_fan_in:
      return None, (), f"{no_fan_in[0].detail}: no fan-in, left alone", None
    if {u.kind for u in uses} == {"lookup"}:
      return None, (), "lookup (gather): left alone", None
    return None, (), "elementwise only (bias, scale): left alone", None
  stack = set(output)
  for u in uses:
    stack &= set(u.stack)
  reasons = sorted({u.detail for u in uses})
  return output, _sorted(stack), "; ".join(reasons), None


_NOT_TRACEABLE = tuple(getattr(jax.errors, name) for name in (
    "ConcretizationTypeError", "TracerArrayConversionError", "TracerIntegerConversionError",
    "NonConcreteBooleanIndexError") if hasattr(jax.errors, name))


def _not_traceable(error: Exception, names: Mapping[str, Sequence[str]]) -> ValueError:
  """A ``ValueError`` saying that ``fn`` is not traceable, naming the user's arguments.

  JAX names the traced arguments of the library's own wrapper (``p_arrays[0]``, ...): ``names``
  maps each of those lists to the user's names of its entries.
  """
  found = [names[kind][int(i)] for kind, i in re.findall(r"\b([psa])_arrays\[(\d+)\]", str(error))
           if int(i) < len(names[kind])]
  on = ", ".join(dict.fromkeys(found)) or "the parameters or the inputs"
  return ValueError(
      f"optax_gc.infer_output_axes: fn cannot be traced ({type(error).__name__}): it needs the "
      f"concrete value of something that depends on {on}, for example a Python `if`, `bool()` "
      "or `int()` on it. fn must be traceable by jax.make_jaxpr, with every array abstract: use "
      "jnp.where or jax.lax.cond instead, or pass the value as a non-array argument (a Python "
      "bool or int is passed as it is).")


def _analyze(
    fn: Callable[..., Any], params: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
    *, state: Any = None, overrides: Mapping[str, Any] | None, centralize_lookups: bool,
) -> tuple[Any, list[_Leaf]]:
  """Traces ``fn(params, *args, **kwargs)`` and returns ``(treedef, leaves)`` of ``params``.

  ``state`` is traced too, as model state that is not data (``fn`` is then called as
  ``fn(params, state, *args, **kwargs)``).
  """
  p_paths, p_def = jax.tree_util.tree_flatten_with_path(params)
  p_leaves = [x for _, x in p_paths]
  is_param = [_is_array(x) for x in p_leaves]
  s_paths, s_def = jax.tree_util.tree_flatten_with_path(state)
  s_leaves = [x for _, x in s_paths]
  a_paths, a_def = jax.tree_util.tree_flatten_with_path((args, kwargs))
  a_leaves = [x for _, x in a_paths]
  a_dyn = [i for i, x in enumerate(a_leaves) if _is_array(x)]
  if not a_dyn:
    raise ValueError(
        "optax_gc.infer_output_axes: no array among the example inputs. Pass the model's "
        "input (an array or a jax.ShapeDtypeStruct) as an argument after params, not closed "
        "over: only values passed as arguments count as data.")

  def traced(p_arrays: list[Any], s_arrays: list[Any], a_arrays: list[Any]) -> Any:
    leaves = list(p_leaves)
    for i, x in zip([i for i, ok in enumerate(is_param) if ok], p_arrays, strict=True):
      leaves[i] = x
    a_all = list(a_leaves)
    for i, x in zip(a_dyn, a_arrays, strict=True):
      a_all[i] = x
    call_args, call_kwargs = jax.tree_util.tree_unflatten(a_def, a_all)
    p = jax.tree_util.tree_unflatten(p_def, leaves)
    if state is None:
      return fn(p, *call_args, **call_kwargs)
    return fn(p, jax.tree_util.tree_unflatten(s_def, s_arrays), *call_args, **call_kwargs)

  p_arrays = [x for x, ok in zip(p_leaves, is_param, strict=True) if ok]
  try:
    closed = jax.make_jaxpr(traced)(p_arrays, s_leaves, [a_leaves[i] for i in a_dyn])
  except _NOT_TRACEABLE as e:
    ks = jax.tree_util.keystr
    names = {
        "p": [f"params{ks(p)}" for (p, _), ok in zip(p_paths, is_param, strict=True) if ok],
        "s": [f"the model state{ks(p)}" for p, _ in s_paths],
        "a": [("args" if a_paths[i][0][0].idx == 0 else "kwargs") + ks(a_paths[i][0][1:])
              for i in a_dyn],
    }
    raise _not_traceable(e, names) from e
  jaxpr = closed.jaxpr
  infos = [_with_origins({k: _Origin(tuple(frozenset({a}) for a in range(np.ndim(x))))})
           for k, x in enumerate(p_arrays)]
  infos += [_CONST] * len(s_leaves)
  for i in a_dyn:  # PRNG keys are not data: a mask drawn from one is a constant here
    key = jax.dtypes.issubdtype(getattr(a_leaves[i], "dtype", None), jax.dtypes.prng_key)
    infos.append(_CONST if key else _TAINTED)
  interp = _Interpreter(centralize_lookups, [tuple(np.shape(x)) for x in p_arrays])
  results = interp.run(jaxpr, [_CONST] * len(closed.consts), infos)
  heads = _union(r.heads for r in results)

  patterns = [(re.compile(k), v) for k, v in (overrides or {}).items()]
  out: list[_Leaf] = []
  k = 0
  for (path, x), ok in zip(p_paths, is_param, strict=True):
    simple = keypath_str(path)
    keypath = jax.tree_util.keystr(path)
    if not ok:
      out.append(_Leaf(simple, keypath, None, None, "not an array: left alone", ()))
      continue
    shape = tuple(np.shape(x))
    uses = tuple(interp.uses.get(k, {}))
    head = k in heads
    k += 1
    match = next(((pat, v) for pat, v in patterns if pat.fullmatch(simple)), None)
    if match is not None:
      value = match[1]
      value = None if value is None else _sorted(
          a % max(len(shape), 1) for a in (value if isinstance(value, tuple) else (value,)))
      out.append(_Leaf(simple, keypath, shape, value, f"override {match[0].pattern!r}", uses,
                       head=head))
      continue
    output, stack, reason, error = _decide(shape, uses)
    if head and output is not None:
      reason += "; the model's head"
    out.append(_Leaf(simple, keypath, shape, output, reason, uses, error, stack, head))
  return p_def, out


def _raise_errors(leaves: Sequence[_Leaf]) -> None:
  bad = [leaf for leaf in leaves if leaf.error]
  if not bad:
    return
  lines = [f"optax_gc.infer_output_axes: cannot infer the output axes of {len(bad)} "
           f"parameter{'s' if len(bad) > 1 else ''}:"]
  for leaf in bad:
    lines.append(f"- leaf {leaf.keypath} with shape {leaf.shape}: {leaf.error}:")
    lines.extend(f"    {u.describe()}" for u in leaf.uses)
  lines.append(
      "Give such leaves a spec of their own with overrides={regex: axes}, the regex matching "
      "the path written as in " + repr(bad[0].path) + " (None leaves the leaf alone).")
  raise ValueError("\n".join(lines))


def _format_table(leaves: Sequence[_Leaf]) -> str:
  """A plain-text table: path, shape, fan-in, output and stacked axes, reason."""
  rows = [("path", "shape", "fan-in", "output", "stacked", "reason")]
  for leaf in leaves:
    shape = "-" if leaf.shape is None else str(leaf.shape)
    layout = leaf.layout
    if layout is None:
      cells = ("-", "None", "-")
    else:
      cells = (str(layout.fan_in), str(layout.output), str(layout.stack) if layout.stack else "-")
    rows.append((leaf.path or "<root>", shape, *cells, leaf.reason))
  widths = [max(len(r[i]) for r in rows) for i in range(5)]
  return "\n".join(
      "  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5]
      for r in rows).rstrip()


def infer_from(
    fn: Callable[..., Any], params: Any, args: tuple[Any, ...], kwargs: dict[str, Any], *,
    state: Any = None, overrides: Mapping[str, Any] | None = None,
    centralize_lookups: bool = False, report: Callable[[str], Any] | None = None,
    layout: bool = False,
) -> Any:
  """:func:`infer_output_axes` (or, with ``layout=True``, :func:`infer_layout`) with the example
  inputs as a tuple and a dict, and model state."""
  treedef, leaves = _analyze(fn, params, args, kwargs, state=state, overrides=overrides,
                             centralize_lookups=centralize_lookups)
  if report is not None:
    report(_format_table(leaves))
  _raise_errors(leaves)
  return jax.tree_util.tree_unflatten(
      treedef, [leaf.layout if layout else leaf.output for leaf in leaves])


def infer_output_axes(
    fn: Callable[..., Any],
    params: Any,
    *args: Any,
    overrides: Mapping[str, int | tuple[int, ...] | None] | None = None,
    centralize_lookups: bool = False,
    report: Callable[[str], Any] | None = None,
    **kwargs: Any,
) -> Any:
  r"""Reads each parameter's output axes from the model itself, for :func:`centralize`.

  Traces ``fn(params, *args, **kwargs)`` with ``jax.make_jaxpr`` (nothing is compiled or run)
  and follows every parameter to the contraction where it meets the activations. There, the
  dimension numbers name its fan-in: for ``dot_general`` the parameter's contracting dims, for
  ``conv_general_dilated`` the kernel's input-feature and spatial dims. Every other axis indexes
  output units (free and batch dims, the output-feature dim), and so does a stacking axis over
  which the parameter is scanned, vmapped or indexed per layer. GC then takes, for each output
  unit, the mean over the fan-in:

  .. math::

    \Phi(g) = g - \operatorname{mean}_{a \notin O}(g), \qquad
    O = \text{the inferred output axes}.

  The parameter is followed through shape ops (transpose, reshape where the axes map,
  broadcast, slice, pad, ...), elementwise ops and scaling by other values (LoRA, weight norm),
  sharding annotations (``sharding_constraint``, ``reshard``, and ``mesh_cast`` where JAX has
  it) and sub-jaxprs (``jit``, ``custom_jvp``/``custom_vjp``, ``remat``, ``cond``, ``while``,
  ``scan``, ``shard_map``). A parameter gets ``None`` (GC leaves it alone) when no use contracts it:
  biases of any rank and norm scales (elementwise with the activations), unused parameters,
  learned inputs (a class token, a probe or latent array broadcast or tiled to a batch and fed
  to a dense layer, which is that layer's input: the layer's fan-in is where it meets it), and
  embedding tables used only by a lookup. GC's derivation assumes dense inputs, and
  centralizing a table would turn a sparse update into a dense one; ``centralize_lookups=True``
  treats a lookup as the one-hot product it equals, with the looked-up axis as fan-in.

  Every use of a parameter counts. If its uses disagree (a tied embedding used for the lookup
  and for the logits, ``W`` and ``W.T`` in a tied autoencoder, a reshape that merges fan-in and
  output axes), or if one use reaches a primitive that is not followed (an opaque custom call,
  a Pallas kernel, a matrix decomposition: each is listed with its reason), nothing is guessed:
  a ``ValueError`` names each such leaf's key path and shape and lists each use with the axes it
  implies and where in the user's code it is. Give those leaves a spec of their own with
  ``overrides``. An axis summed into every element before the contraction (a norm over it, as
  weight norm does) reaches every output unit: it is fan-in. A ``fn`` that cannot be traced
  (a Python ``if`` on a traced value) raises a ``ValueError`` naming the argument it depends on.

  Args:
    fn: the model, as a function ``fn(params, *args, **kwargs)``.
    params: the parameters: a pytree of arrays or ``jax.ShapeDtypeStruct``\ s (so a model too
      big for memory can be inspected). Leaves that are not arrays get ``None``.
    *args: example inputs. Array leaves (arrays or ``jax.ShapeDtypeStruct``\ s) are traced and
      count as data; other leaves (``train=True``, ...) are passed as they are.
    overrides: maps a regex to an output-axis spec (an int, a tuple of ints, or ``None``). A
      leaf whose path, written like ``'layers/0/attn/kernel'``, fully matches a regex gets that
      spec instead of the inferred one; its conflicts are not raised. The first match wins.
    centralize_lookups: treat embedding lookups as contractions over the looked-up axis,
      instead of leaving lookup-only tables alone.
    report: if given, called with a table (one row per leaf: path, shape, fan-in, output and
      stacked axes as in :func:`infer_layout`, and the reason), for example ``report=print``;
      called before any error is raised. The spec is the output and stacked axes together.
    **kwargs: keyword inputs, treated like ``args``.

  Returns:
    A pytree with the structure of ``params`` whose leaves are a sorted tuple of non-negative
    ints (the output axes) or ``None`` (left alone). ``optax_gc.centralize(output_axis=...)``
    and every alias's ``output_axis`` take it as it is.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import optax, optax_gc
    >>> def attention_q(params, x):  # q/k/v-style kernel (in, heads, head_dim)
    ...   return jnp.einsum('btd,dnh->btnh', x, params['q']) + params['b']
    >>> params = {'q': jnp.ones((8, 2, 4)), 'b': jnp.zeros((2, 4))}
    >>> x = jax.ShapeDtypeStruct((1, 5, 8), jnp.float32)
    >>> spec = optax_gc.infer_output_axes(attention_q, params, x)
    >>> spec
    {'b': None, 'q': (1, 2)}
    >>> tx = optax.chain(optax_gc.centralize(spec), optax.adamw(1e-3))
    >>> _ = optax_gc.infer_output_axes(attention_q, params, x, report=print)
    path  shape      fan-in  output  stacked  reason
    b     (2, 4)     -       None    -        elementwise only (bias, scale): left alone
    q     (8, 2, 4)  (0,)    (1, 2)  -        dot_general, contracting (0,); the model's head

  References:
    Yong, Huang, Hua and Zhang, `Gradient Centralization: A New Optimization
    Technique for Deep Neural Networks <https://arxiv.org/abs/2004.01461>`_,
    ECCV 2020.

    The jaxpr language: https://docs.jax.dev/en/latest/jaxpr.html
  """
  return infer_from(fn, params, args, kwargs, overrides=overrides,
                    centralize_lookups=centralize_lookups, report=report)


def infer_layout(
    fn: Callable[..., Any],
    params: Any,
    *args: Any,
    overrides: Mapping[str, int | tuple[int, ...] | None] | None = None,
    centralize_lookups: bool = False,
    report: Callable[[str], Any] | None = None,
    **kwargs: Any,
) -> Any:
  r"""Each parameter's :class:`Layout`: its fan-in, output and stacked axes, read from the model.

  The same inference as :func:`infer_output_axes`, kept apart into what optimizers that work
  unit by unit or matrix by matrix need: GC averages over ``fan_in``; Muon orthogonalizes the
  ``fan_in`` :math:`\times` ``output`` matrix, separately along ``stack`` (see
  :func:`optax_gc.muon_dimension_numbers`); AGC clips each output unit by its norm over
  ``fan_in``. ``infer_output_axes`` returns ``output + stack`` (sorted) for the same leaf.

  A *stacked* axis is a parameter axis that indexes separate matrices: scanned, vmapped or
  indexed one layer at a time, or a batch dimension of the parameter's ``dot_general`` (mixture-
  of-experts kernels ``"ecd,edf->ecf"``, a grouped matmul's groups). An axis that one use stacks
  and another does not is an output axis. ``head`` is ``True`` for a parameter whose
  contraction's result reaches ``fn``'s output with no further contraction by a parameter: the
  classifier or logits head (of the value ``fn`` returns: return the logits, not a loss of
  them, for this to mean the last layer).

  Args:
    fn: the model, as a function ``fn(params, *args, **kwargs)``.
    params: the parameters: a pytree of arrays or ``jax.ShapeDtypeStruct``\ s.
    *args: example inputs, as in :func:`infer_output_axes`.
    overrides: as in :func:`infer_output_axes`: the axes given are the output axes (with no
      stacked axis), all others are the fan-in; ``None`` gives ``None``.
    centralize_lookups: as in :func:`infer_output_axes`.
    report: as in :func:`infer_output_axes`.
    **kwargs: keyword inputs, treated like ``args``.

  Returns:
    A pytree with the structure of ``params`` whose leaves are a :class:`Layout`, or ``None``
    where the parameter has no fan-in (biases, norm scales, lookup-only tables, unused ones).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import optax_gc
    >>> def moe(params, x):  # experts (E, d, f), tokens routed per expert: (E, C, d)
    ...   return jnp.einsum('ecd,edf->ecf', x, params['experts'])
    >>> params = {'experts': jnp.ones((4, 8, 16))}
    >>> x = jax.ShapeDtypeStruct((4, 2, 8), jnp.float32)
    >>> optax_gc.infer_layout(moe, params, x)
    {'experts': Layout(fan_in=(1,), output=(2,), stack=(0,), head=True)}
    >>> optax_gc.infer_output_axes(moe, params, x)
    {'experts': (0, 2)}

  References:
    Yong, Huang, Hua and Zhang, `Gradient Centralization: A New Optimization
    Technique for Deep Neural Networks <https://arxiv.org/abs/2004.01461>`_,
    ECCV 2020.
  """
  return infer_from(fn, params, args, kwargs, overrides=overrides,
                    centralize_lookups=centralize_lookups, report=report, layout=True)
