"""Float32 scales on tiny blocks (RTN, GPTQ, dequantize): subnormal scales
and values are rounded, not flushed to zero, checked against NumPy's float32
(which does not flush) and ml_dtypes.

The rule under test: a block whose largest magnitude is below 2^-62 is
quantized as the same block times 2^64 would be, its float32 scale moved
back down by 2^-64 (rounded onto the subnormal grid), and its codes are the
block divided by that stored scale, rounded once.
"""

import ml_dtypes
import numpy as np
from absl.testing import absltest, parameterized

from qjax import formats
from qjax.formats import packing
from qjax.quantizers import gptq, rtn


def _tiny_columns(rows=64, logs=(-140, -133, -127, -120, -70, -10)):
  """Columns of normals times 2^log: deep subnormal (scales of a few bits)
  to normal (the last column is not tiny and must be untouched)."""
  rng = np.random.default_rng(0)
  cols = [rng.standard_normal(rows) * 2.0**e for e in logs]
  return np.stack(cols, 1).astype(np.float32)


def _values(qt) -> np.ndarray:
  """Decoded element values [*shape] (float64)."""
  codes = packing.unpack(qt.codes, qt.fmt.bits, qt.shape[-1])
  return np.asarray(qt.fmt.decode(codes), np.float64)


GRIDS = {
  "int8 per channel": ("int8", formats.per_channel(), None),
  "uint4 g32 zero point": (
    "uint4",
    formats.per_block(32, zero_point=True),
    None,
  ),
  "int8 g32 bfloat16 scale": (
    "int8",
    formats.per_block(32, scale_format="bfloat16"),
    None,
  ),
  "e4m3 g32 float32 scale": (
    "float8_e4m3fn",
    formats.per_block(32),
    ml_dtypes.float8_e4m3fn,
  ),
}


class FloatScaleSubnormalTest(parameterized.TestCase):
  @parameterized.named_parameters(*((k, *v) for k, v in GRIDS.items()))
  def test_rtn_matches_the_shifted_block_and_numpy(self, name, scaling, dt):
    fmt = formats.get(name)
    x = _tiny_columns()
    tiny = np.abs(x).max(0) < 2.0**-62
    qt = rtn.rtn(x, fmt, scaling)
    up = rtn.rtn(
      np.ldexp(x, 64 * tiny[None, :]).astype(np.float32), fmt, scaling
    )
    stored = np.asarray(qt.scale)
    shifted = np.asarray(up.scale)
    # Stored scale: the shifted block's, moved down (NumPy float32 ldexp
    # rounds subnormals correctly); untouched columns are the same.
    down = np.ldexp(shifted.astype(np.float32), -64).astype(shifted.dtype)
    want_scale = np.where(tiny[None, :], down, shifted)
    np.testing.assert_array_equal(stored, want_scale)
    # Codes: x / stored scale rounded once (float64 holds both exactly).
    block = scaling.block_shape(x.shape)
    s_full = np.repeat(stored.astype(np.float32), block[0], 0)[: x.shape[0]]
    s_full = s_full.astype(np.float64)
    # A scale that underflows to 0 (bfloat16 ends at 2^-133) codes 0.
    y = np.where(
      s_full > 0, x.astype(np.float64) / np.maximum(s_full, 1e-300), 0
    )
    if qt.zero is not None:
      zero = np.repeat(np.asarray(qt.zero), block[0], 0)[: x.shape[0]]
      y = y + zero
    if dt is None:
      lo, hi = fmt.qmin, fmt.qmax
      want = np.clip(np.rint(y), lo, hi)
    else:
      top = float(ml_dtypes.finfo(dt).max)  # elements saturate
      want = np.clip(y, -top, top).astype(dt).astype(np.float64)
    got = _values(qt)
    np.testing.assert_array_equal(got, want)
    # Dequantized: (value - zero) * scale in NumPy float32, bit for bit.
    values = got.astype(np.float32)
    if qt.zero is not None:
      values = values - zero.astype(np.float32)
    np.testing.assert_array_equal(
      np.asarray(qt.dequantize()), values * s_full.astype(np.float32)
    )
    # The old behaviour (flush) gave all zeros in the tiny columns; those
    # whose scale the scale format holds must now have nonzero values.
    live = tiny & np.all(stored.astype(np.float32) != 0, axis=0)
    self.assertGreaterEqual(live.sum(), 2)
    self.assertTrue(np.all(np.asarray(qt.dequantize())[:, live].any(0)))

  def test_nvfp4_with_a_subnormal_tensor_scale(self):
    element, scaling = formats.block_format("nvfp4")
    x = np.random.default_rng(1).standard_normal((64, 8)) * 2.0**-125
    x = x.astype(np.float32)
    qt = rtn.rtn(x, element, scaling)
    up = rtn.rtn(np.ldexp(x, 64).astype(np.float32), element, scaling)
    tensor = np.float32(qt.tensor_scale)
    self.assertLess(tensor, np.finfo(np.float32).tiny)  # subnormal
    self.assertEqual(tensor, np.ldexp(np.float32(up.tensor_scale), -64))
    # Elements: x / (block * stored tensor scale) rounded once.
    block = np.asarray(qt.scale).view(ml_dtypes.float8_e4m3fn)
    block = np.repeat(block.astype(np.float64), 16, 0)
    y = x.astype(np.float64) / (block * np.float64(tensor))
    want = np.clip(y, -6, 6).astype(ml_dtypes.float4_e2m1fn)
    got = _values(qt)
    np.testing.assert_array_equal(got, want.astype(np.float64))
    # Dequantized as in the normal range, at 2^64, then moved down once.
    scale = block.astype(np.float32) * np.ldexp(tensor, 64)
    want_values = np.ldexp(got.astype(np.float32) * scale, -64)
    np.testing.assert_array_equal(np.asarray(qt.dequantize()), want_values)
    self.assertTrue(np.asarray(qt.dequantize()).any())

  def test_gptq_float64_on_a_tiny_layer(self):
    rng = np.random.default_rng(2)
    n = 64
    a = rng.standard_normal((256, n))
    a = a @ rng.standard_normal((n, n)) * 0.3 + a
    h = (2 / 256 * a.T @ a).astype(np.float32)
    w = rng.standard_normal((n, 16)).astype(np.float32)
    fmt, scaling = formats.get("uint4"), formats.per_block(32, zero_point=True)
    tiny = (w * np.float32(2.0**-130)).astype(np.float32)
    # H = I: GPTQ is RTN, also on subnormal scales.
    eye = np.eye(n, dtype=np.float32)
    q_eye, _ = gptq.gptq(tiny, eye, fmt, scaling, damp=0.0)
    np.testing.assert_array_equal(
      q_eye.codes, rtn.rtn(tiny, fmt, scaling).codes
    )
    # With H: as good as on the same layer at normal size (the grid differs
    # only by the rounding of the subnormal scales).
    q_tiny, _ = gptq.gptq(tiny, h, fmt, scaling)
    q_big, _ = gptq.gptq(w, h, fmt, scaling)

    def loss(q, x):
      d = np.asarray(q.dequantize(), np.float64) - x.astype(np.float64)
      return float(np.sum(d * (h.astype(np.float64) @ d)))

    ratio = loss(q_tiny, tiny) * 2.0**260 / loss(q_big, w)
    self.assertLess(ratio, 1.5)
    self.assertGreater(ratio, 0.5)


if __name__ == "__main__":
  absltest.main()
