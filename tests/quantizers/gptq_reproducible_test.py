"""GPTQ's codes do not depend on how many cores LAPACK and BLAS use.

Each run is a fresh process: one pinned to a single core, one free to use
every core the test may use. LAPACK's Cholesky (and the threaded matmuls)
sum in an order set by the thread count, so float32 GPTQ can come out with
different codes; precision='float64' must not.
"""

import os
import tempfile
import textwrap

import numpy as np
import pytest
from absl.testing import absltest

from tests import worker_runs

# A layer as wide as SmolLM2's down projection, whose Cholesky differs
# between 1 and 2 threads here. H comes from NumPy's float64 matmul, which
# splits rows and columns (not sums) between threads: the same H both times,
# which the workers also return.
_WORKER = textwrap.dedent(
  """
  import os, sys
  if sys.argv[2] == "one":
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  import numpy as np
  from qjax import formats
  from qjax.quantizers import gptq
  n = 1536
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2 * n, n))
  x = x @ rng.standard_normal((n, n)) * 0.3 + x
  h = (x.T @ x / n).astype(np.float32)
  w = rng.standard_normal((n, 64)).astype(np.float32)
  grid = formats.get("uint4"), formats.per_block(128, zero_point=True)
  out = {"h": h}
  for precision in ("float32", "float64"):
    qt, _ = gptq.gptq(w, h, *grid, precision=precision)
    out[precision] = np.asarray(qt.codes)
  np.savez(sys.argv[1], **out)
  """
)


def _codes(cores: str, folder: str) -> dict:
  # The worker's first argument is the .npz path, the second the cores.
  return worker_runs.run(_WORKER, os.path.join(folder, f"{cores}.npz"), cores)


@pytest.mark.e2e
class GPTQReproducibleTest(absltest.TestCase):
  def test_float64_codes_do_not_depend_on_the_core_count(self):
    if len(os.sched_getaffinity(0)) < 2:
      self.skipTest("needs at least 2 cores to compare against one")
    with tempfile.TemporaryDirectory() as folder:
      one, every = _codes("one", folder), _codes("all", folder)
    np.testing.assert_array_equal(one["h"], every["h"])
    worker_runs.assert_float64_agrees(self, one, every, "on 1 and all cores")


if __name__ == "__main__":
  absltest.main()
