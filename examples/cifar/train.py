"""Trains a ResNet or ViT with optax_gc on CIFAR-10/100 or digits: data-parallel, resumable.

Run ``python -m examples.cifar.train --help`` (the README has the commands). From Python::

    from examples.cifar import configs
    from examples.cifar.train import train_and_evaluate
    summary = train_and_evaluate(configs.get_config("digits"), "/tmp/digits_gc")

What lands in the workdir:

* ``metrics.jsonl``: one JSON object per epoch (losses, accuracies, learning rate, speed);
* ``gc_diagnostics.jsonl``: now and then, the share of each kernel's gradient that GC removes;
* ``summary.json``: final and best test accuracy and the full config;
* ``config.json`` and ``checkpoints/`` (orbax, one per epoch, the last few kept).

With several processes (``--distributed``, or ``--coordinator-address``/``--num-processes``/
``--process-id``), process 0 writes the files and the log, and all processes save and restore the
checkpoints together; see the README's "Several devices / several hosts".

Rerunning with the same workdir resumes after the last checkpoint and, on CPU, ends with exactly
the metrics of an uninterrupted run: shuffling depends only on ``(seed, epoch)``, augmentation only
on ``(seed, step)``, and the step counter is part of the checkpointed optimizer state.
"""

import argparse
import collections
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

import optax_gc
from examples.cifar import input_pipeline, models
from examples.cifar.config import (
  BOOKKEEPING_FIELDS,
  Augmentation,
  Config,
  add_flags,
  config_from_flags,
)
from examples.cifar.input_pipeline import Batch, DataError, Split

__all__ = [
    "TrainingDivergedError", "make_learning_rate", "gc_output_axes", "make_optimizer", "make_mesh",
    "train_step", "eval_step", "Trainer", "gc_removed_share", "check_workdir",
    "train_and_evaluate", "main",
]

class TrainingDivergedError(RuntimeError):
  """The loss became NaN or infinite; the last good checkpoint is left in place."""


# ----------------------------------------------------------------------------------------------
# Optimizer.


def make_learning_rate(config: Config, steps_per_epoch: int) -> optax.Schedule:
  """The learning-rate schedule, in optimizer steps: step decay, cosine or constant, + warm-up."""
  lr = config.learning_rate
  total = config.epochs * steps_per_epoch
  if config.schedule == "step":
    boundaries = {round(b * config.epochs) * steps_per_epoch: config.step_factor
                  for b in config.step_boundaries}
    schedule = optax.piecewise_constant_schedule(lr, boundaries)
  elif config.schedule == "cosine":
    schedule = optax.cosine_decay_schedule(lr, total)
  else:
    schedule = optax.constant_schedule(lr)
  warmup = round(config.warmup_epochs * steps_per_epoch)
  if warmup == 0:
    return schedule
  return lambda step: jnp.where(step < warmup, lr * (step + 1) / warmup, schedule(step))


def gc_output_axes(config: Config, model: nnx.Module, image_shape: tuple[int, ...]) -> Any:
  """GC's ``output_axis`` for ``config.gc_axes``, for :func:`make_optimizer` and the diagnostics.

  Args:
    config: the run; only ``gc_axes`` matters.
    model: the model to train.
    image_shape: one input image's shape, ``(height, width, channels)``.

  Returns:
    For ``inferred``, the spec tree that ``optax_gc.nnx_output_axes`` reads from the model's
    ``model(x, train=True)`` (traced on a ``jax.ShapeDtypeStruct``: nothing is computed). For
    ``last``, ``-1``. For ``optax``, ``0``: the axis ``optax.centralize()`` keeps, which on these
    models is ``optax.centralize()`` itself (``tests/centralize_test.py`` checks the two agree).
  """
  if config.gc_axes == "last":
    return -1
  if config.gc_axes == "optax":
    return 0
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  return optax_gc.nnx_output_axes(model, x, train=True)


def muon_dimension_numbers(config: Config, model: nnx.Module,
                           image_shape: tuple[int, ...]) -> Any:
  """Muon's ``muon_weight_dimension_numbers`` for ``config.muon_dims``.

  Args:
    config: the run; only ``muon_dims`` matters.
    model: the model to train.
    image_shape: one input image's shape, ``(height, width, channels)``.

  Returns:
    For ``inferred``, ``optax_gc.muon_dimension_numbers`` of the layout ``optax_gc.nnx_layout``
    reads from ``model(x, train=True)``: kernels with a fan-in and an output of several entries
    each get Muon, over their true fan-in, except the head; the rest gets AdamW. For ``optax``,
    ``None``: Optax's default, Muon on every 2-D leaf read as ``(in, out)``.
  """
  if config.muon_dims == "optax":
    return None
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  layout = optax_gc.nnx_layout(model, x, train=True)
  return optax_gc.muon_dimension_numbers(layout, nnx.as_pure(nnx.state(model, nnx.Param)))


def _muon(learning_rate: optax.ScalarOrSchedule, weight_decay: float, output_axis: Any,
          dimension_numbers: Any) -> optax.GradientTransformation:
  """GC (``output_axis=None``: none), then ``optax.contrib.muon`` with AdamW on the rest."""
  return optax.chain(
      optax_gc.centralize(output_axis),
      optax.contrib.muon(learning_rate, weight_decay=weight_decay,
                         adam_weight_decay=weight_decay,
                         muon_weight_dimension_numbers=dimension_numbers, consistent_rms=0.2))


_ALIASES = {"sgd": optax_gc.gc_sgd, "adam": optax_gc.gc_adam, "adamw": optax_gc.gc_adamw}


def make_optimizer(
    config: Config, steps_per_epoch: int, output_axis: Any = -1, muon_dims: Any = None
) -> optax.GradientTransformation:
  """The ``optax_gc`` alias for ``config.optimizer``, with GC as ``config.gc`` asks.

  Every arm is the same alias; only its GC slot differs. ``--gc none`` is ``output_axis=None``
  (GC leaves every leaf alone), ``gcc`` is ``conv_only=True``, and ``gc_location="update"`` is
  ``centralize_update=True`` (Adam/AdamW; for SGD both locations give the same update, as GC and
  momentum are linear). The chains, ``[GC]`` marking the slot:

  ========  ===================================================================================
  sgd       [GC] -> coupled weight decay -> trace (PyTorch momentum) -> scale by lr
  adam      [GC] -> coupled weight decay -> scale_by_adam -> scale by lr
  adamw     [GC] -> scale_by_adam -> decoupled weight decay -> scale by lr
  muon      [GC] -> optax.contrib.muon (Muon on the leaves ``muon_dims`` picks, AdamW on the rest)
  ========  ===================================================================================

  Args:
    config: the run.
    steps_per_epoch: optimizer steps per epoch (for the learning-rate schedule).
    output_axis: the output axes GC keeps, as :func:`gc_output_axes` gives them: an int, a tuple,
      or a spec tree. Unused for ``gc="none"``.
    muon_dims: for ``muon``, Muon's dimension numbers, as :func:`muon_dimension_numbers` gives
      them (``None``: Optax's default).

  Returns:
    The :class:`optax.GradientTransformation`.
  """
  config = config.resolved()
  if config.optimizer == "muon":
    return _muon(make_learning_rate(config, steps_per_epoch), config.weight_decay,
                 None if config.gc == "none" else output_axis, muon_dims)
  hyperparameters = {
      "sgd": dict(momentum=config.momentum, nesterov=config.nesterov),
      "adam": dict(b1=config.b1, b2=config.b2, eps=config.eps),
      "adamw": dict(b1=config.b1, b2=config.b2, eps=config.eps),
  }[config.optimizer]
  gc = dict(output_axis=None if config.gc == "none" else output_axis,
            conv_only=config.gc == "gcc")
  if config.optimizer != "sgd":
    gc["centralize_update"] = config.gc_location == "update"
  return _ALIASES[config.optimizer](
      learning_rate=make_learning_rate(config, steps_per_epoch),
      weight_decay=config.weight_decay, **hyperparameters, **gc)


# ----------------------------------------------------------------------------------------------
# Jitted steps. Images arrive as uint8 and are augmented and normalized on the device.


def _loss_and_metrics(
    logits: jax.Array, labels: jax.Array, mask: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean cross-entropy over the real (mask 1) rows, plus sums for epoch averages."""
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  count = jnp.sum(mask)
  loss_sum = jnp.sum(per_example * mask)
  correct = jnp.sum((jnp.argmax(logits, -1) == labels) * mask)
  loss = loss_sum / jnp.maximum(count, 1.0)
  return loss, {"loss": loss, "loss_sum": loss_sum, "correct": correct, "count": count}


def train_step(
    graphdef: nnx.GraphDef, treedef: Any, augment: Augmentation, batch_sharding: NamedSharding,
    leaves: list[jax.Array], totals: dict[str, jax.Array], data: tuple[jax.Array, jax.Array],
    idx: jax.Array, mask: jax.Array, s: jax.Array, rng: jax.Array, mean_std: jax.Array,
) -> tuple[list[jax.Array], dict[str, jax.Array], jax.Array, jax.Array]:
  """One optimizer step on batch ``s`` of an epoch, gathered from a dataset on the devices.

  :class:`Trainer` jits it once per run, with the first four arguments bound and ``leaves``
  donated; it is the only train step.

  Args:
    graphdef: ``nnx.split((model, optimizer))``'s graph definition.
    treedef: the tree structure of that split's state; ``leaves`` are its leaves (the model's and
      the optimizer's arrays: a flat list goes through ``jit`` faster than an ``nnx.State``).
    augment: ``crop_flip``, ``crop`` or ``none``; the key is ``fold_in(rng, optimizer.step)``, so
      a resumed run draws the same crops.
    batch_sharding: where the batch goes: split along the mesh's ``data`` axis.
    leaves: the state's arrays before the step.
    totals: the epoch's running ``loss_sum``, ``correct`` and ``count`` (kept on the devices).
    data: ``(images, labels)`` of the whole split, uint8 images, replicated.
    idx: the epoch's example indices, ``(steps, batch)``.
    mask: 1 for real rows, 0 for the padding of the last batch, ``(steps, batch)``.
    s: the step within the epoch, an int32 scalar on the devices.
    rng: the run's augmentation key.
    mean_std: the per-channel mean and std, ``(2, channels)``.

  Returns:
    ``(leaves, totals, s + 1, loss)``: the state's arrays after the step, the updated totals,
    the next step's index and this batch's mean loss.
  """
  rows = idx[s]
  batch = jax.lax.with_sharding_constraint(Batch(data[0][rows], data[1][rows], mask[s]),
                                           batch_sharding)
  model, optimizer = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
  images = batch.images
  if augment != "none":
    key = jax.random.fold_in(rng, optimizer.step[...])
    images = input_pipeline.augment(images, key, flip=augment == "crop_flip")
  x = input_pipeline.normalize(images, mean_std)

  def loss_fn(model: models.ResNet) -> tuple[jax.Array, dict[str, jax.Array]]:
    return _loss_and_metrics(model(x, train=True), batch.labels, batch.mask)

  grads, metrics = nnx.grad(loss_fn, has_aux=True)(model)
  optimizer.update(model, grads)
  totals = {k: totals[k] + metrics[k] for k in totals}
  return jax.tree.leaves(nnx.state((model, optimizer))), totals, s + 1, metrics["loss"]


def eval_step(graphdef: nnx.GraphDef, state: nnx.State, batch: Batch, mean_std: jax.Array
              ) -> dict[str, jax.Array]:
  """Loss and accuracy sums on ``batch`` with BatchNorm's running averages.

  :class:`Trainer` jits it once per run with ``graphdef`` (the model's) bound; ``state`` is
  ``nnx.state(model)``.
  """
  model = nnx.merge(graphdef, state)
  logits = model(input_pipeline.normalize(batch.images, mean_std), train=False)
  return _loss_and_metrics(logits, batch.labels, batch.mask)[1]


@functools.partial(jax.jit, static_argnames="graphdef")
def _loss_grads(graphdef: nnx.GraphDef, state: nnx.State, batch: Batch, mean_std: jax.Array
                ) -> nnx.State:
  model = nnx.merge(graphdef, state)  # A copy: BatchNorm updates here are thrown away.
  x = input_pipeline.normalize(batch.images, mean_std)
  return nnx.grad(lambda m: _loss_and_metrics(m(x, train=True), batch.labels, batch.mask)[0])(
      model)


def gc_removed_share(
    model: models.ResNet, batch: Batch, mean_std: jax.Array, min_ndim: int = 2,
    output_axis: Any = -1,
) -> dict[str, float]:
  """Per kernel, the share of the loss gradient's norm that GC removes (``optax_gc``'s diagnostic).

  Computed on ``batch`` without changing the model, with GC's ``output_axis`` (an int or a spec
  tree, as :func:`make_optimizer` takes it); only leaves of rank >= ``min_ndim`` are listed, by
  path (e.g. ``stages/0/1/conv2/kernel``), with 0 for those the spec leaves alone.
  """
  graphdef, state = nnx.split(model)
  grads = _loss_grads(graphdef, state, batch, mean_std)
  fractions = optax_gc.gc_removed_fraction(grads, output_axis, min_ndim=min_ndim)
  params = nnx.state(model, nnx.Param)
  shares = {}
  for (path, p), (_, r) in zip(jax.tree_util.tree_leaves_with_path(params),
                               jax.tree_util.tree_leaves_with_path(fractions), strict=True):
    if p.ndim >= min_ndim:
      name = jax.tree_util.keystr(path, simple=True, separator="/").removesuffix("/value")
      shares[name] = float(r)
  return shares


def _summarize_shares(shares: dict[str, float]) -> str:
  """``stem 0.21 | stage1 0.15 | ... | head 0.03``: mean share per part of the network.

  ResNet stages are ``stage1, ...``, ViT blocks ``block1, ...``; other parts go by their name.
  """
  groups: dict[str, list[float]] = collections.defaultdict(list)
  for name, share in shares.items():
    parts = name.split("/")
    if parts[0] in ("stages", "blocks"):
      key = f"{parts[0][:-1]}{int(parts[1]) + 1}"
    else:
      key = parts[0].removesuffix("_conv")
    groups[key].append(share)
  order = sorted(groups, key=lambda k: (k != "stem", k == "head", k))  # stem, stages, head.
  return " | ".join(f"{k} {np.mean(groups[k]):.3f}" for k in order)


# ----------------------------------------------------------------------------------------------
# The loop.


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh, axis ``data``, over all devices (of all processes): pure data parallelism."""
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))


def _replicate(mesh: Mesh, *nodes: nnx.Module | nnx.Optimizer) -> None:
  """Places every array of ``nodes`` on all devices of ``mesh`` (parameters are replicated).

  Every process builds the same ``nodes`` from the same seed, so each places its own copy.
  """
  for node in nodes:
    nnx.update(node, _replicated_on(mesh, nnx.state(node))[0])


def _sum_metrics(per_step: list[dict[str, jax.Array]]) -> dict[str, float]:
  totals = jax.device_get(jax.tree.map(lambda *xs: jnp.sum(jnp.stack(xs)), *per_step))
  return _means(totals)


def _means(totals: dict[str, Any]) -> dict[str, float]:
  totals = jax.device_get(totals)
  return {"loss": float(totals["loss_sum"] / totals["count"]),
          "accuracy": float(totals["correct"] / totals["count"])}


def _replicated_on(mesh: Mesh, *trees: Any) -> tuple[Any, ...]:
  """Pytrees of arrays (the same in every process) replicated on every device of ``mesh``.

  With several processes each places its copy on its own devices only (``device_put`` cannot
  reach the others' devices).
  """
  replicated = NamedSharding(mesh, PartitionSpec())
  if jax.process_count() == 1:
    return tuple(jax.device_put(trees, replicated))
  return jax.tree.map(
      lambda a: jax.make_array_from_callback(np.shape(a), replicated, lambda index: a[index]),
      trees)


class Trainer:
  """A run's one jitted train step and one jitted eval step, and what they read on the devices.

  :func:`train_and_evaluate` builds one per run; tests and ``benchmarks/throughput.py`` build it
  the same way and call the same steps. It holds the graph definition, the shardings, the train
  split (uploaded once, replicated: each step gathers its batch on the devices, so no step moves
  data between host and device), the augmentation key and the normalization constants.
  ``model`` and ``optimizer`` hold the state between epochs.

  Args:
    model: the model, its arrays replicated on ``mesh``.
    optimizer: its ``nnx.Optimizer``, likewise.
    mesh: the devices, a 1-D mesh with axis ``data``.
    split: the training images and labels.
    config: the run (batch size, seed, augmentation, logging).
    rng: the augmentation key, replicated.
    mean_std: the per-channel mean and std, replicated.
    before_step: if given, called with the run's step number (1, 2, ..., counted across epochs)
      before each training step; tests use it to kill or pause a run at a given step.
  """

  def __init__(self, model: models.ResNet, optimizer: nnx.Optimizer, mesh: Mesh, split: Split,
               config: Config, rng: jax.Array, mean_std: jax.Array, *,
               before_step: Callable[[int], None] | None = None) -> None:
    self.model, self.optimizer, self.mesh, self.split = model, optimizer, mesh, split
    self.config, self.rng, self.mean_std, self.before_step = config, rng, mean_std, before_step
    graphdef, state = nnx.split((model, optimizer))
    self.treedef = jax.tree.structure(state)
    self.data = _replicated_on(mesh, split.images, split.labels)
    self.train_step = jax.jit(
        functools.partial(train_step, graphdef, self.treedef, config.augment,
                          NamedSharding(mesh, PartitionSpec("data"))),
        donate_argnums=0)
    self.eval_step = jax.jit(functools.partial(eval_step, nnx.graphdef(model)))

  def leaves(self) -> list[jax.Array]:
    """The model's and the optimizer's arrays, as :func:`train_step` takes them."""
    return jax.tree.leaves(nnx.state((self.model, self.optimizer)))

  def set_leaves(self, leaves: list[jax.Array]) -> None:
    """Puts :func:`train_step`'s output arrays back into the model and the optimizer."""
    nnx.update((self.model, self.optimizer), jax.tree.unflatten(self.treedef, leaves))

  def epoch_batches(self, epoch: int) -> tuple[jax.Array, jax.Array]:
    """The epoch's ``(idx, mask)``, each ``(steps, batch)``, shuffled by ``(seed, epoch)``, on
    the devices."""
    idx, mask = input_pipeline.train_batches(len(self.split), self.config.batch_size,
                                             self.config.seed, epoch)
    return _replicated_on(self.mesh, idx.astype(np.int32), mask)

  def zeros(self) -> tuple[dict[str, jax.Array], jax.Array]:
    """Zero ``totals`` and step index ``s = 0`` on the devices, for an epoch's first step."""
    *zeros, s = _replicated_on(self.mesh, *[np.zeros((), np.float32)] * 3,
                               np.zeros((), np.int32))
    return dict(zip(("loss_sum", "correct", "count"), zeros, strict=True)), s

  def train_epoch(self, epoch: int) -> dict[str, float]:
    """One pass over the split (shuffled by ``(seed, epoch)``); returns mean loss and accuracy.

    After the epoch's indices are uploaded, no step moves data between host and device (a test
    runs an epoch under ``jax.transfer_guard("disallow")``). The host reads the loss only every
    ``log_every_steps`` steps, and then the value of the previous such read, which is already
    computed: it never waits for the device in the middle of an epoch.

    Raises:
      TrainingDivergedError: the loss is not finite.
    """
    config = self.config
    idx, mask = self.epoch_batches(epoch)
    totals, s_dev = self.zeros()
    leaves = self.leaves()
    first_step = (epoch - 1) * len(idx) + 1
    pending: tuple[int, jax.Array, dict[str, jax.Array]] | None = None
    show = config.progress and jax.process_index() == 0
    try:
      with tqdm(total=len(idx), desc=f"epoch {epoch}/{config.epochs}", leave=False,
                disable=not show, dynamic_ncols=True) as bar:
        for s in range(len(idx)):
          if self.before_step is not None:
            self.before_step(first_step + s)
          leaves, totals, s_dev, loss = self.train_step(leaves, totals, self.data, idx, mask,
                                                        s_dev, self.rng, self.mean_std)
          if (s + 1) % config.log_every_steps == 0:
            if pending is not None:  # Computed long ago: reading it does not stall the device.
              seen_loss, seen_totals = jax.device_get((pending[1], pending[2]))
              _check_finite(float(seen_loss), epoch, pending[0])
              bar.set_postfix(loss=f"{float(seen_loss):.4f}",
                              acc=f"{_means(seen_totals)['accuracy']:.3f}", refresh=False)
            pending = (s + 1, loss, totals)
          bar.update()
    finally:  # The step donated the old arrays: hand the new ones back to the model.
      self.set_leaves(leaves)
    _check_finite(float(jax.device_get(loss)), epoch, len(idx))
    result = _means(totals)
    if not math.isfinite(result["loss"]):
      raise TrainingDivergedError(f"mean loss is {result['loss']} in epoch {epoch}")
    return result

  def evaluate(self, split: Split, batch_size: int) -> dict[str, float]:
    """Mean loss and accuracy over all of ``split`` (the last batch is padded and masked)."""
    idx, mask = input_pipeline.eval_batches(len(split), batch_size)
    state = nnx.state(self.model)
    return _sum_metrics([
        self.eval_step(state, input_pipeline.shard_batch(self.mesh, split, i, m), self.mean_std)
        for i, m in zip(idx, mask, strict=True)
    ])


def _check_finite(loss: float, epoch: int, step: int) -> None:
  if not math.isfinite(loss):
    raise TrainingDivergedError(f"loss is {loss} at epoch {epoch}, step {step}")


def train_and_evaluate(
    config: Config, workdir: str | Path, *, before_step: Callable[[int], None] | None = None
) -> dict[str, Any]:
  """Trains and evaluates every epoch, resuming from ``workdir`` if it holds a checkpoint.

  Nothing is written before the config, the workdir and the data have been checked. If the
  newest checkpoint does not restore (a truncated file, a half-written step), it is moved to
  ``<workdir>/checkpoints_broken/`` and the run resumes from the newest one that restores.

  Args:
    config: the run; see :class:`~examples.cifar.config.Config`.
    workdir: where metrics, checkpoints and the summary go.
    before_step: passed to :class:`Trainer`: called with the step number before each step.

  Returns:
    The summary (also written to ``<workdir>/summary.json``): ``final_test_accuracy``,
    ``best_test_accuracy``, ``best_epoch``, ``final_train_loss``, ..., and ``config``.

  Raises:
    TrainingDivergedError: the loss became NaN/Inf (the last good checkpoint stays).
    DataError: the data is missing or unreadable.
    ValueError: a bad config; ``workdir`` is (or is under) a file, holds a run with a different
      config or process count, or holds checkpoints none of which restores; or (raised in every
      process) the processes were started with different configs.
  """
  config = config.resolved()
  if config.distributed:
    _initialize_distributed(config)
  _check_processes_agree(config)  # As started: JAX takes process 0's count and ignores others'.
  config = dataclasses.replace(config, num_processes=jax.process_count())
  workdir = Path(workdir).absolute()
  chief = jax.process_index() == 0
  verdict = ""  # Process 0 checks the workdir and every process raises its error.
  if chief:
    try:
      check_workdir(workdir)
      _check_config(workdir, config)
    except ValueError as e:
      verdict = str(e)
  if verdict := _gather_text(verdict)[0]:
    raise ValueError(verdict)

  data = input_pipeline.load_dataset(config.dataset, config.data_dir,
                                     allow_unverified=config.allow_unverified_data)
  if chief:  # The first thing written: after the config, the workdir and the data are checked.
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
  train_split = data.train
  if config.train_subset is not None:
    train_split = input_pipeline.stratified_subset(train_split, config.train_subset)
  mean_std = jnp.asarray([data.mean, data.std], jnp.float32)

  mesh = make_mesh()
  if config.batch_size % mesh.size:
    raise ValueError(f"--batch-size {config.batch_size} must be divisible by the {mesh.size} "
                     "devices.")
  eval_batch_size = -(-min(config.eval_batch_size, len(data.test)) // mesh.size) * mesh.size
  steps_per_epoch = -(-len(train_split) // config.batch_size)

  model = models.create_model(config.model, data.num_classes, config.seed)
  output_axis = gc_output_axes(config, model, train_split.images.shape[1:])
  muon_dims = (muon_dimension_numbers(config, model, train_split.images.shape[1:])
               if config.optimizer == "muon" else None)
  tx = make_optimizer(config, steps_per_epoch, output_axis, muon_dims)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  _replicate(mesh, model, optimizer)
  schedule = make_learning_rate(config, steps_per_epoch)
  rng = jax.random.fold_in(jax.random.key(config.seed), 1 << 30)  # Apart from init's keys.
  rng, mean_std = _replicated_on(mesh, rng, mean_std)

  log = tqdm.write if chief else (lambda _: None)
  checkpoints, start_epoch = _restore_newest(workdir, model, optimizer, config, chief)
  history = _load_history(workdir / "metrics.jsonl", upto=start_epoch, rewrite=chief)
  if len(history) != start_epoch:
    log(f"note: {workdir / 'metrics.jsonl'} holds {len(history)} of the {start_epoch} "
        "checkpointed epochs; the summary covers only those.")

  num_params = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  log(f"{config.dataset} ({data.source}): {len(train_split)} train / {len(data.test)} test | "
      f"{config.model} ({num_params / 1e6:.2f}M params) | {config.optimizer} gc={config.gc} "
      f"({config.gc_location}, {config.gc_axes} axes) | {mesh.size} device(s), "
      f"{jax.devices()[0].platform}"
      + (f", {jax.process_count()} processes | " if jax.process_count() > 1 else " | ")
      + (f"resuming after epoch {start_epoch}" if start_epoch else f"workdir {workdir}"))

  trainer = Trainer(model, optimizer, mesh, train_split, config, rng, mean_std,
                    before_step=before_step)
  for epoch in range(start_epoch + 1, config.epochs + 1):
    start = time.perf_counter()
    if epoch == 1 or epoch % config.gc_log_every_epochs == 0:
      _log_gc_shares(model, mesh, train_split, config, epoch, mean_std, workdir, log, chief,
                     output_axis)
    try:
      train = trainer.train_epoch(epoch)
    except TrainingDivergedError as e:
      last = checkpoints.latest_step()
      where = f"epoch {last} in {workdir / 'checkpoints'}" if last else "none (no epoch finished)"
      raise TrainingDivergedError(
          f"training diverged: {e}. Last good checkpoint: {where}. Lower --lr (or add "
          "--warmup-epochs) and use a new --workdir.") from None
    train_seconds = time.perf_counter() - start
    test = trainer.evaluate(data.test, eval_batch_size)
    record = {
        "epoch": epoch,
        "train_loss": train["loss"], "train_accuracy": train["accuracy"],
        "test_loss": test["loss"], "test_accuracy": test["accuracy"],
        "learning_rate": float(schedule((epoch - 1) * steps_per_epoch)),
        "images_per_sec": len(train_split) / train_seconds,
        "seconds": time.perf_counter() - start,
    }
    history.append(record)
    if chief:
      with open(workdir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    checkpoints.save(
        epoch, args=ocp.args.StandardSave({"model": nnx.state(model),
                                            "optimizer": nnx.state(optimizer)}))
    log(f"epoch {epoch:3d}/{config.epochs} | train loss {train['loss']:.4f} acc "
        f"{train['accuracy']:.4f} | test loss {test['loss']:.4f} acc {test['accuracy']:.4f} | "
        f"lr {record['learning_rate']:.4g} | {record['images_per_sec']:.0f} img/s | "
        f"{record['seconds']:.1f} s")
  checkpoints.close()

  summary = _summary(history, config, num_params=num_params, num_devices=mesh.size,
                     source=data.source, workdir=workdir)
  if chief:
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  return summary


def _checkpoint_manager(workdir: Path, config: Config) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      workdir / "checkpoints",
      options=ocp.CheckpointManagerOptions(
          max_to_keep=config.checkpoints_to_keep, create=True, enable_async_checkpointing=False),
  )


def _restore_newest(workdir: Path, model: models.ResNet, optimizer: nnx.Optimizer,
                    config: Config, chief: bool) -> tuple[ocp.CheckpointManager, int]:
  """Restores the newest checkpoint that restores; returns the manager and its epoch (0: none).

  Newer checkpoints that fail to restore are moved (never deleted) to
  ``<workdir>/checkpoints_broken/<epoch>``, each with a one-line warning. If checkpoints exist but
  none restores, nothing is moved and a ``ValueError`` names the folder.
  """
  checkpoints = _checkpoint_manager(workdir, config)
  target = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
  broken: list[tuple[int, str]] = []
  for step in sorted(checkpoints.all_steps(), reverse=True):
    try:
      restored = checkpoints.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as e:  # Any failure: this step cannot be resumed from.
      broken.append((step, f"{type(e).__name__}: {_first_line(e)}"))
      continue
    nnx.update(model, restored["model"])
    nnx.update(optimizer, restored["optimizer"])
    if not broken:
      return checkpoints, step
    checkpoints.close()
    for bad, reason in broken:
      if chief:
        moved = _move_aside(workdir / "checkpoints" / str(bad), workdir / "checkpoints_broken")
        print(f"warning: checkpoint {bad} in {workdir / 'checkpoints'} does not restore "
              f"({reason}); moved it to {moved}; resuming from checkpoint {step}.",
              file=sys.stderr, flush=True)
    if jax.process_count() > 1:  # The others wait until process 0 has moved them.
      multihost_utils.sync_global_devices("moved broken checkpoints aside")
    return _checkpoint_manager(workdir, config), step
  if broken:
    checkpoints.close()
    reasons = "; ".join(f"{step}: {reason}" for step, reason in broken)
    raise ValueError(f"no checkpoint in {workdir / 'checkpoints'} restores ({reasons}); move "
                     "that folder aside to start over, or use a new --workdir.")
  return checkpoints, 0


def _first_line(error: BaseException, limit: int = 120) -> str:
  """The first line of ``error``'s message, cut to ``limit`` characters."""
  text = (str(error).strip().splitlines() or [""])[0]
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _move_aside(path: Path, folder: Path) -> Path:
  """Moves ``path`` into ``folder`` (created), under a name not taken yet; returns the new path."""
  folder.mkdir(parents=True, exist_ok=True)
  target, n = folder / path.name, 1
  while target.exists():
    target, n = folder / f"{path.name}.{n}", n + 1
  return Path(shutil.move(path, target))


def _log_gc_shares(model: models.ResNet, mesh: Mesh, split: Split, config: Config, epoch: int,
                   mean_std: jax.Array, workdir: Path, log: Any, chief: bool,
                   output_axis: Any) -> None:
  """Logs, on the epoch's first batch, the per-kernel share of the gradient GC would remove."""
  idx, mask = input_pipeline.train_batches(len(split), config.batch_size, config.seed, epoch)
  batch = input_pipeline.shard_batch(mesh, split, idx[0], mask[0])
  min_ndim = 3 if config.gc == "gcc" else 2
  shares = gc_removed_share(model, batch, mean_std, min_ndim, output_axis)
  log(f"epoch {epoch:3d} GC share of gradient norm "
      f"({'acting' if config.gc != 'none' else 'not applied'}): {_summarize_shares(shares)}")
  if chief:
    with open(workdir / "gc_diagnostics.jsonl", "a") as f:
      f.write(json.dumps({"epoch": epoch, "min_ndim": min_ndim, "shares": shares}) + "\n")


def _initialize_distributed(config: Config) -> None:
  """Joins the other processes (once per interpreter): the given address, count and id, and
  whatever of them is not given detected from SLURM, Open MPI, Kubernetes or a TPU slice.

  ``config.distributed_timeout`` bounds the wait for every process to connect and, through the
  heartbeat timeout, how long the others run on after one stops answering.
  """
  if jax.distributed.is_initialized():
    return
  timeout = config.distributed_timeout
  try:
    jax.distributed.initialize(
        config.coordinator_address, config.num_processes, config.process_id,
        initialization_timeout=timeout, heartbeat_timeout_seconds=timeout,
        shutdown_timeout_seconds=timeout)
  except ValueError as e:  # Not in a cluster JAX knows, and not every flag given.
    raise ValueError(
        f"--distributed: {e} No SLURM, Open MPI, Kubernetes or TPU-slice environment was "
        "found; pass --coordinator-address HOST:PORT --num-processes N --process-id I.") from None


def _gather_text(text: str) -> list[str]:
  """``text`` from every process, in process order; every process must call it (a collective)."""
  if jax.process_count() == 1:
    return [text]
  data = np.frombuffer(text.encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.int32(len(data)))
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:len(data)] = data
  rows = multihost_utils.process_allgather(padded)
  return [bytes(row[:n]).decode() for row, n in zip(rows, lengths, strict=True)]


def _check_processes_agree(config: Config) -> None:
  """Raises, in every process, if the processes were started with different configs.

  Only ``process_id`` and ``data_dir`` (hosts may keep the data in different places) may differ:
  even bookkeeping such as ``gc_log_every_epochs`` decides which collectives a process runs.
  """
  mine = {k: v for k, v in config.to_dict().items() if k not in ("process_id", "data_dir")}
  first, *others = (json.loads(t) for t in _gather_text(json.dumps(mine)))
  for i, other in enumerate(others, start=1):
    diffs = [f"{k}: {first.get(k)!r} in process 0, {other.get(k)!r} in process {i}"
             for k in sorted(first.keys() | other.keys()) if first.get(k) != other.get(k)]
    if diffs:
      raise ValueError(f"the processes were started with different configs ({'; '.join(diffs)}); "
                       "start every process with the same flags.")


def check_workdir(workdir: Path) -> None:
  """Raises a one-line ``ValueError`` if ``workdir`` is a file or lies under one (creates nothing).
  """
  for path in (workdir, *workdir.parents):
    if path.exists():
      if not path.is_dir():
        where = "is a file" if path == workdir else f"is under {path}, which is a file"
        raise ValueError(f"--workdir {workdir} {where}; give a folder.")
      return


def _check_config(workdir: Path, config: Config) -> None:
  """Checks that a resumed run (``workdir/config.json``) has the same trajectory config."""
  path = workdir / "config.json"
  if not path.exists():
    return
  new = config.to_dict()
  try:
    old = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path} does not read ({_first_line(e)}); use a new --workdir.") from None
  old.setdefault("num_processes", 1)  # Written before runs recorded it: by one process.
  # A field added to Config since the run started had its default then (--muon-dims, ...).
  old = {**{k: v for k, v in Config().to_dict().items() if k not in old}, **old}
  if old["num_processes"] != new["num_processes"]:
    raise ValueError(
        f"{workdir} holds a run trained by {old['num_processes']} process(es); this launch "
        f"has {new['num_processes']}. Resume it with {old['num_processes']}, or use a new "
        "--workdir.")
  diffs = {k: (old.get(k), v) for k, v in new.items()
           if k not in BOOKKEEPING_FIELDS and old.get(k) != v}
  if diffs:
    changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diffs.items())
    raise ValueError(f"{workdir} holds a run with another config ({changes}); use a new "
                     "--workdir, or the original flags to resume.")


def _load_history(path: Path, upto: int, rewrite: bool) -> list[dict[str, Any]]:
  """The metrics of epochs ``1..upto``; later lines (written after the last checkpoint) go."""
  history = []
  if path.exists():
    for line in path.read_text().splitlines():
      try:
        record = json.loads(line)
      except json.JSONDecodeError:  # A line cut short by a kill.
        continue
      if record.get("epoch", upto + 1) <= upto:
        history.append(record)
  if rewrite:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
    tmp.replace(path)
  return history


def _summary(history: list[dict[str, Any]], config: Config, **extra: Any) -> dict[str, Any]:
  empty = {"epoch": 0, "test_accuracy": None, "test_loss": None, "train_loss": None,
           "train_accuracy": None}
  best = max(history, key=lambda r: r["test_accuracy"]) if history else empty
  final = history[-1] if history else empty
  return {
      "final_test_accuracy": final["test_accuracy"],
      "best_test_accuracy": best["test_accuracy"],
      "best_epoch": best["epoch"],
      "final_test_loss": final["test_loss"],
      "final_train_loss": final["train_loss"],
      "final_train_accuracy": final["train_accuracy"],
      "epochs": final["epoch"],
      "total_seconds": sum(r["seconds"] for r in history),
      **{k: str(v) if isinstance(v, Path) else v for k, v in extra.items()},
      "config": config.to_dict(),
  }


# ----------------------------------------------------------------------------------------------
# Command line.


def default_workdir(config: Config) -> Path:
  """``workdirs/cifar/<dataset>_<model>_<optimizer>_<gc>[_update][_axes-<gc_axes>]_seed<seed>``.

  Under the cwd; ``_axes-...`` only for GC with non-default ``gc_axes``.
  """
  gc = config.gc != "none"
  location = "_update" if config.gc_location == "update" and gc else ""
  axes = f"_axes-{config.gc_axes}" if gc and config.gc_axes != Config().gc_axes else ""
  return Path("workdirs", "cifar", f"{config.dataset}_{config.model}_{config.optimizer}_"
                                   f"{config.gc}{location}{axes}_seed{config.seed}")


def main(argv: list[str] | None = None, *,
         before_step: Callable[[int], None] | None = None) -> int:
  """Parses flags, trains, prints the summary; returns the exit status.

  ``before_step`` is passed to :func:`train_and_evaluate` (tests use it to stop a run).
  """
  parser = argparse.ArgumentParser(
      prog="python -m examples.cifar.train",
      description="Train a ResNet or ViT with Gradient Centralization (optax_gc) on CIFAR-10/100 "
                  "or the offline digits set. Rerun with the same --workdir to resume.")
  add_flags(parser)
  parser.add_argument("--workdir", help="output folder (default: workdirs/cifar/<dataset>_"
                                        "<model>_<optimizer>_<gc>_seed<seed>)")
  args = parser.parse_args(argv)
  try:
    config = config_from_flags(args)
    summary = train_and_evaluate(config, args.workdir or default_workdir(config),
                                 before_step=before_step)
  except (TrainingDivergedError, ValueError) as e:  # Raised in every process alike.
    return _fail(str(e))
  except DataError as e:  # Perhaps in this process only.
    return _fail(str(e), at_once=True)
  except jax.errors.JaxRuntimeError as e:
    if not jax.distributed.is_initialized():
      raise
    detail = str(e).strip().splitlines()[0].rsplit("Error dispatching computation: ", 1)[-1]
    return _fail(f"a computation across processes failed ({detail}); most likely another "
                 "process stopped: see its output.", at_once=True)
  except BaseException:
    if jax.distributed.is_initialized():  # Do not leave the other processes waiting.
      traceback.print_exc()
      _fail("stopped on the exception above.", at_once=True)
    raise
  if jax.process_index() == 0:
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
  return 0


def _fail(message: str, at_once: bool = False) -> int:
  """Prints ``error: message``; returns 1, or exits now when ``at_once`` with several processes.

  At a normal exit, ``jax.distributed`` waits for every process to exit too, and a process that
  failed alone would leave the others blocked in their next collective for the heartbeat timeout.
  Exiting at once closes its connections, so theirs fail (and they stop) straight away.
  """
  print(f"error: {message}", file=sys.stderr, flush=True)
  if at_once and jax.distributed.is_initialized():
    sys.stdout.flush()
    os._exit(1)
  return 1


if __name__ == "__main__":
  sys.exit(main())
