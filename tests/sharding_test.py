"""optax_gc.centralize on arrays sharded over 8 fake CPU devices.

JAX fixes the device count when its backend starts, so the check runs in a
fresh interpreter with ``--xla_force_host_platform_device_count=8``.
"""

import os
import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import optax_gc

    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("x", "y"))
    tx = optax_gc.gc_sgd(0.1, momentum=0.9)
    gc = optax_gc.centralize()
    k = jax.random.split(jax.random.key(0), 3)
    tree = {
        # Dense (in, out): the reduced axis `in` is sharded 8 ways.
        "dense": jax.random.normal(k[0], (64, 16)) + 1.0,
        # Conv (kh, kw, in, out): the reduced axis `in` sharded, `out` too.
        "conv": jax.random.normal(k[1], (3, 3, 16, 8)) + 1.0,
        # Both axes sharded on a 2-D mesh.
        "both": jax.random.normal(k[2], (32, 8)) + 1.0,
    }
    specs = {
        "dense": P(("x", "y"), None),
        "conv": P(None, None, "x", "y"),
        "both": P("x", "y"),
    }
    shardings = {n: NamedSharding(mesh, s) for n, s in specs.items()}
    sharded = jax.device_put(tree, shardings)
    expected = jax.jit(lambda g: gc.update(g, optax.EmptyState())[0])(tree)
    got = jax.jit(lambda g: gc.update(g, optax.EmptyState())[0])(sharded)
    for n in tree:
        np.testing.assert_allclose(got[n], expected[n], rtol=1e-5, atol=1e-5)
        assert got[n].sharding.is_equivalent_to(sharded[n].sharding, tree[n].ndim), (
            n, got[n].sharding, sharded[n].sharding)
        assert len(got[n].sharding.device_set) == 8, n
    # A whole optimizer step on sharded params and grads.
    state = tx.init(sharded)
    u_sharded, _ = jax.jit(tx.update)(sharded, state, sharded)
    u_plain, _ = jax.jit(tx.update)(tree, tx.init(tree), tree)
    for n in tree:
        np.testing.assert_allclose(u_sharded[n], u_plain[n], rtol=1e-5, atol=1e-6)
        assert u_sharded[n].sharding.is_equivalent_to(sharded[n].sharding, tree[n].ndim), n
    print("SHARDING-OK")
    """
)


def test_sharded_reduced_axis_equals_unsharded():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "SHARDING-OK" in proc.stdout
