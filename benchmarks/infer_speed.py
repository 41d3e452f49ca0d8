"""How long does reading the output axes (or the layout) from a model take? Trace-only.

Commands::

  python -m benchmarks.infer_speed                  # GPT-2 small and ResNet-50 (CPU: ~1 min)
  python -m benchmarks.infer_speed --json docs/bench/infer_speed_cpu.json

Both models are built with ``nnx.eval_shape``, so no weight is allocated, and their inputs are
``jax.ShapeDtypeStruct``\\ s: ``optax_gc.nnx_output_axes`` and ``optax_gc.nnx_layout`` only
trace (``jax.make_jaxpr``) and walk the jaxpr; each is timed. Timed: the wall time of one
call, ``--repeats`` times in one process; the first
call is reported apart (it pays JAX's one-off tracing caches). Target: <= 2 s per model on
2 CPU cores.

- ``gpt2_small``: a GPT-2-small-shaped Flax NNX decoder (12 layers, d_model 768, 12 heads, MLP
  3072, vocabulary 50257, 1024 positions), batch 1 x sequence 128, with the token embedding tied
  to the logits. The tied table is a conflict (lookup and logits), so the call gives it an
  override, as a user would.
- ``resnet50``: the example's CIFAR ResNet-50 (``examples.cifar.models``), a 32x32 batch of 1,
  ``train=True``.
"""

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import optax_gc
from benchmarks import _bench

__all__ = ["GPT2", "MODELS", "time_inference", "main"]

TARGET_S = 2.0


class _Block(nnx.Module):
  """A GPT-2 block: pre-LayerNorm causal attention and a GELU MLP."""

  def __init__(self, d: int, heads: int, hidden: int, *, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(d, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d, rngs=rngs)
    self.fc = nnx.Linear(d, hidden, rngs=rngs)
    self.proj = nnx.Linear(hidden, d, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    mask = nnx.make_causal_mask(jnp.ones(x.shape[:2]))
    x = x + self.attn(self.ln1(x), mask=mask)
    return x + self.proj(nnx.gelu(self.fc(self.ln2(x))))


class GPT2(nnx.Module):
  """A GPT-2-shaped decoder with tied input and output embeddings."""

  def __init__(self, vocab: int = 50257, positions: int = 1024, d: int = 768, heads: int = 12,
               hidden: int = 3072, layers: int = 12, *, rngs: nnx.Rngs):
    self.wte = nnx.Embed(vocab, d, rngs=rngs)
    self.wpe = nnx.Embed(positions, d, rngs=rngs)
    self.blocks = nnx.List([_Block(d, heads, hidden, rngs=rngs) for _ in range(layers)])
    self.ln_f = nnx.LayerNorm(d, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.wte(tokens) + self.wpe(jnp.arange(tokens.shape[1]))
    for block in self.blocks:
      x = block(x)
    return self.wte.attend(self.ln_f(x))


def _gpt2() -> tuple[nnx.Module, tuple[Any, ...], dict[str, Any]]:
  model = nnx.eval_shape(lambda: GPT2(rngs=nnx.Rngs(0)))
  tokens = jax.ShapeDtypeStruct((1, 128), jnp.int32)
  return model, (tokens,), {"overrides": {"wte/embedding": None}}


def _resnet50() -> tuple[nnx.Module, tuple[Any, ...], dict[str, Any]]:
  from examples.cifar import models

  model = nnx.eval_shape(lambda: models.create_model("resnet50", 10, 0))
  images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  return model, (images,), {"train": True}


MODELS: dict[str, Callable[[], tuple[nnx.Module, tuple[Any, ...], dict[str, Any]]]] = {
    "gpt2_small": _gpt2,
    "resnet50": _resnet50,
}


INFERENCES = {"output_axes": optax_gc.nnx_output_axes, "layout": optax_gc.nnx_layout}


def time_inference(name: str, repeats: int, what: str = "output_axes") -> dict[str, Any]:
  """Times ``nnx_output_axes`` (or ``nnx_layout``) on the named abstract model; returns a row."""
  model, args, kwargs = MODELS[name]()
  times, spec = [], None
  for _ in range(repeats + 1):
    start = time.perf_counter()
    spec = INFERENCES[what](model, *args, **kwargs)
    times.append(time.perf_counter() - start)
  leaves = jax.tree.leaves(spec, is_leaf=lambda x: x is None or isinstance(x, tuple))
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  return {
      "model": name,
      "inference": what,
      "parameters": int(sum(p.size for p in params)),
      "leaves": len(leaves),
      "centralized_leaves": sum(x is not None for x in leaves),
      "first_s": times[0],
      "median_s": statistics.median(times[1:]),
      "max_s": max(times[1:]),
      "repeats": repeats,
      "target_s": TARGET_S,
      "met": max(times) <= TARGET_S,
  }


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--models", default=",".join(MODELS))
  p.add_argument("--inferences", default=",".join(INFERENCES))
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--json", default=None, help="write the results here")
  a = p.parse_args(argv)
  rows = [time_inference(m, a.repeats, what) for m in a.models.split(",") if m
          for what in a.inferences.split(",") if what]
  cols = ["model", "inference", "parameters", "leaves", "centralized_leaves", "first_s",
          "median_s", "max_s", "met"]
  _bench.print_table(cols, [[f"{r[c]:.3f}" if c.endswith("_s") else r[c] for c in cols]
                            for r in rows])
  payload = {"machine": _bench.machine(), "rows": rows}
  if a.json:
    _bench.write_json(a.json, payload)
  return payload


if __name__ == "__main__":
  main()
