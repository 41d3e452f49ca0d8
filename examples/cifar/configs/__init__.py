"""Named starting configs, one module each; every module opens with the command that runs it.

``get_config("digits")`` imports ``examples.cifar.configs.digits`` and calls its ``get_config()``.
"""

import importlib
import pkgutil

from examples.cifar.config import Config

__all__ = ["get_config", "names"]


def names() -> list[str]:
  """The available config names."""
  return sorted(m.name for m in pkgutil.iter_modules(__path__))


def get_config(name: str) -> Config:
  """The :class:`Config` defined by ``configs/<name>.py``."""
  if name not in names():
    raise ValueError(f"Unknown config {name!r}; choose one of {names()}.")
  return importlib.import_module(f"{__name__}.{name}").get_config()
