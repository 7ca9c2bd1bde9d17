"""calib_precision='float64': the same GPTQ codes whatever instruction set
XLA compiles the calibration forward passes for.

XLA:CPU's code for SSE4.2 (128-bit vectors, as on ARM) sums reductions in
another order than its AVX2/AVX-512 code, so float32 activations, H and
then GPTQ's codes differ; XLA_FLAGS=--xla_cpu_max_isa=SSE4_2 stands in for
such a machine. Each run is a fresh process on SmolLM2's first block.
"""

import os
import platform
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest
from absl.testing import absltest

_WORKER = textwrap.dedent(
  """
  import sys
  import jax
  import jax.numpy as jnp
  import numpy as np
  import qjax
  from qjax import datasets, formats, qtensor
  from qjax.models import smollm2
  params = smollm2.load_params(layers=1)
  ids = smollm2.tokenizer().encode(datasets.kjv_text()[-8000:]).ids
  batches = [jnp.asarray(ids[i * 256 : (i + 1) * 256])[None] for i in (0, 1)]
  grid = formats.per_block(128, zero_point=True, ragged=True)
  recipe = qjax.Recipe((qjax.rule("kernel", "uint4", grid, method="gptq"),))
  out = {}
  for precision in ("float32", "float64"):
    q = qjax.quantize(
      params,
      recipe,
      calib=(smollm2.block_model(params), batches),
      calib_precision=precision,
    )
    leaves = jax.tree.leaves(q, is_leaf=qtensor.is_qtensor)
    codes = [np.asarray(l.codes) for l in leaves if qtensor.is_qtensor(l)]
    out[precision] = np.concatenate([c.ravel() for c in codes])
  np.savez(sys.argv[1], **out)
  """
)


def _codes(isa, folder):
  path = os.path.join(folder, f"{isa or 'native'}.npz")
  root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
  env = {**os.environ, "PYTHONPATH": root}
  if isa:
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_cpu_max_isa={isa}"
  subprocess.run([sys.executable, "-c", _WORKER, path], check=True, env=env)
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


@pytest.mark.e2e
class Float64CalibrationTest(absltest.TestCase):
  def test_codes_do_not_depend_on_the_instruction_set(self):
    if platform.machine().lower() not in ("x86_64", "amd64"):
      self.skipTest("--xla_cpu_max_isa=SSE4_2 is an x86 flag")
    with tempfile.TemporaryDirectory() as folder:
      native, sse = _codes("", folder), _codes("SSE4_2", folder)
    np.testing.assert_array_equal(native["float64"], sse["float64"])
    if np.array_equal(native["float32"], sse["float32"]):
      self.skipTest(
        "float32 calibration gave the same codes for SSE4.2 here, so this "
        "machine cannot tell the two precisions apart"
      )


if __name__ == "__main__":
  absltest.main()
