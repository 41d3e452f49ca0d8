"""Evidence study: does Gradient Centralization help a CIFAR ResNet on real CIFAR-10?

Commands::

  python -m benchmarks.study                 # run what is missing, then write docs/results.md
  python -m benchmarks.study --report-only   # rewrite docs/results.md from docs/study/*.json
  nohup python -m benchmarks.study > workdirs/study.log 2>&1 &   # in the background

The protocol (:data:`PROTOCOL`) is fixed here and identical for every arm; an arm only
changes the optimizer and the GC setting, and every arm runs the same seeds (same
initialization, data order and augmentation for a given seed). Arms (:data:`ARMS`):

- SGD, momentum 0.9, coupled weight decay 5e-4, lr 0.1: ``none`` vs ``gc`` vs ``gcc``;
- Adam, lr 1e-3, coupled weight decay 5e-4: ``none`` vs ``gc``;
- AdamW, lr 1e-3, decoupled weight decay 5e-4: ``none`` vs ``gc`` on the final update.

Runs go seed by seed (all arms of seed 0, then seed 1, ...), so a study cut short still has
complete pairs. Each finished run is saved as ``docs/study/<arm>__seed<k>.json`` (its config,
per-epoch metrics and summary); a later invocation skips runs whose file exists, so the study
resumes on another machine from the committed files. The report is rebuilt from those files
alone. Data: the JPEG-decoded copy of CIFAR-10 in ``../shared/data/cifar10`` (not the official
pixels; see its README).
"""

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["ARMS", "PAIRS", "PROTOCOL", "run_study", "write_report", "main"]

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10"

# The protocol shared by every arm, sized so one run takes about 2-4 minutes on a 2-core CPU
# shared with other jobs. Measured first: one epoch of ResNet-20 on 10,000 images plus the
# full test set took 91 s under load (122 img/s), so 21 runs had to shrink to 4 epochs of 5,000.
PROTOCOL: dict[str, Any] = {
    "dataset": "cifar10",
    "model": "resnet20",
    "train_subset": 5_000,  # stratified, the same subset for every seed and arm
    "epochs": 4,
    "batch_size": 128,
    "schedule": "cosine",
    "warmup_epochs": 0.0,
}

# arm name -> the config fields it sets (nothing else differs between arms).
ARMS: dict[str, dict[str, Any]] = {
    "sgd": {"optimizer": "sgd", "gc": "none"},
    "sgd_gc": {"optimizer": "sgd", "gc": "gc"},
    "sgd_gcc": {"optimizer": "sgd", "gc": "gcc"},
    "adam": {"optimizer": "adam", "gc": "none"},
    "adam_gc": {"optimizer": "adam", "gc": "gc"},
    "adamw": {"optimizer": "adamw", "gc": "none"},
    "adamw_gc_update": {"optimizer": "adamw", "gc": "gc", "gc_location": "update"},
    # GC with the axis a Flax user gets from Optax today: optax.centralize() keeps axis 0 (the
    # PyTorch rule), so on a (kh, kw, in, out) kernel it averages across output channels.
    "sgd_gc_optax": {"optimizer": "sgd", "gc": "gc", "gc_axes": "optax"},
}

# The seeds planned before any result was seen. Seeds beyond these may be added, to every arm
# alike, when the compute budget allows; the report then shows both analyses.
PLANNED_SEEDS = (0, 1, 2)

# (treatment, baseline) pairs compared seed by seed.
PAIRS: list[tuple[str, str]] = [
    ("sgd_gc", "sgd"),
    ("sgd_gcc", "sgd"),
    ("sgd_gc", "sgd_gcc"),  # GC minus GCC: the effect of centralizing the dense head alone
    ("adam_gc", "adam"),
    ("adamw_gc_update", "adamw"),
    ("sgd_gc_optax", "sgd_gc"),
    ("sgd_gc_optax", "sgd"),
]

ARM_LABELS = {
    "sgd": "SGD-M", "sgd_gc": "SGD-M + GC", "sgd_gcc": "SGD-M + GCC",
    "adam": "Adam", "adam_gc": "Adam + GC",
    "adamw": "AdamW", "adamw_gc_update": "AdamW + GC (update)",
    "sgd_gc_optax": "SGD-M + optax.centralize()",
}


# ----------------------------------------------------------------------------------------------
# Running.


def run_file(out_dir: Path, arm: str, seed: int) -> Path:
  return out_dir / "study" / f"{arm}__seed{seed}.json"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def run_one(
    arm: str, seed: int, protocol: dict[str, Any], data_dir: str | None, workdir: Path
) -> dict[str, Any]:
  """Trains one (arm, seed) with the example's ``train_and_evaluate``; returns the run record."""
  from examples.cifar import train
  from examples.cifar.config import Config

  fields = {**protocol, **ARMS[arm], "seed": seed, "data_dir": data_dir}
  # Bookkeeping only (no effect on the trajectory), set where the example has the field.
  quiet = {"progress": False, "gc_log_every_epochs": 10_000, "checkpoints_to_keep": 1}
  known = {f.name for f in dataclasses.fields(Config)}
  fields.update({k: v for k, v in quiet.items() if k in known})
  config = dataclasses.replace(Config(), **fields).resolved()
  if workdir.exists():  # a half-finished run from an interrupted session: start it again
    shutil.rmtree(workdir)
  t0 = time.time()
  train.train_and_evaluate(config, str(workdir))
  wall = time.time() - t0
  summary_path = workdir / "summary.json"
  summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
  diag_path = workdir / "gc_diagnostics.jsonl"
  return {
      "arm": arm,
      "seed": seed,
      "protocol": protocol,
      "config": config.to_dict(),
      "epochs": _read_jsonl(workdir / "metrics.jsonl"),
      "summary": summary,
      # Per kernel, the share of the gradient's norm that GC removes (or would remove), epoch 1.
      "gc_diagnostics": _read_jsonl(diag_path) if diag_path.exists() else [],
      "code": _code_version(),
      "wall_s": wall,
      "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                  "python": platform.python_version()},
  }


def _code_version() -> dict[str, Any]:
  """The git commit, and whether the library or the example had uncommitted changes."""
  import subprocess

  def git(*args: str) -> str:
    r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return r.stdout.strip()

  return {"commit": git("rev-parse", "HEAD"),
          "dirty": bool(git("status", "--porcelain", "--", "optax_gc", "examples/cifar"))}


def planned_runs(arms: list[str], seeds: list[int]) -> list[tuple[str, int]]:
  """Seed-major order: every arm of seed 0 first, so a partial study still pairs up."""
  return [(arm, seed) for seed in seeds for arm in arms]


def run_study(
    arms: list[str], seeds: list[int], protocol: dict[str, Any], data_dir: str | None,
    out_dir: Path, workdir: Path, *, max_runs: int | None = None,
) -> list[Path]:
  """Runs every (arm, seed) without a result file under ``out_dir/study``; returns new files."""
  done = []
  for arm, seed in planned_runs(arms, seeds):
    path = run_file(out_dir, arm, seed)
    if path.exists():
      continue
    if max_runs is not None and len(done) >= max_runs:
      break
    print(f"[study] {time.strftime('%H:%M:%S')} running {arm} seed {seed}", flush=True)
    record = run_one(arm, seed, protocol, data_dir, workdir / f"{arm}__seed{seed}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    tmp.replace(path)
    last = record["epochs"][-1] if record["epochs"] else {}
    print(f"[study] {time.strftime('%H:%M:%S')} done {arm} seed {seed} in "
          f"{record['wall_s']:.0f} s: {json.dumps(last, sort_keys=True)}", flush=True)
    done.append(path)
  return done


# ----------------------------------------------------------------------------------------------
# Reporting (from the JSON files alone).


def _get(row: dict[str, Any], *names: str) -> float | None:
  for n in names:
    if n in row and row[n] is not None:
      return float(row[n])
  return None


def test_acc(row: dict[str, Any]) -> float | None:
  return _get(row, "test_accuracy", "test/accuracy", "eval_accuracy", "accuracy")


def train_loss(row: dict[str, Any]) -> float | None:
  return _get(row, "train_loss", "train/loss", "loss")


def load_runs(out_dir: Path) -> dict[str, dict[int, dict[str, Any]]]:
  """``{arm: {seed: record}}`` from ``out_dir/study/*.json``."""
  runs: dict[str, dict[int, dict[str, Any]]] = {}
  for path in sorted((out_dir / "study").glob("*__seed*.json")):
    rec = json.loads(path.read_text())
    runs.setdefault(rec["arm"], {})[int(rec["seed"])] = rec
  return runs


def t_interval(xs: list[float], level: float = 0.95) -> tuple[float, float, float]:
  """Mean and the two-sided Student-t interval for the mean of ``xs`` (NaN if n < 2)."""
  mean = statistics.fmean(xs)
  if len(xs) < 2:
    return mean, math.nan, math.nan
  from scipy import stats

  half = stats.t.ppf(0.5 + level / 2, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
  return mean, mean - half, mean + half


def _ms(xs: list[float], scale: float = 100.0, digits: int = 2) -> str:
  """``mean ± std`` (sample std), scaled (accuracies to %)."""
  xs = [scale * x for x in xs]
  if not xs:
    return "–"
  if len(xs) == 1:
    return f"{xs[0]:.{digits}f} (n=1)"
  return f"{statistics.fmean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def summarize(runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
  """Per-arm statistics and per-pair paired differences, as plain data."""
  arms = {}
  for arm in ARMS:
    if arm not in runs:
      continue
    recs = runs[arm]
    finals = {s: test_acc(r["epochs"][-1]) for s, r in recs.items()}
    bests = {s: max(test_acc(e) for e in r["epochs"]) for s, r in recs.items()}
    final_loss = {s: train_loss(r["epochs"][-1]) for s, r in recs.items()}
    n_ep = min(len(r["epochs"]) for r in recs.values())
    loss_at = {}
    for ep in sorted({1, max(1, n_ep // 2), n_ep}):
      loss_at[ep] = {s: train_loss(r["epochs"][ep - 1]) for s, r in recs.items()}
    arms[arm] = {"seeds": sorted(recs), "final": finals, "best": bests, "loss_at": loss_at,
                 "final_loss": final_loss,
                 "wall_s": {s: r.get("wall_s") for s, r in recs.items()}}
  pairs = _pairs(arms, None)
  planned = _pairs(arms, set(PLANNED_SEEDS))
  proto = next((r["protocol"] for recs in runs.values() for r in recs.values()), PROTOCOL)
  return {"arms": arms, "pairs": pairs,
          "pairs_planned": planned if planned != pairs else None,
          "train_subset": proto.get("train_subset"), "epochs": proto.get("epochs")}


def _pairs(arms: dict[str, Any], only: set[int] | None) -> list[dict[str, Any]]:
  """Paired differences over the seeds both arms have (restricted to ``only`` if given)."""
  pairs = []
  for treat, base in PAIRS:
    if treat not in arms or base not in arms:
      continue
    seeds = sorted(set(arms[treat]["seeds"]) & set(arms[base]["seeds"]))
    if only is not None:
      seeds = [x for x in seeds if x in only]
    if not seeds:
      continue
    entry = {"treatment": treat, "baseline": base, "seeds": seeds}
    for what in ("final", "best", "final_loss"):
      d = [arms[treat][what][x] - arms[base][what][x] for x in seeds]
      mean, lo, hi = t_interval(d)
      entry[what] = {"per_seed": d, "mean": mean, "ci95": [lo, hi]}
    pairs.append(entry)
  return pairs


def plot_curves(runs: dict[str, dict[int, dict[str, Any]]], path: Path) -> None:
  """Training loss and test accuracy per epoch: mean over seeds (line) and min-max (band)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker
  import numpy as np

  groups = [("SGD momentum", ["sgd", "sgd_gc", "sgd_gcc", "sgd_gc_optax"]), ("Adam", ["adam", "adam_gc"]),
            ("AdamW", ["adamw", "adamw_gc_update"])]
  fig, axes = plt.subplots(2, 3, figsize=(13, 7), sharex=True)
  for col, (title, arms) in enumerate(groups):
    for arm in arms:
      if arm not in runs:
        continue
      recs = list(runs[arm].values())
      n = min(len(r["epochs"]) for r in recs)
      ep = np.arange(1, n + 1)
      for row, (fn, scale) in enumerate(((train_loss, 1.0), (test_acc, 100.0))):
        y = np.array([[scale * fn(r["epochs"][i]) for i in range(n)] for r in recs])
        ax = axes[row, col]
        (line,) = ax.plot(ep, y.mean(0), marker="o", ms=3,
                          label=f"{ARM_LABELS[arm]} (n={len(recs)})")
        if len(recs) > 1:
          ax.fill_between(ep, y.min(0), y.max(0), alpha=0.2, color=line.get_color())
    axes[0, col].set_title(title)
    axes[0, col].set_ylabel("training loss")
    axes[1, col].set_ylabel("test accuracy (%)")
    axes[1, col].set_xlabel("epoch")
    axes[1, col].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    for ax in axes[:, col]:
      if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
  fig.suptitle("CIFAR-10 (JPEG-decoded copy): mean over seeds, band = min-max", fontsize=11)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _protocol_line(runs: dict[str, dict[int, dict[str, Any]]]) -> tuple[dict[str, Any], list[str]]:
  """The protocol shared by the runs, and a list of inconsistencies (should be empty)."""
  protos = {json.dumps(r["protocol"], sort_keys=True) for recs in runs.values()
            for r in recs.values()}
  problems = [] if len(protos) <= 1 else [f"runs disagree on the protocol: {sorted(protos)}"]
  proto = json.loads(sorted(protos)[0]) if protos else dict(PROTOCOL)
  return proto, problems


def write_report(out_dir: Path, *, title_note: str = "") -> Path:
  """Writes ``out_dir/results.md`` and ``out_dir/study_curves.png`` from ``out_dir/study``."""
  runs = load_runs(out_dir)
  s = summarize(runs)
  proto, problems = _protocol_line(runs)
  plot = out_dir / "study_curves.png"
  if runs:
    plot_curves(runs, plot)
  any_rec = next((r for recs in runs.values() for r in recs.values()), None)
  cfg = any_rec["config"] if any_rec else {}
  n_done = sum(len(v) for v in runs.values())
  walls = [r["wall_s"] for recs in runs.values() for r in recs.values() if r.get("wall_s")]

  L = []
  L.append("# Evidence study: Gradient Centralization on CIFAR-10 (JPEG-decoded copy)\n")
  L.append("Generated by `python -m benchmarks.study --report-only` from the per-run files in "
           "`docs/study/`; do not edit by hand." + (f" {title_note}" if title_note else "") + "\n")
  L.append("**Data caveat.** All numbers here come from the *JPEG-decoded copy* of CIFAR-10 in "
           "`../shared/data/cifar10` (every image re-saved as a quality-75 JPEG, then decoded), "
           "not the official pixels. They are not comparable with published CIFAR-10 results.\n")
  L.append("## Protocol\n")
  L.append(f"- Model: `{proto.get('model')}` from the example's `examples/cifar/models.py` "
           "(`resnet20` is He et al.'s CIFAR ResNet-20: 0.27M parameters, BatchNorm).")
  L.append(f"- Training data: a stratified subset of **{proto.get('train_subset')}** of the 50,000 "
           "training images (the same subset for every run); evaluation on the **full 10,000-image "
           "test set** after every epoch.")
  L.append(f"- {proto.get('epochs')} epochs, batch {proto.get('batch_size')}, "
           f"{proto.get('schedule')} learning-rate decay to 0 over the run (no warm-up), random "
           "crop (pad 4) + horizontal flip. The budget (each run about 3-4 minutes on a shared "
           "2-core CPU) forced the short schedule; these are *short-budget* results, far from "
           "converged (a full ResNet-20 run is ~180 epochs on 50,000 images).")
  L.append("- Optimizers, at the example's defaults and identical within each pair: SGD momentum "
           "0.9, lr 0.1, coupled weight decay 5e-4; Adam lr 1e-3 (b1 0.9, b2 0.999), coupled "
           "weight decay 5e-4; AdamW lr 1e-3, decoupled weight decay 5e-4. GC = conv and dense "
           "kernels (`optax_gc.centralize()`, mean over all axes but the last); GCC = conv "
           "kernels only; AdamW+GC centralizes the final update (`gc_location=update`). "
           "Nothing was tuned, for any arm.")
  L.append("- Seeds: a seed fixes the initialization, the data order and the augmentation, and "
           "every arm runs the same seeds, so each difference below is paired.")
  if walls:
    L.append(f"- Runs done: {n_done}; wall time per run {min(walls):.0f}-{max(walls):.0f} s "
             f"(median {statistics.median(walls):.0f} s) on a shared 2-core AMD EPYC CPU.")
  if problems:
    L.append("\n**Warning:** " + "; ".join(problems))
  L.append("")

  L.append("## Test accuracy and training loss (mean ± sample std over seeds)\n")
  loss_eps = sorted({ep for a in s["arms"].values() for ep in a["loss_at"]})
  head = ["arm", "seeds", "final test acc (%)", "best test acc (%)"] + [
      f"train loss @ epoch {ep}" for ep in loss_eps]
  L.append("| " + " | ".join(head) + " |")
  L.append("|" + "|".join(["---"] * len(head)) + "|")
  for arm, a in s["arms"].items():
    cells = [ARM_LABELS[arm], ",".join(map(str, a["seeds"])), _ms(list(a["final"].values())),
             _ms(list(a["best"].values()))]
    for ep in loss_eps:
      vals = [v for v in a["loss_at"].get(ep, {}).values() if v is not None]
      cells.append(_ms(vals, scale=1.0, digits=4) if vals else "–")
    L.append("| " + " | ".join(cells) + " |")
  L.append("")

  L.append("## Paired differences, GC − baseline (percentage points of test accuracy)\n")
  L.append("Per seed, the treatment's accuracy minus the baseline's for that same seed; the mean "
           "and its 95% Student-t interval (n−1 degrees of freedom). An interval that contains 0 "
           "means the study cannot tell the arms apart. The last column is the same for the "
           "final epoch's mean training loss (negative: GC trains faster). GC and GCC differ "
           "only in the dense head (the one kernel of rank 2), so 'SGD-M + GC vs SGD-M + GCC' "
           "is the effect of centralizing the head's gradient alone.\n")
  L.append("| comparison | seeds | per-seed Δ final | mean Δ final [95% CI] | per-seed Δ best "
           "| mean Δ best [95% CI] | mean Δ final train loss [95% CI] |")
  L.append("|---|---|---|---|---|---|---|")

  def fmt_ci(d: dict[str, Any], scale: float = 100.0, digits: int = 2) -> str:
    lo, hi = d["ci95"]
    f = f"+.{digits}f"
    ci = "n/a (n=1)" if math.isnan(lo) else f"[{scale * lo:{f}}, {scale * hi:{f}}]"
    return f"{scale * d['mean']:{f}} {ci}"

  rows = list(s["pairs"])
  if s["pairs_planned"]:
    rows = [*s["pairs_planned"], *s["pairs"]]
    L.insert(len(L) - 2, "The first rows use only the planned seeds "
             f"{', '.join(map(str, PLANNED_SEEDS))}; the last rows use every seed run (extra "
             "seeds were added to all arms alike because compute time allowed).\n")
  for p in rows:
    L.append(
        f"| {ARM_LABELS[p['treatment']]} vs {ARM_LABELS[p['baseline']]} | "
        f"{','.join(map(str, p['seeds']))} | "
        f"{', '.join(f'{100 * x:+.2f}' for x in p['final']['per_seed'])} | {fmt_ci(p['final'])} | "
        f"{', '.join(f'{100 * x:+.2f}' for x in p['best']['per_seed'])} | {fmt_ci(p['best'])} | "
        f"{fmt_ci(p['final_loss'], 1.0, 4)} |")
  L.append("")
  if runs:
    L.append("## Curves\n")
    L.append("![training loss and test accuracy per epoch](study_curves.png)\n")

  L.append("## Verdict, and the paper's claims\n")
  L.extend(_verdict(s))
  L.append("")
  L.append("## Reproduce\n")
  L.append("```bash")
  L.append("python -m benchmarks.study                # runs the missing runs, rewrites this file")
  L.append("python -m benchmarks.study --report-only  # this file and the plot from docs/study/")
  L.append("```\n")
  L.append("Each finished run is `docs/study/<arm>__seed<k>.json` (config, per-epoch metrics, "
           "summary, wall time). The study skips runs whose file exists, so it resumes.")
  if cfg:
    L.append("\nFull config of one run (the others differ only in `optimizer`, `gc`, "
             "`gc_location`, `seed`, and the optimizer defaults that follow from `optimizer`):\n")
    L.append("```json\n" + json.dumps(cfg, indent=1, sort_keys=True) + "\n```")
  path = out_dir / "results.md"
  path.write_text("\n".join(L) + "\n")
  return path


def _verdict(s: dict[str, Any]) -> list[str]:
  """Plain-language reading of the paired intervals, computed, not hand-written."""
  out = []
  rows = [(p, "") for p in s["pairs"]]
  if s["pairs_planned"]:
    rows = [(p, " (planned seeds)") for p in s["pairs_planned"]] + [
        (p, " (all seeds)") for p in s["pairs"]]
  for p, tag in rows:
    name = f"{ARM_LABELS[p['treatment']]} vs {ARM_LABELS[p['baseline']]}{tag}"
    d = p["final"]
    lo, hi = d["ci95"]
    n = len(p["seeds"])
    if math.isnan(lo):
      out.append(f"- {name}: one seed only ({100 * d['mean']:+.2f} points); no interval, no "
                 "conclusion.")
    elif lo <= 0 <= hi:
      out.append(f"- {name}: mean {100 * d['mean']:+.2f} points over {n} seeds, 95% interval "
                 f"[{100 * lo:+.2f}, {100 * hi:+.2f}] contains 0: **within noise**.")
    else:
      sign = "better" if lo > 0 else "worse"
      out.append(f"- {name}: mean {100 * d['mean']:+.2f} points over {n} seeds, 95% interval "
                 f"[{100 * lo:+.2f}, {100 * hi:+.2f}] excludes 0: GC is **{sign}** in this "
                 "short-budget setting (with this few seeds, treat it as a hint, not a finding).")
  out.append(
      "\nThe paper (Yong et al., ECCV 2020) claims faster training and better generalization, "
      "with gains that are small even at full budget: the original code's README reports "
      "ImageNet ResNet-50 (BN) top-1 error 23.71% -> 23.21% with GC, i.e. 0.50 points, from "
      "single runs. (The paper's CIFAR-100 tables also show gains of the order of a point; we "
      "did not re-verify those figures and quote none here.) A study this small (a "
      f"{s.get('train_subset', '?')}-image subset, {s.get('epochs', '?')} epochs, the JPEG copy) "
      "can resolve only differences about as large as its intervals above; it can neither "
      "confirm nor refute a 0.5-point effect at full budget. What it can show is whether GC "
      "speeds up or slows down *early* training here, paired seed by seed; the training-loss "
      "columns and the curves speak to the paper's 'faster training' claim.")
  out.append(
      "\nCaveats on any SGD gain seen here: the learning rate (0.1, no warm-up) is the "
      "baseline recipe's, untuned for either arm, and GC removes a large share of some "
      "gradients (at the first step, 0.94 of the dense head's gradient norm and about 0.4 of the "
      "convs' on average; the `gc_diagnostics` of the seed-3 runs), so part of an early gain may "
      "be an effective-step-size effect rather than better conditioning. GC and GCC differ only "
      "in the head, which makes that comparison the most direct probe of it. With Adam, whose "
      "per-element scaling undoes much of a change in gradient scale, no effect is visible.")
  return out


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--report-only", action="store_true", help="only rebuild the report")
  p.add_argument("--out-dir", default=str(ROOT / "docs"),
                 help="where study/*.json, results.md and the plot go (default: docs/)")
  p.add_argument("--workdir", default=str(ROOT / "workdirs" / "study"),
                 help="scratch folder for the runs (checkpoints, logs)")
  p.add_argument("--data-dir", default=os.environ.get("OPTAX_GC_STUDY_DATA", str(DEFAULT_DATA)),
                 help="folder with train.npz/test.npz (default: ../shared/data/cifar10)")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--arms", default=",".join(ARMS), help=f"subset of {list(ARMS)}")
  p.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
  # Overrides of the protocol, for smoke tests (e.g. --dataset digits --model tiny --epochs 1).
  p.add_argument("--dataset", default=None)
  p.add_argument("--model", default=None)
  p.add_argument("--epochs", type=int, default=None)
  p.add_argument("--train-subset", type=int, default=None)
  a = p.parse_args(argv)

  out_dir = Path(a.out_dir)
  if not a.report_only:
    protocol = dict(PROTOCOL)
    for k in ("dataset", "model", "epochs", "train_subset"):
      if getattr(a, k) is not None:
        protocol[k] = getattr(a, k)
    arms = [x for x in a.arms.split(",") if x]
    unknown = set(arms) - set(ARMS)
    if unknown:
      sys.exit(f"unknown arms {sorted(unknown)}; choose from {list(ARMS)}")
    seeds = [int(x) for x in a.seeds.split(",") if x]
    data_dir = None if protocol["dataset"] == "digits" else a.data_dir
    run_study(arms, seeds, protocol, data_dir, out_dir, Path(a.workdir), max_runs=a.max_runs)
  path = write_report(out_dir)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
