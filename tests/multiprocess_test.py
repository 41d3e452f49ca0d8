"""optax_gc under several processes: two JAX processes, the fan-in axis split between them.

Each process starts ``jax.distributed`` on 127.0.0.1 with one CPU device (collectives over gloo,
JAX's default on CPU). Every kernel below has its reduced (fan-in) axis sharded across the two
processes, as FSDP shards parameters, so GC's mean needs a cross-process reduction. Each process
also computes the single-process result on the same global arrays, on its own device alone; the
sharded result must equal it and keep the input's sharding.
"""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("gloo_can_listen")  # conftest.py, at the root

_REPO_ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent(
    """
    import inspect, os, sys
    import jax
    jax.config.update("jax_disable_most_optimizations", True)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # JAX 0.4.x: not the default
    timeouts = dict(initialization_timeout=60, heartbeat_timeout_seconds=30,
                    shutdown_timeout_seconds=30)  # JAX 0.4.x takes only the first
    known = inspect.signature(jax.distributed.initialize).parameters
    jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]),
                               **{k: v for k, v in timeouts.items() if k in known})
    import numpy as np, optax
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import optax_gc

    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 2, 1)
    mesh = Mesh(np.array(jax.devices()), ("x",))
    rng = np.random.default_rng(0)  # The same global arrays in both processes.

    def tree(shift):
      return {
          "dense": rng.normal(shift, 1, (64, 16)).astype(np.float32),  # (in, out)
          "conv": rng.normal(shift, 1, (3, 3, 16, 8)).astype(np.float32),  # (kh, kw, in, out)
          "wide": rng.normal(shift, 1, (32, 10)).astype(np.float32),  # out not divisible by 2
          "bias": rng.normal(shift, 1, (16,)).astype(np.float32),  # passes through
      }

    specs = {"dense": P("x", None), "conv": P(None, None, "x", None), "wide": P("x", None),
             "bias": P()}  # Every kernel's fan-in axis (in) is split between the processes.
    shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
    params, grads = tree(0.5), tree(1.0)

    def global_(t):
      return {k: jax.make_array_from_callback(a.shape, shardings[k], lambda i, a=a: a[i])
              for k, a in t.items()}

    sharded_params, sharded_grads = global_(params), global_(grads)
    assert not sharded_grads["dense"].is_fully_addressable  # Truly split across processes.

    txs = {
        "centralize": optax_gc.centralize(),
        "gc_sgd": optax_gc.gc_sgd(0.1, momentum=0.9, weight_decay=1e-3),
        "gc_sgd_conv_only": optax_gc.gc_sgd(0.1, momentum=0.9, conv_only=True),
        "gc_adam": optax_gc.gc_adam(1e-2, weight_decay=1e-3),
        "gc_adamw_update": optax_gc.gc_adamw(1e-2, centralize_update=True),
    }
    failures = []
    for name, tx in txs.items():
      # Two steps, so momentum / Adam moments carry sharded state through.
      state = jax.jit(tx.init)(sharded_params)
      local_state = jax.jit(tx.init)(params)  # One process, one device, the same values.
      for step in range(2):
        updates, state = jax.jit(tx.update)(sharded_grads, state, sharded_params)
        expected, local_state = jax.jit(tx.update)(grads, local_state, params)
        full = multihost_utils.process_allgather(updates, tiled=True)
        for k in params:
          if not np.allclose(full[k], expected[k], rtol=1e-5, atol=1e-6):
            err = np.max(np.abs(full[k] - np.asarray(expected[k])))
            failures.append(f"{name} step {step} {k}: max |error| {err:.3g}")
          if not updates[k].sharding.is_equivalent_to(shardings[k], params[k].ndim):
            failures.append(f"{name} {k}: sharding {updates[k].sharding}, input {shardings[k]}")
        if name == "centralize":  # GC really acted on the split kernels.
          for k in ("dense", "conv", "wide"):
            fan_in_mean = full[k].mean(axis=tuple(range(params[k].ndim - 1)))
            if not (np.abs(fan_in_mean).max() < 1e-5 and np.abs(full[k] - grads[k]).max() > 0.1):
              failures.append(f"centralize {k}: not centralized")
    print("\\n".join(failures) or "MULTIPROCESS-OK", flush=True)
    sys.stderr.flush()
    os._exit(1 if failures else 0)  # Both processes agree; skip the shutdown barrier's wait.
    """
)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_gc_and_aliases_over_two_processes_with_the_fan_in_axis_split_between_them() -> None:
  address = f"127.0.0.1:{_free_port()}"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(_REPO_ROOT)}
  env.pop("XLA_FLAGS", None)  # One CPU device per process.
  procs = [subprocess.Popen([sys.executable, "-c", _SCRIPT, address, str(i)], env=env,
                            cwd=_REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=180)[0] for p in procs]
  finally:
    for p in procs:  # On a timeout or any error: never leave a process behind.
      if p.poll() is None:
        p.kill()
        p.wait()
  for i, (p, out) in enumerate(zip(procs, outputs, strict=True)):
    assert p.returncode == 0 and "MULTIPROCESS-OK" in out, f"process {i}:\n{out[-3000:]}"
