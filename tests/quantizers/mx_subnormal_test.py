"""MX block formats on tiny values: E8M0 scales down to 2^-127 and blocks
whose values or results are float32 subnormals, bit-exact against a float64
NumPy reference with ml_dtypes elements (XLA:CPU flushes subnormals in
arithmetic, so a naive x / 2^e or value * 2^e returns 0 there)."""

import math

import ml_dtypes
import numpy as np
from absl.testing import absltest, parameterized

import qjax

ELEMENTS = {
  "mxfp8_e4m3": ml_dtypes.float8_e4m3fn,
  "mxfp8_e5m2": ml_dtypes.float8_e5m2,
  "mxfp6_e3m2": ml_dtypes.float6_e3m2fn,
  "mxfp6_e2m3": ml_dtypes.float6_e2m3fn,
  "mxfp4": ml_dtypes.float4_e2m1fn,
}


def _reference(x: np.ndarray, dtype) -> np.ndarray:
  """Blocks of 32 along axis 0: OCP MX v1.0 in float64."""
  top = float(ml_dtypes.finfo(dtype).max)
  emax_elem = math.floor(math.log2(top))
  out = np.empty_like(x)
  for b in range(0, x.shape[0], 32):
    for c in range(x.shape[1]):
      v = x[b : b + 32, c].astype(np.float64)
      amax = np.max(np.abs(v))
      e = -127 if amax == 0 else math.floor(math.log2(amax)) - emax_elem
      e = min(max(e, -127), 127)
      y = np.clip(v / 2.0**e, -top, top).astype(dtype).astype(np.float64)
      out[b : b + 32, c] = (y * 2.0**e).astype(np.float32)
  return out


def _tiny_blocks():
  rng = np.random.default_rng(0)
  cols = []
  for log_amax in (-149, -140, -130, -127, -126, -120, -60):
    v = rng.standard_normal(64) * 2.0**log_amax
    cols.append(v.astype(np.float32))  # subnormal where 2^log_amax is
  return np.stack(cols, 1)


class MxSubnormalTest(parameterized.TestCase):
  @parameterized.named_parameters(*((n, n) for n in ELEMENTS))
  def test_bit_exact_against_float64_reference(self, name):
    x = _tiny_blocks()
    self.assertTrue(np.any((x != 0) & (np.abs(x) < 2.0**-126)))  # subnormal
    recipe = qjax.Recipe((qjax.rule("w", name, axis=0),))
    q = qjax.quantize({"w": x}, recipe, report_unused=False)["w"]
    got = np.asarray(q.dequantize())
    want = _reference(x, ELEMENTS[name])
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    # The scale of 2^-127 is used, not flushed: some tiny value survives.
    self.assertTrue(np.any((got != 0) & (np.abs(got) < 2.0**-120)))


if __name__ == "__main__":
  absltest.main()
