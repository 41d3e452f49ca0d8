"""Small shims that let the library run on the oldest JAX it supports.

Each shim names the version that made it necessary; drop it when the floor in
``pyproject.toml`` passes that version.
"""

from typing import Any

__all__ = ["keypath_str"]


def _simple_key(key: Any) -> str:
  """One key of a key path without brackets or quotes: ``kernel``, ``0``, ``layers``."""
  for attr in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def keypath_str(path: tuple[Any, ...]) -> str:
  """``jax.tree_util.keystr(path, simple=True, separator="/")``, which JAX 0.4.x lacks.

  >>> import jax
  >>> [keypath_str(p) for p, _ in jax.tree_util.tree_leaves_with_path({'a': [0, {'b': 1}]})]
  ['a/0', 'a/1/b']
  """
  return "/".join(_simple_key(k) for k in path)

