"""Trains several GC arms with the same seeds, then plots and tabulates them.

    python -m examples.cifar.compare --config digits --arms none,gc,gcc --seeds 0,1,2

An arm is a GC mode, optionally with a location: ``none``, ``gc``, ``gcc``, ``gc:update``,
``gcc:update``. Every other setting comes from ``--config`` and the usual flags (see
``python -m examples.cifar.compare --help``), identical across arms. Outputs in ``--workdir``:

* ``<arm>/seed<k>/``: each run's workdir (metrics, checkpoints), so an interrupted comparison
  resumes where it stopped, and finished runs are not retrained;
* ``comparison.png``: train loss and test accuracy per epoch, mean over seeds with a min-max band;
* ``comparison.md``: mean ± std over seeds of the final and best test accuracy.
"""

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from examples.cifar.config import (
  GC_LOCATIONS,
  GC_MODES,
  Config,
  add_flags,
  config_from_flags,
  config_name,
)
from examples.cifar.input_pipeline import DataError
from examples.cifar.train import TrainingDivergedError, check_workdir, train_and_evaluate

__all__ = ["parse_arm", "run_arms", "plot", "markdown_table", "main"]


def parse_arm(spec: str) -> dict[str, str]:
  """``"gc"`` -> ``{"gc": "gc"}``; ``"gc:update"`` also sets ``gc_location``."""
  mode, _, location = spec.partition(":")
  if mode not in GC_MODES or (location and location not in GC_LOCATIONS):
    raise ValueError(f"bad arm {spec!r}: use MODE[:LOCATION], MODE in {GC_MODES}, "
                     f"LOCATION in {GC_LOCATIONS}.")
  return {"gc": mode, **({"gc_location": location} if location else {})}


def run_arms(config: Config, arms: list[str], seeds: list[int],
             workdir: Path) -> dict[str, list[list[dict[str, Any]]]]:
  """Trains every (arm, seed); returns, per arm, one metrics history (list of epochs) per seed."""
  histories: dict[str, list[list[dict[str, Any]]]] = {}
  for arm in arms:
    histories[arm] = []
    for seed in seeds:
      run_dir = workdir / arm.replace(":", "_") / f"seed{seed}"
      if jax.process_index() == 0:
        print(f"=== arm {arm}, seed {seed} -> {run_dir}", flush=True)
      train_and_evaluate(dataclasses.replace(config, seed=seed, **parse_arm(arm)), run_dir)
      lines = (run_dir / "metrics.jsonl").read_text().splitlines()
      histories[arm].append([json.loads(line) for line in lines])
  return histories


def _curves(runs: list[list[dict[str, Any]]], key: str) -> np.ndarray:
  """``(seeds, epochs)`` array of ``key`` (runs cut to the shortest one)."""
  n = min(len(r) for r in runs)
  return np.array([[e[key] for e in r[:n]] for r in runs])


def plot(histories: dict[str, list[list[dict[str, Any]]]], path: Path, title: str) -> None:
  """Train loss and test accuracy per epoch for every arm: mean line, min-max band over seeds."""
  import matplotlib  # Imported late: only the plot needs it.

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for arm, runs in histories.items():
    for ax, key in zip(axes, ("train_loss", "test_accuracy"), strict=True):
      values = _curves(runs, key)
      epochs = np.arange(1, values.shape[1] + 1)
      line, = ax.plot(epochs, values.mean(0), label=f"{arm} ({len(runs)} seeds)")
      ax.fill_between(epochs, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
  axes[0].set(xlabel="epoch", ylabel="train loss", yscale="log", title="train loss")
  axes[1].set(xlabel="epoch", ylabel="test accuracy", title="test accuracy")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _mean_std(values: list[float]) -> str:
  std = statistics.stdev(values) if len(values) > 1 else 0.0
  return f"{100 * statistics.mean(values):.2f} ± {100 * std:.2f}"


def markdown_table(histories: dict[str, list[list[dict[str, Any]]]], title: str) -> str:
  """Mean ± std (over seeds, in %) of final and best test accuracy, and time per run."""
  rows = [f"### {title}", "",
          "| arm | seeds | final test acc. (%) | best test acc. (%) | final train loss | s/run |",
          "| --- | ---: | ---: | ---: | ---: | ---: |"]
  for arm, runs in histories.items():
    final = [r[-1]["test_accuracy"] for r in runs]
    best = [max(e["test_accuracy"] for e in r) for r in runs]
    loss = statistics.mean(r[-1]["train_loss"] for r in runs)
    seconds = statistics.mean(sum(e["seconds"] for e in r) for r in runs)
    rows.append(f"| {arm} | {len(runs)} | {_mean_std(final)} | {_mean_std(best)} | "
                f"{loss:.4f} | {seconds:.0f} |")
  return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
  """Parses flags, runs the arms, writes the plot and the table; returns the exit status."""
  parser = argparse.ArgumentParser(
      prog="python -m examples.cifar.compare",
      description="Train GC arms (e.g. none, gc, gcc) with the same seeds; plot and tabulate.")
  add_flags(parser, skip=("seed", "gc", "gc_location", "progress"))
  parser.add_argument("--arms", default="none,gc,gcc",
                      help="comma-separated MODE[:LOCATION], e.g. none,gc,gcc or none,gc,gc:update")
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
  parser.add_argument("--progress", action="store_true", help="show per-epoch progress bars")
  parser.add_argument("--workdir", help="output folder (default: workdirs/compare/"
                                        "<config>_<dataset>_<optimizer>)")
  args = parser.parse_args(argv)
  try:
    config = dataclasses.replace(config_from_flags(args), progress=args.progress)
    arms = [a for a in args.arms.split(",") if a]
    for arm in arms:
      parse_arm(arm)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    workdir = Path(args.workdir or Path("workdirs", "compare",
                                        f"{config_name(args)}_{config.dataset}_{config.optimizer}"))
    check_workdir(workdir.absolute())
    start = time.perf_counter()
    histories = run_arms(config, arms, seeds, workdir)
  except (DataError, TrainingDivergedError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if jax.process_index() != 0:  # Several processes (--distributed): process 0 writes.
    return 0
  subset = f", {config.train_subset} train images" if config.train_subset else ""
  title = (f"{config.dataset}{subset}, {config.model}, {config.optimizer} lr "
           f"{config.learning_rate:g}, {config.epochs} epochs, batch {config.batch_size}")
  plot(histories, workdir / "comparison.png", title)
  table = markdown_table(histories, title)
  (workdir / "comparison.md").write_text(table)
  print(f"\n{table}\nwrote {workdir / 'comparison.png'} and {workdir / 'comparison.md'} "
        f"in {time.perf_counter() - start:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
