"""CIFAR-10, ResNet-18, SGD with GC: the GC paper's CIFAR recipe.

    python -m examples.cifar.train --config default --gc gc    # and --gc none for the baseline

The settings of the GC authors' CIFAR script (``GC_code/CIFAR100/main.py`` in their repository):
200 epochs, batch 128, SGD momentum 0.9, lr 0.1 divided by 10 every 60 epochs (at 60, 120 and
180), coupled weight decay 5e-4, random crop (pad 4) + flip. Expected (literature, not measured
here): about 95% test accuracy for ResNet-18 on the official CIFAR-10.
Runtime: see the README's table (GPU minutes per epoch; a CPU is far too slow for this one).
"""

from examples.cifar.config import Config


def get_config() -> Config:
  """The paper's recipe (the :class:`Config` defaults)."""
  return Config()
