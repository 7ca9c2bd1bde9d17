"""calib_precision='float64': the same GPTQ codes whatever instruction set
XLA compiles the calibration forward passes for.

XLA:CPU's code for SSE4.2 (128-bit vectors, as on ARM) sums reductions in
another order than its AVX2/AVX-512 code, so float32 activations, H and
then GPTQ's codes differ; XLA_FLAGS=--xla_cpu_max_isa=SSE4_2 stands in for
such a machine. Each run is a fresh process on SmolLM2's first block.
"""

import os
import platform
import tempfile
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest

import qjax
from qjax.calibration import capture
from qjax.formats import nearest64
from tests import worker_runs


class _TwoLayers(nn.Module):
  """A model qjax has never seen: Dense, a nonlinearity, Dense."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(24, name="first")(x)
    return nn.Dense(8, name="second")(jnp.tanh(h))


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
  env = {}
  if isa:
    flags = os.environ.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = f"{flags} --xla_cpu_max_isa={isa}"
  return worker_runs.run(_WORKER, path, env=env)


class Float64StatisticsTest(absltest.TestCase):
  def test_h_is_the_float64_gram_of_float64_inputs(self):
    # Rounding the layer inputs to float32 before the Gram (as the capture
    # once did) flips a few of them between machines and undoes float64
    # calibration; H must be the Gram of the float64 inputs themselves.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 16))
    model = _TwoLayers()
    params = model.init(jax.random.key(0), jnp.ones((1, 16)))
    with nearest64.float64_allowed():
      wide = jax.tree.map(nearest64.widen, params)
      x64 = jnp.asarray(x, jnp.float64)
      h, _ = capture.dense_hessians(model, wide, [(x64,)])
      first = np.asarray(h["first/kernel"])
      inner = np.tanh(
        x @ np.asarray(wide["params"]["first"]["kernel"])
        + np.asarray(wide["params"]["first"]["bias"])
      )
      second = np.asarray(h["second/kernel"])
    self.assertEqual(first.dtype, np.float64)
    np.testing.assert_allclose(first, 2 / 64 * x.T @ x, rtol=1e-13)
    np.testing.assert_allclose(second, 2 / 64 * inner.T @ inner, rtol=1e-12)
    rounded = x.astype(np.float32).astype(np.float64)
    self.assertGreater(np.abs(first - 2 / 64 * rounded.T @ rounded).max(), 1e-9)

  def test_bad_precision_and_two_stream_methods_are_refused(self):
    model = _TwoLayers()
    params = model.init(jax.random.key(0), jnp.ones((1, 16)))["params"]
    batches = [jnp.ones((4, 16))]
    gptq = qjax.Recipe((qjax.rule("kernel", "int4", method="gptq"),))
    with self.assertRaisesRegex(ValueError, "precision='float16'"):
      qjax.quantize(
        params, gptq, calib=(model, batches), calib_precision="float16"
      )
    ed = qjax.Recipe((qjax.rule("kernel", "mxfp4", method="ed"),))
    with self.assertRaisesRegex(ValueError, "two-stream methods"):
      qjax.quantize(
        params, ed, calib=(model, batches), calib_precision="float64"
      )


@pytest.mark.e2e
class Float64CalibrationTest(absltest.TestCase):
  def test_codes_do_not_depend_on_the_instruction_set(self):
    if platform.machine().lower() not in ("x86_64", "amd64"):
      self.skipTest("--xla_cpu_max_isa=SSE4_2 is an x86 flag")
    with tempfile.TemporaryDirectory() as folder:
      native, sse = _codes("", folder), _codes("SSE4_2", folder)
    worker_runs.assert_float64_agrees(self, native, sse, "for SSE4.2")


if __name__ == "__main__":
  absltest.main()
