"""Every primitive of the installed JAX is accounted for by the inference, so that a JAX release
that adds one fails this test rather than a user.

The inference (``optax_gc/_src/infer.py``) puts each primitive in exactly one class: it has a
rule, it is a call whose sub-jaxpr is followed, or it is listed as not followed, with the reason.
The primitives are found the way JAX's own registry would list them: every ``Primitive`` object
alive once JAX's public modules (and the optional ones that import) are loaded. CI runs this on
the newest JAX and on the floor version of ``pyproject.toml``.
"""

import functools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.ad_checkpoint import checkpoint_name

import optax_gc
from optax_gc._src import infer

# The names of the tables that are not primitives of every scanned JAX version, with the
# versions that have them. Scanned: 0.4.27, 0.4.30, 0.4.38, 0.5.3, 0.6.2, 0.7.2, 0.8.2, 0.9.2
# and 0.10.2, each with the modules below imported, as the test does (an optional module that
# failed to import in one version leaves a gap). A name absent from the installed JAX must be
# listed here.
VERSIONS = {
    "accum_grad_in_ref": "0.7.2-0.10.2",
    "add_dependency": "0.7.2-0.9.2",
    "ag_done": "0.9.2",
    "ag_start": "0.9.2",
    "all_gather_done": "0.10.2",
    "all_gather_invariant": "0.6.2-0.10.2",
    "all_gather_reduced": "0.8.2-0.10.2",
    "all_gather_reduced_start": "0.10.2",
    "all_gather_start": "0.10.2",
    "all_to_all_done": "0.10.2",
    "all_to_all_start": "0.10.2",
    "assume_for_verification": "0.4.38, 0.6.2, 0.7.2",
    "atomic_cas": "0.4.27, 0.4.30, 0.4.38, 0.6.2, 0.7.2, 0.8.2",
    "atomic_rmw": "0.4.27, 0.4.30, 0.4.38, 0.6.2, 0.7.2, 0.8.2",
    "bias_bwd": "0.4.38-0.7.2",
    "bias_fwd": "0.4.38-0.7.2",
    "bitcast": "0.4.38, 0.6.2, 0.7.2, 0.8.2, 0.9.2",
    "box_get": "0.8.2-0.10.2",
    "box_set": "0.8.2-0.10.2",
    "call_exported": "0.6.2-0.10.2",
    "call_hi_primitive": "0.8.2-0.10.2",
    "call_hi_primitive_linearized": "0.8.2-0.10.2",
    "cholesky_update": "0.4.30-0.10.2",
    "composite": "0.5.3-0.10.2",
    "compute_on": "0.8.2-0.10.2",
    "core_map": "0.4.38, 0.6.2, 0.7.2, 0.8.2, 0.9.2, 0.10.2",
    "create_linear": "0.8.2-0.10.2",
    "cudnn_fusion": "0.4.38-0.10.2",
    "custom_transpose_call": "0.4.27-0.9.2",
    "custom_vjp_call_jaxpr": "0.4.27-0.5.3",
    "dce_sink": "0.7.2-0.10.2",
    "debug_print": "0.4.30, 0.4.38, 0.6.2, 0.7.2, 0.8.2, 0.9.2, 0.10.2",
    "delay": "0.4.38, 0.6.2, 0.7.2, 0.8.2, 0.9.2, 0.10.2",
    "device_id": "0.4.38",
    "dim_as_value": "0.6.2-0.10.2",
    "dimension_size": "0.6.2-0.10.2",
    "dma_start": "0.4.38, 0.6.2, 0.7.2, 0.8.2, 0.9.2",
    "dma_wait": "0.4.38, 0.6.2, 0.7.2, 0.8.2, 0.9.2",
    "dot_product_attention_bwd": "0.4.38-0.10.2",
    "dot_product_attention_bwd_wrapper": "0.4.38-0.10.2",
    "dot_product_attention_fp8_bwd": "0.4.38-0.10.2",
    "dot_product_attention_fp8_bwd_wrapper": "0.4.38-0.10.2",
    "dot_product_attention_fp8_fwd": "0.4.38-0.10.2",
    "dot_product_attention_fp8_fwd_wrapper": "0.4.38-0.10.2",
    "dot_product_attention_fwd": "0.4.38-0.10.2",
    "dot_product_attention_fwd_wrapper": "0.4.38-0.10.2",
    "eigh_jacobi": "0.4.27-0.7.2",
    "empty2": "0.7.2-0.10.2",
    "empty_ref": "0.9.2-0.10.2",
    "eval_jaxpr": "0.4.30-0.10.2",
    "ffi_call": "0.4.38-0.10.2",
    "for": "0.4.38, 0.6.2",
    "free_ref": "0.9.2-0.10.2",
    "freeze": "0.4.38-0.10.2",
    "from_edtype": "0.4.38-0.10.2",
    "full_to_shard": "0.4.27-0.9.2",
    "geqp3": "0.5.3-0.10.2",
    "get_barrier_semaphore": "0.4.38, 0.6.2, 0.7.2, 0.8.2, 0.9.2",
    "get_global": "0.8.2-0.10.2",
    "id": "0.4.27-0.4.30",
    "infeed": "0.4.27-0.6.2",
    "jaxpr_call": "0.9.2-0.10.2",
    "jit": "0.7.2-0.10.2",
    "layout_constraint": "0.6.2-0.10.2",
    "log_extend": "0.10.2",
    "log_read": "0.10.2",
    "masked_load": "0.4.27, 0.4.30, 0.4.38, 0.6.2, 0.7.2, 0.8.2, 0.9.2, 0.10.2",
    "masked_swap": "0.4.27, 0.4.30, 0.4.38, 0.6.2, 0.7.2, 0.8.2, 0.9.2, 0.10.2",
    "matmul_acc_lhs": "0.9.2",
    "matmul_pop": "0.9.2",
    "matmul_push_rhs": "0.9.2",
    "max_contiguous": "0.4.27, 0.4.30, 0.4.38, 0.6.2, 0.7.2, 0.8.2",
    "mesh_cast": "0.5.3-0.6.2",
    "mpmd_map": "0.10.2",
    "mulhi": "0.10.2",
    "multiple_of": "0.4.27, 0.4.30, 0.4.38, 0.6.2, 0.7.2, 0.8.2, 0.9.2, 0.10.2",
    "mutable_array": "0.4.27-0.6.2",
    "new_box": "0.8.2-0.10.2",
    "new_log": "0.10.2",
    "new_ref": "0.7.2-0.10.2",
    "num_programs": "0.4.27, 0.4.30, 0.4.38, 0.6.2, 0.7.2, 0.8.2, 0.9.2, 0.10.2",
    "ormqr": "0.10.2",
    "outfeed": "0.4.27-0.6.2",
    "outside_call": "0.4.27-0.4.30",
    "pack_elementwise": "0.8.2-0.9.2",
    "pallas_call": "0.4.27, 0.4.30, 0.4.38, 0.6.2, 0.7.2, 0.8.2, 0.9.2, 0.10.2",
    "pbroadcast_done": "0.10.2",
    "pbroadcast_start": "0.10.2",
    "pdot": "0.4.27-0.4.30",
    "pgather": "0.4.27-0.8.2",
    "philox2x32": "0.10.2",
    "philox4x32": "0.10.2",
    "pin": "0.8.2-0.10.2",
    "pjit": "0.4.27-0.6.2",
    "ppermute_done": "0.10.2",
    "ppermute_start": "0.10.2",
    "precv": "0.7.2-0.10.2",
    "preduced": "0.8.2-0.10.2",
    "pretend_for_verification": "0.4.38, 0.6.2, 0.7.2",
    "prng_join": "0.6.2-0.9.2",
    "prng_random_bits": "0.4.38, 0.6.2, 0.7.2, 0.8.2, 0.9.2",
    "prng_seed": "0.4.38, 0.6.2, 0.7.2, 0.8.2, 0.9.2",
    "prng_split": "0.6.2-0.9.2",
    "program_id": "0.4.27, 0.4.30, 0.4.38, 0.6.2, 0.7.2, 0.8.2, 0.9.2, 0.10.2",
    "psend": "0.7.2-0.10.2",
    "psum2": "0.4.27-0.5.3",
    "psum_done": "0.10.2",
    "psum_invariant": "0.6.2-0.10.2",
    "psum_invariant_start": "0.10.2",
    "psum_start": "0.10.2",
    "pvary": "0.6.2-0.10.2",
    "ragged_all_to_all": "0.4.38-0.10.2",
    "ragged_dot": "0.4.30-0.4.38",
    "ragged_dot_general": "0.5.3-0.10.2",
    "random_gamma_grad": "0.4.27-0.5.3",
    "reciprocal": "0.6.2-0.10.2",
    "reduce_scatter_done": "0.10.2",
    "reduce_scatter_start": "0.10.2",
    "reduced_vary_cast_p": "0.8.2-0.10.2",
    "remat_opt": "0.4.38-0.10.2",
    "remove_memory_space": "0.7.2-0.8.2",
    "repeat": "0.4.38, 0.6.2, 0.7.2, 0.8.2",
    "reshard": "0.5.3-0.10.2",
    "roll": "0.4.38, 0.6.2, 0.7.2, 0.8.2, 0.9.2",
    "run_scoped": "0.4.38, 0.6.2, 0.7.2, 0.8.2, 0.9.2, 0.10.2",
    "scaled_dot": "0.9.2-0.10.2",
    "scaled_matmul": "0.5.3-0.10.2",
    "scaled_matmul_wrapper": "0.5.3-0.10.2",
    "scatter-sub": "0.4.38-0.10.2",
    "semaphore_read": "0.4.38, 0.6.2, 0.7.2, 0.8.2, 0.9.2, 0.10.2",
    "semaphore_signal": "0.4.38, 0.6.2, 0.7.2, 0.8.2, 0.9.2, 0.10.2",
    "semaphore_wait": "0.4.38, 0.6.2, 0.7.2, 0.8.2, 0.9.2, 0.10.2",
    "shape_assertion": "0.6.2-0.10.2",
    "shard_to_full": "0.4.27-0.9.2",
    "sharding_cast": "0.4.38",
    "split": "0.4.38-0.10.2",
    "square": "0.4.38-0.10.2",
    "stack": "0.10.2",
    "stage": "0.10.2",
    "stochastic_round": "0.8.2-0.9.2",
    "symmetric_product": "0.5.3-0.10.2",
    "symmetric_update": "0.4.38",
    "threefry4x32": "0.10.2",
    "tile": "0.9.2-0.10.2",
    "to_edtype": "0.4.38-0.10.2",
    "tpu_custom_call": "0.4.38, 0.6.2, 0.7.2, 0.8.2, 0.9.2",
    "trace_value": "0.9.2",
    "unpack_elementwise": "0.8.2-0.9.2",
    "unpin": "0.8.2-0.10.2",
    "unreduced_psum": "0.8.2-0.10.2",
    "unreduced_psum_start": "0.10.2",
    "unreduced_reduce_scatter": "0.8.2-0.10.2",
    "unreduced_reduce_scatter_start": "0.10.2",
    "unstack": "0.10.2",
    "vary_unreduced_cast_p": "0.8.2-0.10.2",
    "with_memory_space_constraint": "0.6.2-0.10.2",
    "xla_pmap": "0.4.27-0.9.2",
}

_MODULES = (
    "jax.numpy", "jax.lax", "jax.nn", "jax.random", "jax.scipy", "jax.scipy.special",
    "jax.scipy.linalg", "jax.numpy.linalg", "jax.numpy.fft", "jax.experimental",
    "jax.experimental.shard_map", "jax.experimental.pallas", "jax.extend", "jax.extend.core",
    "jax.experimental.custom_partitioning", "jax.experimental.sparse", "jax.experimental.jet",
    "jax.ad_checkpoint", "jax.sharding", "jax.experimental.multihost_utils",
    "jax.experimental.checkify", "jax.experimental.compute_on", "jax.experimental.layout",
    "jax.experimental.ode", "jax.image", "jax.debug",
)


_SCAN = """
import gc, importlib, json, sys
for name in sys.argv[1:]:
  try:
    importlib.import_module(name)
  except Exception:  # an optional module that this JAX or this machine lacks
    pass
try:
  from jax.extend.core import Primitive
except ImportError:  # jax < 0.4.31
  from jax.core import Primitive
print(json.dumps(sorted({o.name for o in gc.get_objects() if isinstance(o, Primitive)})))
"""


@functools.cache
def _installed_primitives() -> frozenset[str]:
  """The primitives JAX defines, scanned in a fresh interpreter (no test's own primitives)."""
  out = subprocess.run([sys.executable, "-c", _SCAN, *_MODULES], capture_output=True, text=True,
                       check=True, timeout=300)
  return frozenset(json.loads(out.stdout.strip().splitlines()[-1]))


CLASSES = {"rule": set(infer._RULES), "call": set(infer._CALLS),
           "not followed": set(infer._UNFOLLOWED)}


def test_every_installed_primitive_is_in_exactly_one_class():
  installed = _installed_primitives()
  assert len(installed) > 150  # the scan found JAX's primitives, not a handful
  unclassified = sorted(n for n in installed if not any(n in c for c in CLASSES.values()))
  assert not unclassified, (
      f"jax {jax.__version__} defines primitives that optax_gc's inference does not classify: "
      f"{unclassified}. Give each a rule, list it as a call, or list it as not followed with "
      "the reason, in optax_gc/_src/infer.py.")
  for a, names_a in CLASSES.items():
    for b, names_b in CLASSES.items():
      if a < b:
        assert not names_a & names_b, (a, b, sorted(names_a & names_b))


def test_every_name_in_the_tables_is_a_primitive_of_some_version():
  installed = _installed_primitives()
  names = set().union(*CLASSES.values())
  unknown = sorted(n for n in names if n not in installed and n not in VERSIONS)
  assert not unknown, (f"not a primitive of jax {jax.__version__}, nor listed with its versions: "
                       f"{unknown}")
  assert set(VERSIONS) <= names, sorted(set(VERSIONS) - names)


def test_every_unfollowed_primitive_has_a_reason():
  for name, reason in infer._UNFOLLOWED.items():
    assert len(reason) > 20 and "\n" not in reason, name


W = jnp.ones((6, 4))
X = jax.ShapeDtypeStruct((2, 6), jnp.float32)


def test_a_parameter_reaching_an_unfollowed_primitive_raises_with_the_reason():
  with pytest.raises(ValueError, match=r"fft \(a Fourier transform: every entry along the "
                     r"transformed axes is mixed\): cannot be followed"):
    optax_gc.infer_output_axes(lambda w, x: x @ jnp.fft.fft(w).real, W, X)
  with pytest.raises(ValueError, match=r"cholesky \(a matrix decomposition"):
    optax_gc.infer_output_axes(lambda w, x: x @ jnp.linalg.cholesky(w @ w.T)[:, :4], W, X)


def test_effects_names_and_small_rules():
  def fn(w, x):
    jax.debug.print("{}", w.sum())  # a side effect: not a use
    w = checkpoint_name(w, "kernel")  # a name: the same value
    return x @ (w + jnp.zeros_like(w))

  assert optax_gc.infer_output_axes(fn, W, X) == (1,)


@pytest.mark.skipif(not hasattr(jax.lax, "split"), reason="lax.split needs jax >= 0.4.36")
def test_split_pieces_keep_their_axes():
  def fn(w, x):
    a, b = jax.lax.split(w, (2, 2), axis=1)
    return jnp.concatenate([x @ a, x @ b], -1)

  assert optax_gc.infer_output_axes(fn, W, X) == (1,)


@pytest.mark.skipif(not hasattr(jax.lax, "unstack"), reason="stack/unstack are jax >= 0.10")
def test_stack_and_unstack():
  # Stacking two kernels gives a new axis no parameter runs along; unstacking selects one.
  def fn(p, x):
    a, b = jax.lax.unstack(jnp.stack([p["a"], p["b"]]), axis=0)
    return x @ a + x @ b

  spec = optax_gc.infer_output_axes(fn, {"a": W, "b": W}, X)
  assert spec == {"a": (1,), "b": (1,)}
  assert optax_gc.infer_output_axes(lambda ws, x: x @ jax.lax.unstack(ws)[1],
                                    jnp.ones((3, 6, 4)), X) == (0, 2)
