"""The README's Python examples run as written, and print what the README says they print."""

import contextlib
import io
import os
import re
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gc

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(text: str) -> list[tuple[str, str, str]]:
  """``(language, code, the last text line before the fence)`` for every fenced block."""
  blocks, lines, i, before = [], text.splitlines(), 0, ""
  while i < len(lines):
    line = lines[i]
    if line.startswith("```"):
      end = lines.index("```", i + 1)
      blocks.append((line[3:].strip(), "\n".join(lines[i + 1:end]) + "\n", before))
      i = end
    elif line.strip():
      before = line
    i += 1
  return blocks


def _normalize(text: str) -> str:
  return "\n".join(re.sub(r" \(at .*\)$", " (at ...)", line.rstrip())
                   for line in text.strip().splitlines())


def test_the_first_example_needs_only_jax_and_optax():
  lang, code, _ = _blocks(README.read_text())[0]
  assert lang == "python" and "flax" not in code
  namespace: dict = {}
  exec(compile(code, "README.md block 0", "exec"), namespace)  # noqa: S102
  assert namespace["spec"] == {"q": (1, 2), "q_bias": None, "out": (2,)}


def test_readme_python_blocks_run_and_print_what_they_say():
  nnx = pytest.importorskip("flax.nnx", reason="the README's other examples use Flax NNX")
  os.environ.setdefault("KERAS_BACKEND", "jax")
  blocks = _blocks(README.read_text())
  namespace: dict = {}
  ran = checked = 0
  for i, (lang, code, _) in enumerate(blocks):
    if lang != "python" or code.lstrip().startswith("from examples"):
      continue
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      exec(compile(code, f"README.md block {i}", "exec"), namespace)  # noqa: S102
    ran += 1
    after = blocks[i + 1] if i + 1 < len(blocks) else None
    if after and after[0] == "text" and after[2].startswith("prints"):
      assert _normalize(out.getvalue()) == _normalize(after[1]), f"README block {i}"
      checked += 1
  assert ran >= 4 and checked >= 2, (ran, checked)
  # The hand-written `axes` gives the same updates as inference on the README's Block.
  model, axes = namespace["model"], namespace["axes"]
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  grads = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype).reshape(p.shape)),
                       params)
  inferred = optax_gc.nnx_output_axes(model, jnp.ones((8, 16, 32)))
  by_hand = optax_gc.centralize(axes).update(grads, optax.EmptyState(), params)[0]
  by_inference = optax_gc.centralize(inferred).update(grads, optax.EmptyState(), params)[0]
  chex.assert_trees_all_close(by_hand, by_inference, atol=1e-6)
  assert not np.allclose(by_hand["attn"]["query"]["kernel"], grads["attn"]["query"]["kernel"])

  # The same callable gives the same spec on an nnx.split State (whose paths end in a
  # Variable's `value`), on its pure arrays, and inside nnx.Optimizer's init and update.
  def leaves(spec):
    return jax.tree.leaves(spec, is_leaf=lambda x: x is None or isinstance(x, (int, tuple)))

  _, state = nnx.split(model, nnx.Param)
  want = leaves(axes(params))
  assert want.count((1, 2)) == 3 and leaves(axes(state)) == want
  seen = []
  spy = lambda p: seen.append(leaves(axes(p))) or axes(p)  # noqa: E731
  grads_state = jax.tree.map(lambda v, g: v.replace(g), state, grads,
                             is_leaf=lambda x: isinstance(x, nnx.Variable))
  optimizer = nnx.Optimizer(model, optax_gc.centralize(spy), wrt=nnx.Param)
  optimizer.update(model, grads_state)
  assert len(seen) >= 2 and all(s == want for s in seen), seen
  on_state = optax_gc.centralize(axes).update(grads_state, optax.EmptyState(), state)[0]
  chex.assert_trees_all_close(nnx.as_pure(on_state), by_inference, atol=1e-6)
