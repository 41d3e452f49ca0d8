"""The declared floors are the tested ones: pyproject.toml, .ci/run and the README agree."""

import re
import tomllib
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]


def _floors() -> dict[str, str]:
  deps = tomllib.loads((_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
  floors = dict(re.fullmatch(r"([a-z]+)>=([0-9.]+)", d).groups() for d in deps)
  assert set(floors) == {"jax", "optax"}, deps  # the library's only runtime dependencies
  return floors


def test_ci_runs_the_tests_on_exactly_the_declared_floors():
  ci = (_ROOT / ".ci" / "run").read_text()
  floors = _floors()
  for name, version in (("jax", floors["jax"]), ("jaxlib", floors["jax"]),
                        ("optax", floors["optax"])):
    assert f"'{name}=={version}'" in ci, (name, version)
  assert re.search(r"^\.venv-floor/bin/python -m pytest -n 2 tests$", ci, re.M)


def test_readme_states_the_supported_range():
  readme = " ".join((_ROOT / "README.md").read_text().split())
  floors = _floors()
  assert f"`jax>={floors['jax']}` and `optax>={floors['optax']}`" in readme
  assert f"jax/jaxlib {floors['jax']} with optax {floors['optax']}" in readme
