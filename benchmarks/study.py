"""Evidence studies: does Gradient Centralization help on real CIFAR-10, and do its axes matter?

Two studies share this one code path (:data:`STUDIES`), each with its own protocol, arms,
paired comparisons, result files and report:

- ``resnet20``: He et al.'s ResNet-20 with SGD-momentum, Adam and AdamW, GC against no GC, and
  GC with the axis Optax's ``optax.centralize()`` keeps (the PyTorch rule) against GC with the
  right one. Files ``docs/study/``, report ``docs/results.md``.
- ``vit``: the example's ``vit_tiny`` Vision Transformer with AdamW: no GC, GC on the axes read
  from the model, GC with the default ``output_axis=-1`` (wrong on the attention kernels), and GC
  on the update. Files ``docs/study_vit/``, report ``docs/results_vit.md``.

Commands::

  python -m benchmarks.study                       # the resnet20 study: missing runs, then report
  python -m benchmarks.study --study vit           # the same for the ViT study
  python -m benchmarks.study --study vit --report-only   # rewrite its report from its files
  nohup nice -n 10 python -m benchmarks.study --study vit > workdirs/study_vit.log 2>&1 &

Within a study the protocol is fixed and identical for every arm; an arm only changes the
optimizer and the GC settings, and every arm runs the same seeds (same initialization, data
order and augmentation for a given seed). Runs go seed by seed (all arms of seed 0, then seed 1,
...), so a study cut short still has complete pairs. Each finished run is saved as
``docs/<runs_dir>/<arm>__seed<k>.json`` (its config, per-epoch metrics and summary; paths in it
are relative to the repository); a later invocation skips runs whose file exists, so a study
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

__all__ = ["Pair", "Study", "STUDIES", "run_study", "write_report", "make_portable", "main"]

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10"


@dataclasses.dataclass(frozen=True)
class Pair:
  """A paired comparison: ``treatment`` minus ``baseline``, seed by seed.

  ``planned_seeds``: the seeds planned for this comparison before any of its results was seen.
  When more seeds were run, the report shows the planned analysis and the one over all seeds.
  """

  treatment: str
  baseline: str
  planned_seeds: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Study:
  """One study: what is fixed, what varies, what is compared, where it is written."""

  name: str
  title: str
  short: str
  """The study in a few words, for the README's headline table."""
  protocol: dict[str, Any]
  """Config fields shared by every arm."""
  arms: dict[str, dict[str, Any]]
  """Arm name -> the config fields it sets (nothing else differs between arms)."""
  labels: dict[str, str]
  pairs: tuple[Pair, ...]
  plot_groups: tuple[tuple[str, tuple[str, ...]], ...]
  """One plot column per group: its title and its arms."""
  runs_dir: str
  report: str
  plot: str
  model_note: str
  """What the model is (one sentence, markdown)."""
  budget_note: str
  """Why the schedule is this short (markdown)."""
  optimizer_note: str
  """The optimizers and GC settings of the arms (markdown)."""
  pairs_note: str
  """How to read the paired differences (markdown)."""
  closing: tuple[str, ...]
  """Paragraphs after the computed verdicts: the paper's claims, caveats (``str.format``-ed with
  the protocol's ``train_subset`` and ``epochs``)."""
  default_seeds: tuple[int, ...]
  share_arms: tuple[str, ...] = ()
  """Arms whose first-step GC diagnostics the report tabulates (one column each)."""


_PAPER = (
    "The paper (Yong et al., ECCV 2020) claims faster training and better generalization, "
    "with gains that are small even at full budget: the original code's README reports "
    "ImageNet ResNet-50 (BN) top-1 error 23.71% -> 23.21% with GC, i.e. 0.50 points, from "
    "single runs. (The paper's CIFAR-100 tables also show gains of the order of a point; we "
    "did not re-verify those figures and quote none here.) A study this small (a "
    "{train_subset}-image subset, {epochs} epochs, the JPEG copy) can resolve only "
    "differences about as large as its intervals above; it can neither confirm nor refute a "
    "0.5-point effect at full budget. What it can show is whether GC speeds up or slows down "
    "*early* training here, paired seed by seed; the training-loss columns and the curves speak "
    "to the paper's 'faster training' claim.")

RESNET20 = Study(
    name="resnet20",
    title="Gradient Centralization on CIFAR-10 (JPEG-decoded copy), ResNet-20",
    short="ResNet-20",
    # Sized so one run takes about 2-4 minutes on a 2-core CPU shared with other jobs. Measured
    # first: one epoch of ResNet-20 on 10,000 images plus the full test set took 91 s under load
    # (122 img/s), so 21 runs had to shrink to 4 epochs of 5,000.
    protocol={
        "dataset": "cifar10",
        "model": "resnet20",
        "train_subset": 5_000,  # stratified, the same subset for every seed and arm
        "epochs": 4,
        "batch_size": 128,
        "schedule": "cosine",
        "warmup_epochs": 0.0,
    },
    arms={
        "sgd": {"optimizer": "sgd", "gc": "none"},
        "sgd_gc": {"optimizer": "sgd", "gc": "gc"},
        "sgd_gcc": {"optimizer": "sgd", "gc": "gcc"},
        "adam": {"optimizer": "adam", "gc": "none"},
        "adam_gc": {"optimizer": "adam", "gc": "gc"},
        "adamw": {"optimizer": "adamw", "gc": "none"},
        "adamw_gc_update": {"optimizer": "adamw", "gc": "gc", "gc_location": "update"},
        # GC with the axis a Flax user gets from Optax today: optax.centralize() keeps axis 0
        # (the PyTorch rule), so on a (kh, kw, in, out) kernel it averages across output
        # channels. On ResNet-20 it equals optax_gc's output_axis=0 on every leaf (tested), so
        # that arm would be a duplicate.
        "sgd_gc_optax": {"optimizer": "sgd", "gc": "gc", "gc_axes": "optax"},
    },
    labels={
        "sgd": "SGD-M", "sgd_gc": "SGD-M + GC", "sgd_gcc": "SGD-M + GCC",
        "adam": "Adam", "adam_gc": "Adam + GC",
        "adamw": "AdamW", "adamw_gc_update": "AdamW + GC (update)",
        "sgd_gc_optax": "SGD-M + optax.centralize()",
    },
    pairs=(
        Pair("sgd_gc", "sgd", (0, 1, 2)),
        # The wrong-axes arm, planned with five seeds from the start (issue 11).
        Pair("sgd_gc_optax", "sgd_gc", (0, 1, 2, 3, 4)),
        Pair("sgd_gc_optax", "sgd", (0, 1, 2, 3, 4)),
        Pair("sgd_gcc", "sgd", (0, 1, 2)),
        Pair("sgd_gc", "sgd_gcc", (0, 1, 2)),  # GC minus GCC: centralizing the dense head alone
        Pair("adam_gc", "adam", (0, 1, 2)),
        Pair("adamw_gc_update", "adamw", (0, 1, 2)),
    ),
    plot_groups=(("SGD momentum", ("sgd", "sgd_gc", "sgd_gcc", "sgd_gc_optax")),
                 ("Adam", ("adam", "adam_gc")), ("AdamW", ("adamw", "adamw_gc_update"))),
    runs_dir="study",
    report="results.md",
    plot="study_curves.png",
    model_note="`resnet20` is He et al.'s CIFAR ResNet-20: 0.27M parameters, BatchNorm",
    budget_note=(
        "The budget (each run about 3-4 minutes on a shared 2-core CPU) forced the short "
        "schedule; these are *short-budget* results, far from converged (a full ResNet-20 run "
        "is ~180 epochs on 50,000 images)."),
    optimizer_note=(
        "Optimizers, at the example's defaults and identical within each pair: SGD momentum "
        "0.9, lr 0.1, coupled weight decay 5e-4; Adam lr 1e-3 (b1 0.9, b2 0.999), coupled "
        "weight decay 5e-4; AdamW lr 1e-3, decoupled weight decay 5e-4. GC = conv and dense "
        "kernels (`optax_gc`, mean over all axes but the output axis, the last one for these "
        "Flax kernels); GCC = conv kernels only; AdamW+GC centralizes the final update "
        "(`gc_location=update`). `optax.centralize()` = the literal Optax transformation in "
        "GC's place in the same chain: it keeps axis 0 (PyTorch's output axis), which on a "
        "Flax `(kh, kw, in, out)` kernel is the kernel row, and averages over the rest, "
        "output channels included; on the `(64, 10)` head it averages over the 10 classes, "
        "where a softmax cross-entropy gradient already sums to zero, so it does nothing there. "
        "Nothing was tuned, for any arm."),
    pairs_note=(
        "GC and GCC differ only in the dense head (the one kernel of rank 2), so 'SGD-M + GC vs "
        "SGD-M + GCC' is the effect of centralizing the head's gradient alone. 'SGD-M + "
        "optax.centralize() vs SGD-M + GC' is what a Flax user loses (or gains) by taking GC "
        "from Optax instead of with the right axes."),
    closing=(
        _PAPER,
        "Caveats on any SGD gain seen here: the learning rate (0.1, no warm-up) is the "
        "baseline recipe's, untuned for either arm, and GC removes a large share of some "
        "gradients (at the first step, 0.94 of the dense head's gradient norm and about 0.4 of "
        "the convs' on average; the `gc_diagnostics` of the seed-3 runs), so part of an early "
        "gain may be an effective-step-size effect rather than better conditioning. GC and GCC "
        "differ only in the head, which makes that comparison the most direct probe of it. With "
        "Adam, whose per-element scaling undoes much of a change in gradient scale, no effect "
        "is visible.",
        "On the wrong axes: on Flax kernels `optax.centralize()` removes the mean over the "
        "kernel column, the input channels and the output channels for each kernel row; at the "
        "first step that is a small share of each conv's gradient and none of the head's (table "
        "above), so it behaves much like no GC, and it forgoes whatever GC on the right axes "
        "gains here. This is one CNN at one untuned learning rate; it shows what the axis can "
        "cost, not what it costs in general.",
    ),
    default_seeds=(0, 1, 2),
    share_arms=("sgd_gc", "sgd_gcc", "sgd_gc_optax"),
)

_SEEDS5 = (0, 1, 2, 3, 4)
# Muon's learning rate (its AdamW part's too): chosen on seed 0 of the `muon` arm alone, before
# any other Muon run, from 1e-3 (AdamW's: 49.58% final test accuracy) and 3e-3 (56.98%), with
# `--arms muon --seeds 0 --lr X --out-dir workdirs/pilot_lrX`. The 3e-3 run is that arm's seed 0.
MUON_LR = 3e-3

VIT = Study(
    name="vit",
    title="Gradient Centralization on a Vision Transformer with AdamW, and Muon on its "
          "inferred layout, CIFAR-10 (JPEG-decoded copy)",
    short="ViT (`vit_tiny`)",
    # PILOT: fixed from AdamW alone before any GC arm ran (see the report's protocol section).
    protocol={
        "dataset": "cifar10",
        "model": "vit_tiny",
        "train_subset": 10_000,  # stratified, the same subset for every seed and arm
        "epochs": 8,
        "batch_size": 128,
        "optimizer": "adamw",
        "learning_rate": 1e-3,
        "weight_decay": 0.05,
        "schedule": "cosine",
        "warmup_epochs": 1.0,
        "augment": "crop_flip",
    },
    arms={
        "adamw": {"gc": "none"},
        "adamw_gc": {"gc": "gc", "gc_axes": "inferred"},
        "adamw_gc_last": {"gc": "gc", "gc_axes": "last"},
        "adamw_gc_update": {"gc": "gc", "gc_axes": "inferred", "gc_location": "update"},
        # Issue 16: Muon (AdamW on the leaves Muon does not take), the same protocol otherwise.
        "muon_optax": {"optimizer": "muon", "muon_dims": "optax", "gc": "none",
                       "learning_rate": MUON_LR},
        "muon": {"optimizer": "muon", "muon_dims": "inferred", "gc": "none",
                 "learning_rate": MUON_LR},
        "muon_gc": {"optimizer": "muon", "muon_dims": "inferred", "gc": "gc",
                    "gc_axes": "inferred", "learning_rate": MUON_LR},
    },
    labels={
        "adamw": "AdamW", "adamw_gc": "AdamW + GC (inferred axes)",
        "adamw_gc_last": "AdamW + GC (axis -1)",
        "adamw_gc_update": "AdamW + GC on the update (inferred axes)",
        "muon_optax": "Muon (Optax's default dimension numbers)",
        "muon": "Muon (inferred dimension numbers)",
        "muon_gc": "Muon (inferred) + GC (inferred axes)",
    },
    pairs=(
        Pair("adamw_gc", "adamw", _SEEDS5),
        Pair("adamw_gc_last", "adamw", _SEEDS5),
        Pair("adamw_gc_last", "adamw_gc", _SEEDS5),
        Pair("adamw_gc_update", "adamw", _SEEDS5),
        Pair("muon_optax", "adamw", _SEEDS5),
        Pair("muon", "adamw", _SEEDS5),
        Pair("muon_gc", "adamw", _SEEDS5),
        Pair("muon", "muon_optax", _SEEDS5),
        Pair("muon_gc", "muon", _SEEDS5),
    ),
    plot_groups=(("AdamW, GC on the gradient", ("adamw", "adamw_gc", "adamw_gc_last")),
                 ("AdamW, GC on the update", ("adamw", "adamw_gc_update")),
                 ("Muon", ("adamw", "muon_optax", "muon", "muon_gc"))),
    runs_dir="study_vit",
    report="results_vit.md",
    plot="study_vit_curves.png",
    model_note=(
        "`vit_tiny`: 0.55M parameters, 4x4 patches (64 tokens), width 128, 4 pre-LayerNorm "
        "blocks of `nnx.MultiHeadAttention` with 4 heads and a GELU MLP of width 256, learned "
        "position embeddings, mean pooling, no dropout"),
    budget_note=(
        "The budget it was sized for (about 6 minutes per run on 2 idle CPU cores; the wall "
        "times below were measured on a CPU shared with other jobs) forced a short schedule; "
        "these are *short-budget* results, far from converged."),
    optimizer_note=(
        "Optimizer: AdamW (b1 0.9, b2 0.999, eps 1e-8), decoupled weight decay on every "
        "parameter, the same for every AdamW arm; the protocol (subset, epochs, learning rate, "
        "warm-up, weight decay) was fixed on AdamW alone before any GC arm ran. GC acts on "
        "kernels only (rank >= 2). *Inferred axes*: each parameter's output axes read from the "
        "model by `optax_gc.nnx_output_axes`: the q/k/v kernels `(in, heads, head_dim)` keep "
        "`(heads, head_dim)`, every other kernel its last axis; biases, LayerNorm parameters and "
        "the position table are left alone. *Axis -1*: the library's default "
        "`output_axis=-1`, which on the q/k/v kernels keeps only `head_dim` and averages across "
        "heads, and also centralizes the rank-2 q/k/v biases `(heads, head_dim)` across heads "
        "and the position table `(1, 64, 128)` across positions. *On the update*: "
        "`centralize_update=True`, GC on AdamW's final update (decay included), inferred axes. "
        "Nothing was tuned for any GC arm. *Muon* (issue 16): `optax.contrib.muon` on the "
        "kernels its dimension numbers pick and AdamW (b1 0.9, b2 0.999) on the rest, one "
        "learning rate and the protocol's decoupled weight decay for both, Muon's update scaled "
        "to AdamW's RMS (`consistent_rms=0.2`), the protocol's schedule. *Optax's default* "
        "dimension numbers give Muon every 2-D leaf read as `(in, out)` (the MLP kernels, the "
        "head, and the q/k/v biases `(heads, head_dim)`) and AdamW the rest (q/k/v/out kernels, "
        "the patch embedding); *inferred* ones "
        "(`optax_gc.muon_dimension_numbers` of `optax_gc.nnx_layout`) give Muon the q/k/v, "
        "out, MLP and patch-embedding kernels over their true fan-in, and AdamW the head, "
        "biases, norms and the position table. Muon's learning rate, 3e-3, was chosen on seed 0 "
        "of the inferred arm alone, from 1e-3 (AdamW's; 49.58% final test accuracy) and 3e-3 "
        "(56.98%), before any other Muon run; that run is the arm's seed 0. 3e-3 is the edge "
        "of that two-point grid, so Muon might do better still at a higher rate. The AdamW runs "
        "date from before the example's one-step refactor, which changed no metric where it "
        "was compared (digits, every optimizer)."),
    pairs_note=(
        "'AdamW + GC (axis -1) vs AdamW + GC (inferred axes)' is what the wrong axes cost (or "
        "gain) a ViT user who keeps the default."),
    closing=(
        _PAPER,
        "Where the arms differ: in a pre-LayerNorm block the q/k/v and MLP-input kernels (and "
        "the head, after the final LayerNorm) read a LayerNorm output, which has zero mean over "
        "the features while the LayerNorm's scale and bias are at their initial values. So at "
        "the first step those kernels' gradients have zero mean over the fan-in, and any mean "
        "over more axes is zero too: neither rule changes them (table above). GC acts at once "
        "on the patch embedding, the attention out-projection and the MLP out-projection, the "
        "same for both rules. The default -1 differs from the inferred axes at the first step "
        "only on the rank-2 q/k/v biases and the position table, which it centralizes and "
        "inference leaves alone (the key bias's gradient is zero up to rounding, since softmax "
        "ignores a shift shared by all keys, so its share is a ratio of rounding errors). As "
        "the LayerNorms move off their initial values the kernels' fan-in means grow, and the "
        "two rules differ there too. The study measures the net effect, not why.",
    ),
    default_seeds=_SEEDS5,
    share_arms=("adamw_gc", "adamw_gc_last"),
)

STUDIES: dict[str, Study] = {s.name: s for s in (RESNET20, VIT)}


# ----------------------------------------------------------------------------------------------
# Running.


def run_file(out_dir: Path, study: Study, arm: str, seed: int) -> Path:
  return out_dir / study.runs_dir / f"{arm}__seed{seed}.json"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def make_portable(record: dict[str, Any], paths: dict[str, str]) -> dict[str, Any]:
  """``record`` with every path under a key of ``paths`` rewritten to start with its value.

  Used so that a committed run file names no machine: the data folder becomes its path relative
  to the repository (``../shared/data/cifar10``). The scratch ``workdir`` is dropped.
  """

  def fix(x: Any) -> Any:
    if isinstance(x, dict):
      return {k: fix(v) for k, v in x.items()}
    if isinstance(x, list):
      return [fix(v) for v in x]
    if isinstance(x, str):
      for old, new in paths.items():
        if x == old or x.startswith(old.rstrip("/") + "/"):
          return new + x[len(old.rstrip("/")):]
    return x

  record = fix(record)
  record.get("summary", {}).pop("workdir", None)
  return record


def run_one(
    study: Study, arm: str, seed: int, protocol: dict[str, Any], data_dir: Path | None,
    workdir: Path,
) -> dict[str, Any]:
  """Trains one (arm, seed) with the example's ``train_and_evaluate``; returns the run record."""
  from examples.cifar import train
  from examples.cifar.config import Config

  data_dir = None if data_dir is None else Path(data_dir).absolute()
  fields = {**protocol, **study.arms[arm], "seed": seed,
            "data_dir": None if data_dir is None else str(data_dir)}
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
  record = {
      "study": study.name,
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
  paths = {} if data_dir is None else {str(data_dir): os.path.relpath(data_dir, ROOT)}
  return make_portable(record, paths)


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
    study: Study, arms: list[str], seeds: list[int], protocol: dict[str, Any],
    data_dir: Path | None, out_dir: Path, workdir: Path, *, max_runs: int | None = None,
) -> list[Path]:
  """Runs every (arm, seed) without a result file under ``out_dir``; returns the new files."""
  done = []
  for arm, seed in planned_runs(arms, seeds):
    path = run_file(out_dir, study, arm, seed)
    if path.exists():
      continue
    if max_runs is not None and len(done) >= max_runs:
      break
    print(f"[study {study.name}] {time.strftime('%H:%M:%S')} running {arm} seed {seed}",
          flush=True)
    record = run_one(study, arm, seed, protocol, data_dir,
                     workdir / study.name / f"{arm}__seed{seed}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    tmp.replace(path)
    last = record["epochs"][-1] if record["epochs"] else {}
    print(f"[study {study.name}] {time.strftime('%H:%M:%S')} done {arm} seed {seed} in "
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


def load_runs(out_dir: Path, study: Study) -> dict[str, dict[int, dict[str, Any]]]:
  """``{arm: {seed: record}}`` from ``out_dir/<runs_dir>/*.json``."""
  runs: dict[str, dict[int, dict[str, Any]]] = {}
  for path in sorted((out_dir / study.runs_dir).glob("*__seed*.json")):
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


def summarize(study: Study, runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
  """Per-arm statistics and per-pair paired differences, as plain data.

  ``pairs`` uses every seed both arms have; ``pairs_planned`` only the pair's planned seeds, and
  holds only the pairs where that differs from ``pairs``.
  """
  arms = {}
  for arm in study.arms:
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
  pairs, planned = [], []
  for pair in study.pairs:
    every = _pair(arms, pair, planned=False)
    if every is None:
      continue
    pairs.append(every)
    only = _pair(arms, pair, planned=True)
    if only is not None and only["seeds"] != every["seeds"]:
      planned.append(only)
  proto = next((r["protocol"] for recs in runs.values() for r in recs.values()), study.protocol)
  return {"arms": arms, "pairs": pairs, "pairs_planned": planned,
          "train_subset": proto.get("train_subset"), "epochs": proto.get("epochs")}


def _pair(arms: dict[str, Any], pair: Pair, planned: bool) -> dict[str, Any] | None:
  """The paired differences over the seeds both arms have (only planned ones if ``planned``)."""
  treat, base = pair.treatment, pair.baseline
  if treat not in arms or base not in arms:
    return None
  seeds = sorted(set(arms[treat]["seeds"]) & set(arms[base]["seeds"]))
  if planned:
    seeds = [x for x in seeds if x in pair.planned_seeds]
  if not seeds:
    return None
  entry: dict[str, Any] = {"treatment": treat, "baseline": base, "seeds": seeds}
  for what in ("final", "best", "final_loss"):
    d = [arms[treat][what][x] - arms[base][what][x] for x in seeds]
    mean, lo, hi = t_interval(d)
    entry[what] = {"per_seed": d, "mean": mean, "ci95": [lo, hi]}
  return entry


def plot_curves(study: Study, runs: dict[str, dict[int, dict[str, Any]]], path: Path) -> None:
  """Training loss and test accuracy per epoch: mean over seeds (line) and min-max (band)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker
  import numpy as np

  groups = study.plot_groups
  fig, axes = plt.subplots(2, len(groups), figsize=(4.4 * len(groups), 7), sharex=True,
                           squeeze=False)
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
                          label=f"{study.labels[arm]} (n={len(recs)})")
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
  import textwrap

  fig.suptitle(textwrap.fill(f"{study.title}: mean over seeds, band = min-max",
                             width=int(20 * len(groups) + 40), break_on_hyphens=False),
               fontsize=11)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _protocol_line(study: Study, runs: dict[str, dict[int, dict[str, Any]]]
                   ) -> tuple[dict[str, Any], list[str]]:
  """The protocol shared by the runs, and a list of inconsistencies (should be empty)."""
  protos = {json.dumps(r["protocol"], sort_keys=True) for recs in runs.values()
            for r in recs.values()}
  problems = [] if len(protos) <= 1 else [f"runs disagree on the protocol: {sorted(protos)}"]
  proto = json.loads(sorted(protos)[0]) if protos else dict(study.protocol)
  return proto, problems


def first_step_shares(study: Study, runs: dict[str, dict[int, dict[str, Any]]]
                      ) -> dict[str, tuple[dict[str, float], list[int]]]:
  """Per arm of ``study.share_arms``: the mean share of the first batch's gradient norm that GC
  removes, per kind of kernel (path without block indices), over the seeds that logged it."""
  out = {}
  for arm in study.share_arms:
    per_group: dict[str, list[float]] = {}
    seeds = []
    for seed, rec in sorted(runs.get(arm, {}).items()):
      diag = [d for d in rec.get("gc_diagnostics") or [] if d.get("epoch") == 1]
      if not diag:
        continue
      seeds.append(seed)
      run_groups: dict[str, list[float]] = {}
      for name, share in diag[0]["shares"].items():
        group = "/".join(p for p in name.split("/") if not p.isdigit())
        run_groups.setdefault(group, []).append(share)
      for group, xs in run_groups.items():
        per_group.setdefault(group, []).append(statistics.fmean(xs))
    if seeds:
      out[arm] = ({g: statistics.fmean(xs) for g, xs in per_group.items()}, seeds)
  return out


def _fmt_ci(d: dict[str, Any], scale: float = 100.0, digits: int = 2) -> str:
  lo, hi = d["ci95"]
  f = f"+.{digits}f"
  ci = "n/a (n=1)" if math.isnan(lo) else f"[{scale * lo:{f}}, {scale * hi:{f}}]"
  return f"{scale * d['mean']:{f}} {ci}"


def _pair_rows(s: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
  """The pairs to report, each with a tag: the planned-seed rows first, where they differ."""
  split = {(p["treatment"], p["baseline"]) for p in s["pairs_planned"]}
  return [(p, " (planned seeds)") for p in s["pairs_planned"]] + [
      (p, " (all seeds)" if (p["treatment"], p["baseline"]) in split else "")
      for p in s["pairs"]]


def write_report(study: Study, out_dir: Path) -> Path:
  """Writes the study's report and plot under ``out_dir`` from its run files there."""
  runs = load_runs(out_dir, study)
  s = summarize(study, runs)
  proto, problems = _protocol_line(study, runs)
  if runs:
    plot_curves(study, runs, out_dir / study.plot)
  any_rec = next((r for recs in runs.values() for r in recs.values()), None)
  cfg = any_rec["config"] if any_rec else {}
  n_done = sum(len(v) for v in runs.values())
  walls = [r["wall_s"] for recs in runs.values() for r in recs.values() if r.get("wall_s")]
  flag = "" if study.name == "resnet20" else f" --study {study.name}"

  L = []
  L.append(f"# Evidence study: {study.title}\n")
  L.append(f"Generated by `python -m benchmarks.study{flag} --report-only` from the per-run "
           f"files in `docs/{study.runs_dir}/`; do not edit by hand.\n")
  L.append("**Data caveat.** All numbers here come from the *JPEG-decoded copy* of CIFAR-10 in "
           "`../shared/data/cifar10` (every image re-saved as a quality-75 JPEG, then decoded), "
           "not the official pixels. They are not comparable with published CIFAR-10 results.\n")
  L.append("## Protocol\n")
  L.append(f"- Model: `{proto.get('model')}` from the example's `examples/cifar/models.py` "
           f"({study.model_note}).")
  L.append(f"- Training data: a stratified subset of **{proto.get('train_subset')}** of the 50,000 "
           "training images (the same subset for every run); evaluation on the **full 10,000-image "
           "test set** after every epoch.")
  warmup = cfg.get("warmup_epochs", proto.get("warmup_epochs", 0.0)) or 0.0
  warm = (f"after a linear warm-up over {warmup:g} epoch{'' if warmup == 1 else 's'}" if warmup
          else "no warm-up")
  augment = {"crop_flip": "random crop (pad 4) + horizontal flip", "crop": "random crop (pad 4)",
             "none": "no augmentation"}[cfg.get("augment", "crop_flip")]
  L.append(f"- {proto.get('epochs')} epochs, batch {proto.get('batch_size')}, "
           f"{proto.get('schedule')} learning-rate decay to 0 over the run ({warm}), {augment}. "
           f"{study.budget_note}")
  L.append(f"- {study.optimizer_note}")
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
    cells = [study.labels[arm], ",".join(map(str, a["seeds"])), _ms(list(a["final"].values())),
             _ms(list(a["best"].values()))]
    for ep in loss_eps:
      vals = [v for v in a["loss_at"].get(ep, {}).values() if v is not None]
      cells.append(_ms(vals, scale=1.0, digits=4) if vals else "–")
    L.append("| " + " | ".join(cells) + " |")
  L.append("")

  L.append("## Paired differences, treatment − baseline (percentage points of test accuracy)\n")
  L.append("Per seed, the treatment's accuracy minus the baseline's for that same seed; the mean "
           "and its 95% Student-t interval (n−1 degrees of freedom). An interval that contains 0 "
           "means the study cannot tell the arms apart. The last column is the same for the "
           "final epoch's mean training loss (negative: the treatment trains faster). "
           f"{study.pairs_note}\n")
  if s["pairs_planned"]:
    L.append("Where a comparison was planned with fewer seeds than were run, its first row uses "
             "only the planned seeds and its later row every seed run (extra seeds were added to "
             "all arms alike because compute time allowed).\n")
  L.append("| comparison | seeds | per-seed Δ final | mean Δ final [95% CI] | per-seed Δ best "
           "| mean Δ best [95% CI] | mean Δ final train loss [95% CI] |")
  L.append("|---|---|---|---|---|---|---|")
  for p, tag in _pair_rows(s):
    L.append(
        f"| {study.labels[p['treatment']]} vs {study.labels[p['baseline']]}{tag} | "
        f"{','.join(map(str, p['seeds']))} | "
        f"{', '.join(f'{100 * x:+.2f}' for x in p['final']['per_seed'])} | "
        f"{_fmt_ci(p['final'])} | "
        f"{', '.join(f'{100 * x:+.2f}' for x in p['best']['per_seed'])} | "
        f"{_fmt_ci(p['best'])} | {_fmt_ci(p['final_loss'], 1.0, 4)} |")
  L.append("")
  if runs:
    L.append("## Curves\n")
    L.append(f"![training loss and test accuracy per epoch]({study.plot})\n")
  shares = first_step_shares(study, runs)
  if shares:
    L.append("## Where GC acts at the first step\n")
    L.append("Share of the first batch's loss-gradient norm that GC removes, `‖mean component‖ "
             "/ ‖g‖` (`optax_gc.gc_removed_fraction` with the arm's axes, logged by the example "
             "at epoch 1 before the first step), per kind of kernel (mean over its layers), mean "
             "over the seeds that logged it. 0 means GC leaves that gradient as it is; a leaf "
             "the arm's axes leave alone reads 0, and one the arm skips by rank reads –.\n")
    groups = list(dict.fromkeys(g for table, _ in shares.values() for g in table))
    L.append("| parameter | " + " | ".join(
        f"{study.labels[a]} (seeds {','.join(map(str, s))})" for a, (_, s) in shares.items())
             + " |")
    L.append("|---|" + "---|" * len(shares))
    for g in groups:
      cells = [f"{t[g]:.3f}" if g in t else "–" for t, _ in shares.values()]
      L.append(f"| `{g}` | " + " | ".join(cells) + " |")
    L.append("")

  L.append("## Verdict, and the paper's claims\n")
  L.extend(verdicts(study, s))
  for paragraph in study.closing:
    L.append("\n" + paragraph.format(train_subset=s["train_subset"], epochs=s["epochs"]))
  L.append("")
  L.append("## Reproduce\n")
  L.append("```bash")
  L.append(f"python -m benchmarks.study{flag}                # runs the missing runs, rewrites "
           "this file")
  L.append(f"python -m benchmarks.study{flag} --report-only  # this file and the plot from "
           f"docs/{study.runs_dir}/")
  L.append("```\n")
  L.append(f"Each finished run is `docs/{study.runs_dir}/<arm>__seed<k>.json` (config, per-epoch "
           "metrics, summary, wall time). The study skips runs whose file exists, so it resumes.")
  if cfg:
    L.append("\nFull config of one run (the others differ only in the fields their arm sets: "
             "`optimizer`, `gc`, `gc_location`, `gc_axes`; the `seed`; and the optimizer "
             "defaults that follow from `optimizer`):\n")
    L.append("```json\n" + json.dumps(cfg, indent=1, sort_keys=True) + "\n```")
  path = out_dir / study.report
  path.write_text("\n".join(L) + "\n")
  return path


def _reading(d: dict[str, Any]) -> str:
  lo, hi = d["ci95"]
  if math.isnan(lo):
    return "one seed"
  return "within noise" if lo <= 0 <= hi else ("better here" if lo > 0 else "worse here")


def headline(out_dir: Path, studies: tuple[Study, ...] | None = None) -> str:
  """The README's headline table: every study's comparisons, from the run files alone.

  One row per pair: the mean paired difference in final test accuracy and its 95% interval over
  every seed run (and over the planned seeds, where fewer), and its reading.
  """
  rows = ["| study | comparison | Δ test accuracy, points: mean [95% CI] | seeds | reading |",
          "| --- | --- | --- | --- | --- |"]
  for study in studies or tuple(STUDIES.values()):
    s = summarize(study, load_runs(out_dir, study))
    planned = {(p["treatment"], p["baseline"]): p for p in s["pairs_planned"]}
    for p in s["pairs"]:
      cell = _fmt_ci(p["final"], digits=2)
      q = planned.get((p["treatment"], p["baseline"]))
      if q:
        seeds = ",".join(map(str, q["seeds"]))
        cell += f" (planned seeds {seeds}: {_fmt_ci(q['final'], digits=2)})"
      rows.append(f"| {study.short} | {study.labels[p['treatment']]} vs "
                  f"{study.labels[p['baseline']]} | {cell} | {len(p['seeds'])} | "
                  f"{_reading(p['final'])} |")
  return "\n".join(rows)


def verdicts(study: Study, s: dict[str, Any]) -> list[str]:
  """Plain-language reading of each paired interval, computed, not hand-written."""
  out = []
  for p, tag in _pair_rows(s):
    treat, base = study.labels[p["treatment"]], study.labels[p["baseline"]]
    name = f"{treat} vs {base}{tag}"
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
                 f"[{100 * lo:+.2f}, {100 * hi:+.2f}] excludes 0: {treat} is **{sign}** than "
                 f"{base} in this short-budget setting (with this few seeds, treat it as a hint, "
                 "not a finding).")
  return out


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--study", default="resnet20", choices=sorted(STUDIES))
  p.add_argument("--report-only", action="store_true", help="only rebuild the report")
  p.add_argument("--headline", action="store_true",
                 help="only print the README's headline table (every study), from the files")
  p.add_argument("--out-dir", default=str(ROOT / "docs"),
                 help="where the run files, the report and the plot go (default: docs/)")
  p.add_argument("--workdir", default=str(ROOT / "workdirs" / "study"),
                 help="scratch folder for the runs (checkpoints, logs)")
  p.add_argument("--data-dir", default=os.environ.get("OPTAX_GC_STUDY_DATA", str(DEFAULT_DATA)),
                 help="folder with train.npz/test.npz (default: ../shared/data/cifar10 next to "
                      "the repository); recorded relative to the repository")
  p.add_argument("--seeds", default=None, help="comma-separated (default: the study's planned "
                                               "seeds)")
  p.add_argument("--arms", default=None, help="comma-separated subset of the study's arms")
  p.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
  # Overrides of the protocol, for smoke tests (e.g. --dataset digits --model tiny --epochs 1).
  p.add_argument("--dataset", default=None)
  p.add_argument("--model", default=None)
  p.add_argument("--epochs", type=int, default=None)
  p.add_argument("--train-subset", type=int, default=None)
  p.add_argument("--lr", type=float, default=None,
                 help="the learning rate of every arm run (a pilot; write to another --out-dir)")
  a = p.parse_args(argv)

  study = STUDIES[a.study]
  out_dir = Path(a.out_dir)
  if a.headline:
    print(headline(out_dir))
    return
  if not a.report_only:
    protocol = dict(study.protocol)
    for k in ("dataset", "model", "epochs", "train_subset"):
      if getattr(a, k) is not None:
        protocol[k] = getattr(a, k)
    arms = list(study.arms) if a.arms is None else [x for x in a.arms.split(",") if x]
    unknown = set(arms) - set(study.arms)
    if unknown:
      sys.exit(f"unknown arms {sorted(unknown)} for study {study.name}; choose from "
               f"{list(study.arms)}")
    seeds = list(study.default_seeds) if a.seeds is None else [
        int(x) for x in a.seeds.split(",") if x]
    data_dir = None if protocol["dataset"] == "digits" else Path(a.data_dir)
    if a.lr is not None:  # each arm's own learning rate; the protocol stays the study's
      study = dataclasses.replace(study, arms={
          k: {**v, "learning_rate": a.lr} for k, v in study.arms.items()})
    run_study(study, arms, seeds, protocol, data_dir, out_dir, Path(a.workdir),
              max_runs=a.max_runs)
  path = write_report(study, out_dir)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
