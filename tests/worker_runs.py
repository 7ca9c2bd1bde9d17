"""Fresh-process runs for the reproducibility tests: a worker script writes
its arrays to an .npz, and float64 results must agree where float32 ones
may not."""

import os
import subprocess
import sys

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(source: str, path: str, *args: str, env: dict | None = None) -> dict:
  """Runs `source` as `python -c source path *args` with qjax on the path;
  returns the arrays it saved to `path`."""
  full_env = {**os.environ, "PYTHONPATH": _ROOT, **(env or {})}
  subprocess.run(
    [sys.executable, "-c", source, path, *args], check=True, env=full_env
  )
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def assert_float64_agrees(test, first: dict, second: dict, setting: str):
  """float64 codes equal; the test skips (not passes) when the float32
  codes agree too, since then the machine cannot tell the precisions
  apart."""
  np.testing.assert_array_equal(first["float64"], second["float64"])
  if np.array_equal(first["float32"], second["float32"]):
    test.skipTest(
      f"float32 gave the same codes {setting} here, so this machine cannot "
      "tell the two precisions apart"
    )
