"""Shared timing helpers: interleaved A/B rounds, medians of ratios, machine description."""

import json
import os
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax

__all__ = ["machine", "interleaved", "ratio_stats", "print_table", "write_json"]


def machine() -> dict[str, Any]:
  """What ran the benchmark: CPU model, core count, accelerator, jax version."""
  cpu = platform.processor() or platform.machine()
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
      if line.startswith("Model name:"):
        cpu = line.split(":", 1)[1].strip()
  except OSError:
    pass
  dev = jax.devices()[0]
  return {
      "backend": jax.default_backend(),
      "device": getattr(dev, "device_kind", str(dev)),
      "cpu": cpu,
      "cpu_cores": os.cpu_count(),
      "jax": jax.__version__,
      "python": platform.python_version(),
      "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
  }


def _block(x: Any) -> None:
  jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


def interleaved(
    runners: Mapping[str, Callable[[], Any]],
    *,
    rounds: int,
    iters: int,
    seed: int = 0,
) -> dict[str, list[float]]:
  """Times every runner ``iters`` calls per round, in a fresh random order each round.

  Each runner must be warmed up (compiled) already. Returns, per name, one time per round:
  the median seconds per call within that round. Interleaving means slow phases of a
  shared machine hit every variant alike, so the per-round ratios stay meaningful.
  """
  rng = random.Random(seed)
  names = list(runners)
  out: dict[str, list[float]] = {n: [] for n in names}
  for _ in range(rounds):
    rng.shuffle(names)
    for n in names:
      f = runners[n]
      times = []
      for _ in range(iters):
        t0 = time.perf_counter()
        _block(f())
        times.append(time.perf_counter() - t0)
      out[n].append(statistics.median(times))
  return out


def ratio_stats(num: list[float], den: list[float]) -> dict[str, float]:
  """Median and quartiles of the per-round ratios ``num[i] / den[i]``."""
  r = sorted(a / b for a, b in zip(num, den, strict=True))
  q = statistics.quantiles(r, n=4) if len(r) >= 2 else [r[0], r[0], r[0]]
  return {"median": statistics.median(r), "q1": q[0], "q3": q[2], "n_rounds": len(r)}


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
  """Prints a Markdown table (so it can be pasted into docs as is)."""
  cells = [[str(c) for c in row] for row in rows]
  widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
  line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
  print(line(headers))
  print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
  for r in cells:
    print(line(r))


def write_json(path: str | None, payload: dict[str, Any]) -> None:
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      json.dump(payload, f, indent=1, sort_keys=True)
    print(f"wrote {path}")
