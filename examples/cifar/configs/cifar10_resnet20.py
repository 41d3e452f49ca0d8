"""CIFAR-10, ResNet-20 (He et al. 2016), SGD with GC: small enough for a workstation.

    python -m examples.cifar.train --config cifar10_resnet20 --gc gc

He et al.'s CIFAR schedule stretched to 200 epochs: batch 128, SGD momentum 0.9, lr 0.1 divided by
10 at epochs 100 and 150, weight decay 1e-4. Expected (literature): about 91.5-92% test accuracy
for ResNet-20 on the official CIFAR-10. Runtime: see the README's table.
"""

from examples.cifar.config import Config


def get_config() -> Config:
  """ResNet-20 with weight decay 1e-4, as in He et al."""
  return Config(model="resnet20", weight_decay=1e-4, step_boundaries=(0.5, 0.75))
