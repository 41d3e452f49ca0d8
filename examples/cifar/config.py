"""The example's configuration: one frozen dataclass, and the command-line flags that override it.

A run is fully described by a :class:`Config`. Named starting points live in ``configs/`` (one
file each, opening with the command that runs it); flags given on the command line replace single
fields. ``None`` for ``learning_rate`` / ``weight_decay`` means "the optimizer's default" and is
filled in by :meth:`Config.resolved`.
"""

import argparse
import dataclasses
import typing
from collections.abc import Sequence
from typing import Any, Literal

from examples.cifar.models import MODELS

__all__ = ["Config", "Dataset", "Optimizer", "MuonDims", "GcMode", "GcLocation", "GcAxes",
           "Schedule", "Augmentation", "GC_MODES", "GC_LOCATIONS", "BOOKKEEPING_FIELDS",
           "DATASET_CONFIGS", "add_flags", "config_name", "config_from_flags"]

# The options with a fixed set of values: Config checks them, and argparse offers them as choices.
Dataset = Literal["cifar10", "cifar100", "digits"]
Optimizer = Literal["sgd", "adam", "adamw", "muon"]
MuonDims = Literal["inferred", "optax"]
GcMode = Literal["none", "gc", "gcc"]
GcLocation = Literal["gradient", "update"]
GcAxes = Literal["inferred", "last", "optax"]
Schedule = Literal["step", "cosine", "constant"]
Augmentation = Literal["crop_flip", "crop", "none"]
GC_MODES: tuple[str, ...] = typing.get_args(GcMode)
GC_LOCATIONS: tuple[str, ...] = typing.get_args(GcLocation)
_DEFAULT_LR = {"sgd": 0.1, "adam": 1e-3, "adamw": 1e-3, "muon": 1e-3}


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything that defines a run. Defaults: the GC paper's CIFAR recipe (ResNet-18, SGD)."""

  # Data.
  dataset: Dataset = "cifar10"
  """``cifar10``, ``cifar100`` or ``digits`` (offline, bundled with scikit-learn)."""
  data_dir: str | None = None
  """Folder with the data (npz pair, archive or its extracted folder); see ``input_pipeline``."""
  allow_unverified_data: bool = False
  """Read a CIFAR archive or batch file that is not the official one (its MD5 differs), e.g. a
  re-packed copy; it is still decoded without running code. Off: such a file is an error."""
  train_subset: int | None = None
  """Train on a stratified subset of this many images (fixed across seeds); ``None``: all."""
  augment: Augmentation = "crop_flip"
  """On-device augmentation: ``crop_flip`` (random crop, pad 4, and horizontal flip), ``crop`` or
  ``none``. Digits use ``crop``: a mirrored digit is another shape."""

  # Model.
  model: str = "resnet18"
  """A name in ``models.MODELS``."""

  # Optimizer.
  optimizer: Optimizer = "sgd"
  """``sgd`` (PyTorch-style momentum, coupled decay), ``adam`` (coupled decay), ``adamw``, or
  ``muon`` (``optax.contrib.muon``: Muon on the kernels its dimension numbers pick, AdamW on the
  rest, one learning rate and decoupled weight decay for both, Muon's update scaled to AdamW's
  RMS, ``consistent_rms=0.2``)."""
  gc: GcMode = "gc"
  """``none`` (plain Optax), ``gc`` (conv and dense kernels) or ``gcc`` (conv kernels only)."""
  gc_location: GcLocation = "gradient"
  """Centralize the ``gradient`` (the paper) or the final ``update`` (same as gradient for SGD)."""
  gc_axes: GcAxes = "inferred"
  """Which axes of each parameter index its output units (GC averages over the others):
  ``inferred`` reads them from the model (``optax_gc.nnx_output_axes``), ``last`` uses
  ``output_axis=-1`` (right for Flax dense and conv kernels, wrong for attention's
  ``(in, heads, head_dim)``), ``optax`` swaps in ``optax.centralize()``, which keeps axis 0 (the
  PyTorch rule; wrong for every Flax kernel), for comparison only."""
  muon_dims: MuonDims = "inferred"
  """Muon's dimension numbers: ``inferred`` from the model (``optax_gc.muon_dimension_numbers``
  of ``optax_gc.nnx_layout``: attention and conv kernels get Muon, the head and biases AdamW), or
  ``optax``'s default (every 2-D leaf as ``(in, out)``, every other leaf AdamW)."""
  learning_rate: float | None = None
  """Peak learning rate; ``None``: 0.1 for SGD, 1e-3 for Adam/AdamW/Muon."""
  weight_decay: float | None = None
  """``None``: 5e-4 (the paper's CIFAR setting); coupled for SGD/Adam, decoupled for AdamW."""
  momentum: float = 0.9
  nesterov: bool = False
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  schedule: Schedule = "step"
  """``step`` (x ``step_factor`` at ``step_boundaries``), ``cosine`` or ``constant``."""
  step_boundaries: tuple[float, ...] = (0.3, 0.6, 0.9)
  """Fractions of ``epochs`` at which the step schedule decays. The default is the GC code's
  ``StepLR(step_size=60, gamma=0.1)`` over 200 epochs: lr / 10 at epochs 60, 120 and 180."""
  step_factor: float = 0.1
  warmup_epochs: float = 0.0
  """Linear warm-up from 0 over this many epochs (useful for large multi-device batches)."""

  # Training.
  epochs: int = 200
  batch_size: int = 128
  """Global batch size, split over all devices (must be divisible by their number)."""
  eval_batch_size: int = 1000
  seed: int = 0
  """Seeds initialization, shuffling and augmentation."""

  # Bookkeeping (these may change between a run and its resumption).
  checkpoints_to_keep: int = 3
  log_every_steps: int = 20
  """How often the progress bar fetches the loss (and checks it is finite)."""
  gc_log_every_epochs: int = 10
  """Log the per-layer share of the gradient that GC removes at epoch 1 and every N epochs."""
  progress: bool = True
  """Show tqdm progress bars."""
  distributed: bool = False
  """Call ``jax.distributed.initialize()`` first (several processes). Without the three fields
  below it detects SLURM, Open MPI, Kubernetes or a TPU slice; any of them implies it."""
  coordinator_address: str | None = None
  """``HOST:PORT`` of process 0, where the others connect (a manual launch)."""
  num_processes: int | None = None
  """How many processes train together; ``None``: detected (one without ``distributed``). A run
  records the real count, and resuming it needs the same count."""
  process_id: int | None = None
  """This process's index, ``0 .. num_processes - 1`` (a manual launch)."""
  distributed_timeout: int = 120
  """Seconds before the processes give up on one that does not connect or stops answering
  (``jax.distributed``'s initialization, heartbeat and shutdown timeouts)."""

  def resolved(self) -> "Config":
    """Returns a copy with optimizer defaults filled in, after checking every choice."""
    for name, choices in _choices().items():
      _check_choice(name, getattr(self, name), choices)
    if self.gc == "gcc" and self.gc_axes == "optax":
      raise ValueError("gc_axes='optax' has no conv-only (gcc) form: optax.centralize() "
                       "centralizes every leaf of rank > 1. Use gc='gc', or another gc_axes.")
    if self.optimizer == "muon" and (self.gc == "gcc" or self.gc_location == "update"):
      raise ValueError("--optimizer muon takes --gc none or gc, on the gradient: GC runs "
                       "before Muon's momentum, as it does before Adam's.")
    if not isinstance(self.allow_unverified_data, bool):
      raise ValueError(f"allow_unverified_data must be True or False, got "
                       f"{self.allow_unverified_data!r}.")
    for name in ("epochs", "batch_size", "eval_batch_size", "train_subset", "checkpoints_to_keep",
                 "log_every_steps", "gc_log_every_epochs"):
      value = getattr(self, name)
      if value is not None and value < 1:
        raise ValueError(f"{_flag(name)} must be positive, got {value}.")
    _check_launch(self)
    return dataclasses.replace(
        self,
        learning_rate=(
            _DEFAULT_LR[self.optimizer] if self.learning_rate is None else self.learning_rate
        ),
        weight_decay=5e-4 if self.weight_decay is None else self.weight_decay,
        step_boundaries=tuple(self.step_boundaries),
        distributed=self.distributed or self.coordinator_address is not None
        or self.process_id is not None or (self.num_processes or 1) > 1,
    )

  def to_dict(self) -> dict[str, Any]:
    """The config as a JSON-friendly dict."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Config":
    """Inverse of :meth:`to_dict` (unknown keys are an error)."""
    d = dict(d)
    if "step_boundaries" in d:
      d["step_boundaries"] = tuple(d["step_boundaries"])
    return cls(**d)


# Fields that do not change the trajectory, so a run may resume with different values.
BOOKKEEPING_FIELDS = frozenset(
    {"data_dir", "checkpoints_to_keep", "log_every_steps", "gc_log_every_epochs", "progress",
     "distributed", "eval_batch_size", "coordinator_address", "process_id",
     "distributed_timeout", "allow_unverified_data"}
)


def _choices() -> dict[str, tuple[str, ...]]:
  """Each field with a fixed set of values (a ``Literal``, or a model name): the values."""
  choices = {f.name: typing.get_args(f.type) for f in dataclasses.fields(Config)
             if typing.get_origin(f.type) is Literal}
  return {**choices, "model": tuple(MODELS)}


def _flag(field: str) -> str:
  """``"batch_size"`` -> ``"--batch-size"``: the flag that sets ``field``."""
  return next(flag for flag, (name, _) in _FLAGS.items() if name == field)


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ValueError(f"{_flag(name)} must be one of {list(choices)}, got {value!r}.")


def _check_launch(config: Config) -> None:
  """Clear errors for a malformed manual launch (``jax.distributed`` checks the rest)."""
  address, n, i = config.coordinator_address, config.num_processes, config.process_id
  if address is not None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
      raise ValueError(f"--coordinator-address must be HOST:PORT, got {address!r}.")
  if n is not None and n < 1:
    raise ValueError(f"--num-processes must be at least 1, got {n}.")
  if i is not None and not (i >= 0 and (n is None or i < n)):
    raise ValueError(f"--process-id must be in [0, --num-processes), got {i} of {n}.")
  if config.distributed_timeout < 1:
    raise ValueError(f"--distributed-timeout must be positive, got {config.distributed_timeout}.")


def _bool(text: str) -> bool:
  if text.lower() in ("1", "true", "yes", "on"):
    return True
  if text.lower() in ("0", "false", "no", "off"):
    return False
  raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _floats(text: str) -> tuple[float, ...]:
  return tuple(float(x) for x in text.split(",") if x)


# flag name -> (Config field, argparse keyword arguments). Defaults are None: "keep the config's".
_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "--dataset": ("dataset", dict(help="cifar10, cifar100, or digits (offline, no files)")),
    "--data-dir": ("data_dir", dict(help="folder holding train.npz+test.npz, the official archive "
                                         "or its extracted folder (default: $OPTAX_GC_DATA/"
                                         "<dataset>, else ~/.cache/optax_gc/<dataset>; downloads "
                                         "there if empty)")),
    "--allow-unverified-data": ("allow_unverified_data", dict(
        action="store_true", help="read CIFAR files whose MD5 is not the official one (a "
                                  "re-packed copy), still without running code in them")),
    "--train-subset": ("train_subset", dict(type=int, metavar="N",
                                            help="train on a stratified subset of N images")),
    "--augment": ("augment", dict(help="on-device augmentation: random crop (pad 4) and flip")),
    "--model": ("model", dict(help="ResNets for CIFAR (He et al.), ResNets with a CIFAR stem, "
                                   "small ones for tests, a small ViT")),
    "--optimizer": ("optimizer", dict()),
    "--muon-dims": ("muon_dims", dict(help="Muon's dimension numbers: inferred from the model, or "
                                           "optax's default (every 2-D leaf as (in, out))")),
    "--gc": ("gc", dict(help="none: plain Optax; gc: conv+dense kernels; gcc: conv kernels "
                             "only")),
    "--gc-location": ("gc_location", dict(help="centralize the gradient (paper) or the final "
                                               "update (identical for SGD)")),
    "--gc-axes": ("gc_axes", dict(help="output axes: inferred from the model, last (-1), or "
                                       "optax.centralize()'s axis 0 (the PyTorch rule)")),
    "--lr": ("learning_rate", dict(type=float, help="peak learning rate (default: 0.1 SGD, "
                                                    "1e-3 Adam/AdamW)")),
    "--weight-decay": ("weight_decay", dict(type=float, help="default 5e-4; coupled for SGD/Adam, "
                                                             "decoupled for AdamW")),
    "--momentum": ("momentum", dict(type=float)),
    "--nesterov": ("nesterov", dict(type=_bool, metavar="BOOL")),
    "--schedule": ("schedule", dict()),
    "--step-boundaries": ("step_boundaries", dict(type=_floats, metavar="F,F",
                                                  help="fractions of the epochs where the step "
                                                       "schedule decays")),
    "--warmup-epochs": ("warmup_epochs", dict(type=float)),
    "--epochs": ("epochs", dict(type=int)),
    "--batch-size": ("batch_size", dict(type=int, help="global batch size (all devices)")),
    "--eval-batch-size": ("eval_batch_size", dict(type=int)),
    "--seed": ("seed", dict(type=int)),
    "--checkpoints-to-keep": ("checkpoints_to_keep", dict(type=int)),
    "--log-every-steps": ("log_every_steps", dict(type=int)),
    "--gc-log-every-epochs": ("gc_log_every_epochs", dict(type=int)),
    "--progress": ("progress", dict(type=_bool, metavar="BOOL", help="show progress bars")),
    "--coordinator-address": ("coordinator_address", dict(
        metavar="HOST:PORT", help="process 0's address, for a manual multi-process launch "
                                  "(implies --distributed)")),
    "--num-processes": ("num_processes", dict(type=int, metavar="N",
                                              help="processes in a manual launch")),
    "--process-id": ("process_id", dict(type=int, metavar="I",
                                        help="this process's index, 0..N-1, in a manual launch")),
    "--distributed-timeout": ("distributed_timeout", dict(
        type=int, metavar="SECONDS", help="stop when another process does not connect or stops "
                                          "answering for this long")),
}


def add_flags(parser: argparse.ArgumentParser, *, skip: Sequence[str] = ()) -> None:
  """Adds ``--config`` and one flag per :class:`Config` field (except those in ``skip``)."""
  parser.add_argument("--config", default=None,
                      help="starting config, a module in examples/cifar/configs "
                           "(default, digits, cifar10_resnet20, cifar100); if not given, the "
                           "--dataset's own (cifar10: default, cifar100: cifar100, digits: "
                           "digits), else default")
  group = parser.add_argument_group(
      "config overrides", "Each flag replaces one field of the --config; [brackets] show the "
      "field's default in Config (configs/default.py).")
  defaults = Config()
  choices = _choices()
  for flag, (field, kwargs) in _FLAGS.items():
    if field in skip:
      continue
    kwargs = dict(kwargs)
    if field in choices:
      kwargs["choices"] = choices[field]
    value = getattr(defaults, field)
    value = ",".join(map(str, value)) if isinstance(value, tuple) else value
    kwargs["help"] = kwargs.get("help", "") + ("" if value is None else f" [{value}]")
    group.add_argument(flag, dest=field, default=None, **kwargs)
  parser.add_argument("--distributed", action="store_true",
                      help="call jax.distributed.initialize() first (several processes; detects "
                           "SLURM, Open MPI, Kubernetes, TPU slices)")


DATASET_CONFIGS = {"cifar10": "default", "cifar100": "cifar100", "digits": "digits"}
"""The starting config a bare ``--dataset`` picks: that dataset's sensible defaults."""


def config_name(args: argparse.Namespace) -> str:
  """The starting config: ``--config`` if given, else the ``--dataset``'s, else ``default``."""
  if args.config is not None:
    return args.config
  return DATASET_CONFIGS.get(getattr(args, "dataset", None) or "cifar10", "default")


def config_from_flags(args: argparse.Namespace) -> Config:
  """The starting config (:func:`config_name`) with every flag the user gave applied, resolved."""
  from examples.cifar import configs  # Late import: configs import this module.

  config = configs.get_config(config_name(args))
  overrides = {
      field: getattr(args, field)
      for field, _ in _FLAGS.values()
      if getattr(args, field, None) is not None
  }
  if args.distributed:
    overrides["distributed"] = True
  return dataclasses.replace(config, **overrides).resolved()
