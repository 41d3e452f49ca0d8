"""CIFAR-100, ResNet-18, SGD: the GC paper's CIFAR-100 setting.

    python -m examples.cifar.train --config cifar100 --gc gc   # and --gc none for the baseline

Same recipe as ``default`` (200 epochs, lr 0.1 divided by 10 at epochs 60, 120 and 180, coupled
weight decay 5e-4, momentum 0.9, batch 128) on 100 classes. The authors' script runs ResNet-50
(``--model resnet50``); its GC arm, ``--alg sgdGC``, builds ``SGD_GC`` (conv and dense kernels,
``--gc gc``) since their commit ``baa993f`` and built ``SGD_GCC`` (conv only, ``--gc gcc``) in
their first upload; see ``docs/paper_cifar100.md``. We have not run the 200 epochs here.
"""

from examples.cifar.config import Config


def get_config() -> Config:
  """The paper's CIFAR-100 recipe."""
  return Config(dataset="cifar100")
