"""The same idea for Flax Linen users: a ``TrainState`` whose ``tx`` is an ``optax_gc`` chain.

    python -m examples.cifar.linen --gc gc --epochs 3      # digits, offline

GC needs nothing from the model library: ``optax_gc.gc_sgd`` (or
``optax.chain(optax_gc.centralize(), ...)``) goes wherever an Optax optimizer goes. Linen kernels
use the same layout as NNX, ``(kh, kw, in, out)`` and ``(in, out)``, so the default
``output_axis=-1`` is right. This file keeps to what differs from the NNX example (model, state,
step); data and augmentation are shared. It takes about 15 s on 2 CPU cores.
"""

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.training import train_state

import optax_gc
from examples.cifar import input_pipeline
from examples.cifar.config import GC_MODES

__all__ = ["CNN", "TrainState", "make_tx", "create_train_state", "train_step", "eval_step",
           "train"]


class CNN(nn.Module):
  """Three conv-BN-ReLU stages (stride 2 after the first), global pooling, dense head."""

  num_classes: int = 10
  widths: tuple[int, ...] = (16, 32, 64)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for i, width in enumerate(self.widths):
      x = nn.Conv(width, (3, 3), strides=1 if i == 0 else 2, use_bias=False)(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class TrainState(train_state.TrainState):
  """``TrainState`` plus BatchNorm's running statistics."""

  batch_stats: Any


def make_tx(gc: str, learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
  """SGD with momentum 0.9 and coupled weight decay 5e-4: with GC (``gc``/``gcc``) or without.

  Without GC (``gc="none"``) it is the same alias with ``output_axis=None``: GC leaves every
  parameter alone, and the chain is plain SGD.
  """
  return optax_gc.gc_sgd(learning_rate=learning_rate, momentum=0.9, weight_decay=5e-4,
                         output_axis=None if gc == "none" else -1, conv_only=gc == "gcc")


def create_train_state(seed: int, tx: optax.GradientTransformation, num_classes: int,
                       image_shape: tuple[int, ...] = (32, 32, 3)) -> TrainState:
  """Initializes the model's parameters and batch statistics from ``seed``."""
  model = CNN(num_classes)
  variables = model.init(jax.random.key(seed), jnp.zeros((1, *image_shape)), train=False)
  return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                           batch_stats=variables["batch_stats"])


def _loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@jax.jit
def train_step(state: TrainState, images: jax.Array, labels: jax.Array, mean_std: jax.Array,
               key: jax.Array) -> tuple[TrainState, jax.Array]:
  """One step on uint8 ``images`` (random crop on device); returns the new state and the loss."""
  x = input_pipeline.normalize(input_pipeline.augment(images, key, flip=False), mean_std)

  def loss_fn(params: Any) -> tuple[jax.Array, Any]:
    logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, x,
                                     train=True, mutable=["batch_stats"])
    return _loss(logits, labels), updates["batch_stats"]

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return state.apply_gradients(grads=grads, batch_stats=batch_stats), loss


@jax.jit
def eval_step(state: TrainState, images: jax.Array, labels: jax.Array,
              mean_std: jax.Array) -> jax.Array:
  """Number of correct predictions with the running statistics."""
  x = input_pipeline.normalize(images, mean_std)
  logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, x,
                          train=False)
  return jnp.sum(jnp.argmax(logits, -1) == labels)


def train(gc: str = "gc", epochs: int = 3, batch_size: int = 32, learning_rate: float = 0.1,
          seed: int = 0, train_subset: int | None = None) -> list[dict[str, float]]:
  """Trains on digits (full batches only, for brevity); returns per-epoch loss and test accuracy."""
  data = input_pipeline.load_dataset("digits")
  split = data.train
  if train_subset:
    split = input_pipeline.stratified_subset(split, train_subset)
  steps = len(split) // batch_size
  tx = make_tx(gc, optax.cosine_decay_schedule(learning_rate, epochs * steps))
  state = create_train_state(seed, tx, data.num_classes)
  mean_std = jnp.asarray([data.mean, data.std], jnp.float32)
  key = jax.random.key(seed + 1)
  history = []
  for epoch in range(1, epochs + 1):
    order = np.random.default_rng([seed, epoch]).permutation(len(split))[: steps * batch_size]
    losses = []
    for rows in order.reshape(steps, batch_size):
      key, step_key = jax.random.split(key)
      state, loss = train_step(state, split.images[rows], split.labels[rows], mean_std, step_key)
      losses.append(loss)
    correct = eval_step(state, data.test.images, data.test.labels, mean_std)
    history.append({"epoch": epoch, "train_loss": float(jnp.mean(jnp.stack(losses))),
                    "test_accuracy": float(correct) / len(data.test)})
    print(history[-1])
  return history


if __name__ == "__main__":
  parser = argparse.ArgumentParser(prog="python -m examples.cifar.linen",
                                   description="Linen + optax_gc on the offline digits set.")
  parser.add_argument("--gc", choices=GC_MODES, default="gc")
  parser.add_argument("--epochs", type=int, default=3)
  parser.add_argument("--lr", type=float, default=0.1)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  train(args.gc, args.epochs, learning_rate=args.lr, seed=args.seed)
