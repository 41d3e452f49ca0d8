"""Trains a ResNet or ViT with optax_gc on CIFAR-10/100 or digits: data-parallel, resumable.

Run ``python -m examples.cifar.train --help`` (the README has the commands). From Python::

    from examples.cifar.config import Config
    from examples.cifar.train import train_and_evaluate
    summary = train_and_evaluate(Config(dataset="digits", model="tiny", epochs=2), "/tmp/run")

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
import sys
import time
import traceback
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
from examples.cifar.config import BOOKKEEPING_FIELDS, Config, add_flags, config_from_flags
from examples.cifar.input_pipeline import Batch, DataError, Split

__all__ = [
    "TrainingDivergedError", "make_learning_rate", "gc_output_axes", "make_optimizer", "make_mesh",
    "train_step_fn", "train_step", "flat_train_step", "eval_step", "gc_removed_share",
    "train_epoch", "evaluate", "train_and_evaluate", "main",
    "TRACE_COUNTS",
]

TRACE_COUNTS: collections.Counter[str] = collections.Counter()
"""How many times each jitted step was traced (compiled); tests check it stays at one per run."""


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
  """The ``output_axis`` that :func:`make_optimizer` gives GC, as ``config.gc_axes`` asks.

  Args:
    config: the run; only ``gc_axes`` matters.
    model: the model to train.
    image_shape: one input image's shape, ``(height, width, channels)``.

  Returns:
    For ``inferred``, the spec tree that ``optax_gc.nnx_output_axes`` reads from the model's
    ``model(x, train=True)`` (traced on a ``jax.ShapeDtypeStruct``: nothing is computed). For
    ``last``, ``-1``. For ``optax``, ``0``: the axis ``optax.centralize()`` keeps (the optimizer
    uses ``optax.centralize()`` itself; the ``0`` serves the GC diagnostics).
  """
  if config.gc_axes == "last":
    return -1
  if config.gc_axes == "optax":
    return 0
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  return optax_gc.nnx_output_axes(model, x, train=True)


def make_optimizer(
    config: Config, steps_per_epoch: int, output_axis: Any = -1
) -> optax.GradientTransformation:
  """The Optax chain for ``config``: an ``optax_gc`` alias, or the same chain without it.

  ``--gc none`` builds exactly the alias's chain minus the centralization step, so the arms
  differ only by GC:

  ========  ===================================================================================
  sgd       add_decayed_weights -> [centralize] -> trace (PyTorch momentum) -> scale by lr
  adam      add_decayed_weights -> [centralize] -> scale_by_adam -> scale by lr
  adamw     [centralize] -> scale_by_adam -> add_decayed_weights (decoupled) -> scale by lr
  ========  ===================================================================================

  With ``gc_location="update"`` Adam/AdamW centralize the final update instead (before the lr
  scaling). For SGD both locations give the same update (GC and momentum are linear), so SGD
  always centralizes the gradient. With ``gc_axes="optax"`` the same chain holds the literal
  ``optax.centralize()`` (keeps axis 0, PyTorch's rule) in place of ``optax_gc``'s.

  Args:
    config: the run.
    steps_per_epoch: optimizer steps per epoch (for the learning-rate schedule).
    output_axis: the output axes GC keeps, as every ``optax_gc`` alias takes them: an int, a
      tuple, or a spec tree (:func:`gc_output_axes`). Unused for ``gc="none"`` and
      ``gc_axes="optax"``.

  Returns:
    The :class:`optax.GradientTransformation`.
  """
  config = config.resolved()
  lr = make_learning_rate(config, steps_per_epoch)
  wd = config.weight_decay
  if config.gc == "none" or config.gc_axes == "optax":
    gc = optax.centralize() if config.gc != "none" else None
    on_update = gc is not None and config.gc_location == "update" and config.optimizer != "sgd"
    at_gradient, at_update = (None, gc) if on_update else (gc, None)
    if config.optimizer == "sgd":
      chain = [optax.add_decayed_weights(wd), at_gradient,
               optax.trace(decay=config.momentum, nesterov=config.nesterov)]
    elif config.optimizer == "adam":
      chain = [optax.add_decayed_weights(wd), at_gradient,
               optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps)]
    else:
      chain = [at_gradient, optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps),
               optax.add_decayed_weights(wd)]
    chain += [at_update, optax.scale_by_learning_rate(lr)]
    return optax.chain(*[t for t in chain if t is not None])
  gc_options = dict(conv_only=config.gc == "gcc", output_axis=output_axis)
  if config.optimizer == "sgd":
    return optax_gc.gc_sgd(lr, config.momentum, config.nesterov, weight_decay=wd, **gc_options)
  gc_options["centralize_update"] = config.gc_location == "update"
  alias = optax_gc.gc_adam if config.optimizer == "adam" else optax_gc.gc_adamw
  return alias(lr, config.b1, config.b2, config.eps, weight_decay=wd, **gc_options)


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


def train_step_fn(
    model: models.ResNet,
    optimizer: nnx.Optimizer,
    batch: Batch,
    rng: jax.Array,
    mean_std: jax.Array,
    augment: str = "crop_flip",
) -> dict[str, jax.Array]:
  """One optimizer step on ``batch`` (unjitted); updates ``model`` and ``optimizer`` in place.

  The augmentation key is ``fold_in(rng, optimizer.step)``, so a resumed run draws the same crops.
  Returns the batch's ``loss`` and the sums ``loss_sum``, ``correct``, ``count``. Use it jitted:
  :func:`train_step` (simplest), :func:`flat_train_step`, or :func:`resident_train_step` (what
  the training loop uses).
  """
  TRACE_COUNTS["train_step"] += 1
  images = batch.images
  if augment != "none":
    key = jax.random.fold_in(rng, optimizer.step[...])
    images = input_pipeline.augment(images, key, flip=augment == "crop_flip")
  x = input_pipeline.normalize(images, mean_std)

  def loss_fn(model: models.ResNet) -> tuple[jax.Array, dict[str, jax.Array]]:
    return _loss_and_metrics(model(x, train=True), batch.labels, batch.mask)

  grads, metrics = nnx.grad(loss_fn, has_aux=True)(model)
  optimizer.update(model, grads)
  return metrics


train_step = nnx.jit(train_step_fn, static_argnames=("augment",))
"""``train_step_fn`` under ``nnx.jit``: ``train_step(model, optimizer, batch, rng, mean_std)``."""


@functools.lru_cache(maxsize=8)
def flat_train_step(graphdef: nnx.GraphDef, treedef: Any, augment: str) -> Any:
  """``train_step_fn`` jitted over the flat list of model + optimizer arrays (donated).

  ``nnx.jit`` walks the module graph on every call, which costs milliseconds per step for deep
  models on a GPU; a plain ``jax.jit`` over a list of arrays does not. Usage, for
  ``graphdef, state = nnx.split((model, optimizer))`` and ``leaves, treedef =
  jax.tree.flatten(state)``: ``leaves, metrics = flat_train_step(graphdef, treedef, augment)(
  leaves, batch, rng, mean_std)``, then ``nnx.update((model, optimizer), jax.tree.unflatten(
  treedef, leaves))``. Cached, so every epoch of a run reuses one compiled step.
  """

  return jax.jit(_flat_step_fn(graphdef, treedef, augment), donate_argnums=0)


def _flat_step_fn(graphdef: nnx.GraphDef, treedef: Any, augment: str) -> Any:
  """``train_step_fn`` over the flat list of model + optimizer arrays (unjitted)."""

  def step(leaves: list[jax.Array], batch: Batch, rng: jax.Array, mean_std: jax.Array
           ) -> tuple[list[jax.Array], dict[str, jax.Array]]:
    model, optimizer = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    metrics = train_step_fn(model, optimizer, batch, rng, mean_std, augment)
    return jax.tree.leaves(nnx.state((model, optimizer))), metrics

  return step


@functools.lru_cache(maxsize=8)
def resident_train_step(
    graphdef: nnx.GraphDef, treedef: Any, augment: str, batch_sharding: NamedSharding
) -> Any:
  """:func:`flat_train_step` that takes its batch from a dataset already on the devices.

  ``leaves, totals, s, loss = resident_train_step(graphdef, treedef, augment, batch_sharding)(
  leaves, totals, data, idx, mask, s, rng, mean_std)``: ``data = (images, labels)`` and the
  epoch's ``idx``/``mask`` (``(steps, batch)``) are replicated on every device once per epoch;
  step ``s`` (an int32 scalar on the devices, returned as ``s + 1``) gathers its rows on the
  device and shards them along ``data``. ``totals`` accumulates the epoch's ``loss_sum``,
  ``correct`` and ``count`` on the device. So a step moves nothing between host and device, and
  a fast accelerator is never left waiting for batches.
  """

  def step(leaves: list[jax.Array], totals: dict[str, jax.Array],
           data: tuple[jax.Array, jax.Array], idx: jax.Array, mask: jax.Array, s: jax.Array,
           rng: jax.Array, mean_std: jax.Array
           ) -> tuple[list[jax.Array], dict[str, jax.Array], jax.Array, jax.Array]:
    rows = idx[s]
    batch = Batch(data[0][rows], data[1][rows], mask[s])
    batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
    leaves, metrics = flat_step(leaves, batch, rng, mean_std)
    totals = {k: totals[k] + metrics[k] for k in totals}
    return leaves, totals, s + 1, metrics["loss"]

  flat_step = _flat_step_fn(graphdef, treedef, augment)
  return jax.jit(step, donate_argnums=0)


@nnx.jit
def eval_step(model: models.ResNet, batch: Batch, mean_std: jax.Array) -> dict[str, jax.Array]:
  """Loss and accuracy sums on ``batch`` with BatchNorm's running averages."""
  TRACE_COUNTS["eval_step"] += 1
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


_RESIDENT: list[tuple[Mesh, Split, tuple[jax.Array, jax.Array]]] = []


def _resident(mesh: Mesh, split: Split) -> tuple[jax.Array, jax.Array]:
  """``split``'s images and labels on the devices, uploaded once and reused every epoch.

  Only the most recent split is kept, so the device memory of an earlier run is released.
  """
  for m, cached, arrays in _RESIDENT:
    if m is mesh and cached is split:
      return arrays
  _RESIDENT[:] = [(mesh, split, _replicated_on(mesh, split.images, split.labels))]
  return _RESIDENT[0][2]


def train_epoch(
    model: models.ResNet, optimizer: nnx.Optimizer, mesh: Mesh, split: Split, config: Config,
    epoch: int, rng: jax.Array, mean_std: jax.Array,
) -> dict[str, float]:
  """One pass over ``split`` (shuffled by ``(seed, epoch)``); returns mean loss and accuracy.

  The split lives on the devices (uploaded on first use) and each step gathers its batch there
  (:func:`resident_train_step`); the step counter lives there too. After the epoch's indices are
  uploaded, no step moves data between host and device (a test runs an epoch under
  ``jax.transfer_guard("disallow")``). The host reads the loss only every ``log_every_steps``
  steps, and then the value of the previous such read, which is already computed: it never waits
  for the device in the middle of an epoch.

  Raises:
    TrainingDivergedError: the loss is not finite.
  """
  idx, mask = input_pipeline.train_batches(len(split), config.batch_size, config.seed, epoch)
  data = _resident(mesh, split)
  idx, mask = _replicated_on(mesh, idx.astype(np.int32), mask)
  graphdef, state = nnx.split((model, optimizer))
  leaves, treedef = jax.tree.flatten(state)
  step_fn = resident_train_step(graphdef, treedef, config.augment,
                                NamedSharding(mesh, PartitionSpec("data")))
  names = ("loss_sum", "correct", "count")
  *zeros, s_dev = _replicated_on(mesh, *[np.zeros((), np.float32)] * 3, np.zeros((), np.int32))
  totals = dict(zip(names, zeros, strict=True))
  pending: tuple[int, jax.Array, dict[str, jax.Array]] | None = None
  show = config.progress and jax.process_index() == 0
  try:
    with tqdm(total=len(idx), desc=f"epoch {epoch}/{config.epochs}", leave=False,
              disable=not show, dynamic_ncols=True) as bar:
      for s in range(len(idx)):
        leaves, totals, s_dev, loss = step_fn(leaves, totals, data, idx, mask, s_dev, rng,
                                              mean_std)
        if (s + 1) % config.log_every_steps == 0:
          if pending is not None:  # Computed long ago: reading it does not stall the device.
            seen_loss, seen_totals = jax.device_get((pending[1], pending[2]))
            _check_finite(float(seen_loss), epoch, pending[0])
            bar.set_postfix(loss=f"{float(seen_loss):.4f}",
                            acc=f"{_means(seen_totals)['accuracy']:.3f}", refresh=False)
          pending = (s + 1, loss, totals)
        bar.update()
  finally:  # The step donated the old arrays: hand the new ones back to the model.
    nnx.update((model, optimizer), jax.tree.unflatten(treedef, leaves))
  _check_finite(float(jax.device_get(loss)), epoch, len(idx))
  result = _means(totals)
  if not math.isfinite(result["loss"]):
    raise TrainingDivergedError(f"mean loss is {result['loss']} in epoch {epoch}")
  return result


def _check_finite(loss: float, epoch: int, step: int) -> None:
  if not math.isfinite(loss):
    raise TrainingDivergedError(f"loss is {loss} at epoch {epoch}, step {step}")


def evaluate(model: models.ResNet, mesh: Mesh, split: Split, batch_size: int,
             mean_std: jax.Array) -> dict[str, float]:
  """Mean loss and accuracy over all of ``split`` (the last batch is padded and masked)."""
  idx, mask = input_pipeline.eval_batches(len(split), batch_size)
  step_fn = nnx.cached_partial(eval_step, model)
  return _sum_metrics([
      step_fn(input_pipeline.shard_batch(mesh, split, i, m), mean_std)
      for i, m in zip(idx, mask, strict=True)
  ])


def train_and_evaluate(config: Config, workdir: str | Path) -> dict[str, Any]:
  """Trains and evaluates every epoch, resuming from ``workdir`` if it holds a checkpoint.

  Args:
    config: the run; see :class:`~examples.cifar.config.Config`.
    workdir: where metrics, checkpoints and the summary go.

  Returns:
    The summary (also written to ``<workdir>/summary.json``): ``final_test_accuracy``,
    ``best_test_accuracy``, ``best_epoch``, ``final_train_loss``, ..., and ``config``.

  Raises:
    TrainingDivergedError: the loss became NaN/Inf (the last good checkpoint stays).
    DataError: the data is missing or unreadable.
    ValueError: a bad config, ``workdir`` holds a run with a different config or process count,
      or (raised in every process) the processes were started with different configs.
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
      _check_or_write_config(workdir, config)
    except ValueError as e:
      verdict = str(e)
  if verdict := _gather_text(verdict)[0]:
    raise ValueError(verdict)

  data = input_pipeline.load_dataset(config.dataset, config.data_dir,
                                     allow_unverified=config.allow_unverified_data)
  train_split = data.train
  if config.train_subset is not None:
    train_split = input_pipeline.stratified_subset(train_split, config.train_subset)
  mean_std = jnp.asarray([data.mean, data.std], jnp.float32)

  mesh = make_mesh()
  if config.batch_size % mesh.size:
    raise ValueError(f"batch size {config.batch_size} must be divisible by the {mesh.size} "
                     "devices.")
  eval_batch_size = -(-min(config.eval_batch_size, len(data.test)) // mesh.size) * mesh.size
  steps_per_epoch = -(-len(train_split) // config.batch_size)

  model = models.create_model(config.model, data.num_classes, config.seed)
  output_axis = gc_output_axes(config, model, train_split.images.shape[1:])
  tx = make_optimizer(config, steps_per_epoch, output_axis)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  _replicate(mesh, model, optimizer)
  schedule = make_learning_rate(config, steps_per_epoch)
  rng = jax.random.fold_in(jax.random.key(config.seed), 1 << 30)  # Apart from init's keys.
  rng, mean_std = _replicated_on(mesh, rng, mean_std)

  checkpoints = ocp.CheckpointManager(
      workdir / "checkpoints",
      options=ocp.CheckpointManagerOptions(
          max_to_keep=config.checkpoints_to_keep, create=True, enable_async_checkpointing=False),
  )
  start_epoch = checkpoints.latest_step() or 0
  if start_epoch:
    state = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
    restored = checkpoints.restore(start_epoch, args=ocp.args.StandardRestore(state))
    nnx.update(model, restored["model"])
    nnx.update(optimizer, restored["optimizer"])
  history = _load_history(workdir / "metrics.jsonl", upto=start_epoch, rewrite=chief)
  log = tqdm.write if chief else (lambda _: None)
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

  for epoch in range(start_epoch + 1, config.epochs + 1):
    start = time.perf_counter()
    if epoch == 1 or epoch % max(config.gc_log_every_epochs, 1) == 0:
      _log_gc_shares(model, mesh, train_split, config, epoch, mean_std, workdir, log, chief,
                     output_axis)
    try:
      train = train_epoch(model, optimizer, mesh, train_split, config, epoch, rng, mean_std)
    except TrainingDivergedError as e:
      last = checkpoints.latest_step()
      where = f"epoch {last} in {workdir / 'checkpoints'}" if last else "none (no epoch finished)"
      raise TrainingDivergedError(
          f"training diverged: {e}. Last good checkpoint: {where}. Lower --lr (or add "
          "--warmup-epochs) and use a new --workdir.") from None
    train_seconds = time.perf_counter() - start
    test = evaluate(model, mesh, data.test, eval_batch_size, mean_std)
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


def _check_or_write_config(workdir: Path, config: Config) -> None:
  """Writes ``config.json``, or checks that a resumed run has the same trajectory config."""
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / "config.json"
  new = config.to_dict()
  if path.exists():
    old = json.loads(path.read_text())
    old.setdefault("num_processes", 1)  # Written before runs recorded it: by one process.
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
  path.write_text(json.dumps(new, indent=2) + "\n")


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


def main(argv: list[str] | None = None) -> int:
  """Parses flags, trains, prints the summary; returns the exit status."""
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
    summary = train_and_evaluate(config, args.workdir or default_workdir(config))
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
