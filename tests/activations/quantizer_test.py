"""Activation fake-quant against slow NumPy references, bit for bit.

The references scale each row, block or tensor as the format's spec says
and round with ml_dtypes' casts where ml_dtypes has the element type (a
grid search otherwise), so a wrong scale rule, a wrong grouping of tokens
or blocks, or a wrong rounding all show up as unequal bits.
"""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl.testing import absltest, parameterized

from qjax import activations, formats
from qjax.formats import integer

_ML_DTYPES = {
  "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
  "float8_e5m2": ml_dtypes.float8_e5m2,
  "float6_e3m2fn": ml_dtypes.float6_e3m2fn,
  "float6_e2m3fn": ml_dtypes.float6_e2m3fn,
  "float4_e2m1fn": ml_dtypes.float4_e2m1fn,
}


def _activations(shape=(3, 7, 64), seed=0):
  """LLM-like inputs: a few outlier channels, a zero row, mixed scales."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape).astype(np.float32)
  x[..., 5] *= 40.0
  x[..., 33] *= -25.0
  x[0, 2] = 0.0
  x *= np.float32(0.3)
  return x


def _round_element(y, name, fmt):
  """Element rounding of the float32 quotient y, saturating."""
  values = np.asarray(fmt.values(), np.float64)
  values = values[np.isfinite(values)]
  top = values.max()
  if isinstance(fmt, integer.IntFormat):  # two's complement: -2^(b-1) too
    step = 2.0**fmt.step_exponent
    q = np.rint(y.astype(np.float64) / step)
    return np.clip(q, values.min() / step, top / step) * step
  y = np.clip(y.astype(np.float64), -top, top).astype(np.float32)
  if name in _ML_DTYPES:
    return y.astype(_ML_DTYPES[name]).astype(np.float64)
  grid = np.unique(values)  # codebook (NF4) or an eXmY ml_dtypes lacks
  idx = np.abs(y.astype(np.float64)[..., None] - grid).argmin(-1)
  return grid[idx]


def _float32_scale(amax, fmt):
  s = np.float32(amax) / np.float32(fmt.max)
  return np.float32(1.0) if s == 0 else s


def _reference(x, name, fmt, granularity, block=None):
  """Per-group amax -> float32 scale -> f32 quotient -> element -> times."""
  rows = x.reshape(-1, x.shape[-1])
  out = np.zeros_like(rows)
  if granularity == "tensor":
    groups = [(slice(None), slice(None))]
  elif granularity == "token":
    groups = [(i, slice(None)) for i in range(rows.shape[0])]
  else:
    groups = [
      (i, slice(j, j + block))
      for i in range(rows.shape[0])
      for j in range(0, rows.shape[1], block)
    ]
  for g in groups:
    v = rows[g]
    s = _float32_scale(np.abs(v).max(), fmt)
    q = _round_element(v / s, name, fmt)
    out[g] = (q.astype(np.float32) * s).astype(np.float32)
  return out.reshape(x.shape)


def _mx_reference(x, name):
  """OCP MX v1.0: blocks of 32 along K, E8M0 FLOOR scale, saturation."""
  element, scaling = formats.block_format(name)
  emax_elem = math.floor(math.log2(float(element.max)))
  rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
  out = np.zeros_like(rows)
  for i in range(rows.shape[0]):
    for j in range(0, rows.shape[1], 32):
      v = rows[i, j : j + 32]
      amax = np.abs(v).max()
      e = -127 if amax == 0 else math.floor(math.log2(amax)) - emax_elem
      e = min(max(e, -127), 127)
      y = (v / 2.0**e).astype(np.float32)  # exact: a power of two
      elem_name = {"mxint8": "mxint8"}.get(name, None)
      if elem_name is None:
        q = _round_element(y, element.name, element)
      else:
        q = _round_element(y, "", element)
      out[i, j : j + 32] = q * 2.0**e
  return out.astype(np.float32).reshape(x.shape)


def _nearest_magnitude(y, grid):
  """Nearest of a sorted non-negative grid, ties to the even index."""
  y = np.clip(y, grid[0], grid[-1])
  idx = np.clip(np.searchsorted(grid, y), 1, len(grid) - 1)
  lo, hi = grid[idx - 1], grid[idx]
  pick_hi = (hi - y < y - lo) | ((hi - y == y - lo) & (idx % 2 == 0))
  return np.where(pick_hi, hi, lo)


def _nvfp4_reference(x, tensor_scale=None):
  """NVFP4, correctly rounded in float64: s_t = amax / (6 * 448) (float32),
  s_b = e4m3(amax_b / (6 s_t)), element = e2m1(x / (s_b s_t))."""
  e4m3 = formats.get("float8_e4m3fn").values().astype(np.float64)
  e4m3 = np.unique(e4m3[np.isfinite(e4m3) & (e4m3 >= 0)])
  e2m1 = np.unique(
    np.abs(formats.get("float4_e2m1fn").values().astype(np.float64))
  )
  rows = x.reshape(-1, x.shape[-1])
  if tensor_scale is None:
    s_t = np.float32(np.abs(rows).max() / np.float32(6 * 448))
  else:
    s_t = np.float32(tensor_scale)
  out = np.zeros_like(rows)
  for i in range(rows.shape[0]):
    for j in range(0, rows.shape[1], 16):
      v = rows[i, j : j + 16]
      ratio = np.float64(np.abs(v).max()) / (6 * np.float64(s_t))
      s_b = _nearest_magnitude(np.clip(ratio, 2.0**-9, 448), e4m3)
      y = np.abs(v.astype(np.float64)) / (s_b * np.float64(s_t))
      q = np.sign(v) * _nearest_magnitude(y, e2m1)
      s = np.float32(np.float32(s_b) * s_t)
      out[i, j : j + 16] = q.astype(np.float32) * s
  return out.reshape(x.shape)


ELEMENTS = (
  "int8",
  "int4",
  "float8_e4m3fn",
  "float8_e5m2",
  "float6_e3m2fn",
  "float4_e2m1fn",
  "e3m3",
  "nf4",
)


class FakeQuantTest(parameterized.TestCase):
  @parameterized.product(name=ELEMENTS, granularity=("tensor", "token"))
  def test_element_formats_match_reference(self, name, granularity):
    x = _activations()
    quant = activations.act_quant(name, granularity)
    got = np.asarray(activations.fake_quant(x, quant))
    want = _reference(x, name, formats.get(name), granularity)
    np.testing.assert_array_equal(got, want)

  @parameterized.parameters("int4", "float8_e4m3fn", "float4_e2m1fn")
  def test_blocks_along_k_match_reference(self, name):
    x = _activations()
    quant = activations.act_quant(name, "block", block_size=16)
    got = np.asarray(activations.fake_quant(x, quant))
    want = _reference(x, name, formats.get(name), "block", 16)
    np.testing.assert_array_equal(got, want)

  @parameterized.parameters(
    "mxfp4", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp8_e4m3", "mxfp8_e5m2", "mxint8"
  )
  def test_mx_formats_match_the_spec(self, name):
    x = _activations(seed=1)
    got = np.asarray(activations.fake_quant(x, activations.act_quant(name)))
    np.testing.assert_array_equal(got, _mx_reference(x, name))

  def test_nvfp4_matches_the_correctly_rounded_rule(self):
    x = _activations(seed=2)
    got = np.asarray(activations.fake_quant(x, activations.act_quant("nvfp4")))
    np.testing.assert_array_equal(got, _nvfp4_reference(x))

  def test_static_nvfp4_keeps_the_given_tensor_scale(self):
    x = _activations(seed=3)
    quant = activations.act_quant("nvfp4", static=True)
    s_t = activations.static_scale(np.float32(2.5), quant)
    self.assertEqual(float(s_t), np.float32(2.5) / np.float32(6 * 448))
    got = np.asarray(activations.fake_quant(x, quant, s_t))
    np.testing.assert_array_equal(got, _nvfp4_reference(x, s_t))

  @parameterized.parameters("int8", "float8_e4m3fn", "int4")
  def test_static_tensor_scale_saturates_outside_its_range(self, name):
    x = _activations(seed=4)
    fmt = formats.get(name)
    quant = activations.act_quant(name, "tensor", static=True)
    amax = np.float32(1.5)  # below the data's range: the tails saturate
    scale = activations.static_scale(amax, quant)
    self.assertEqual(float(scale), _float32_scale(amax, fmt))
    got = np.asarray(activations.fake_quant(x, quant, scale))
    want = _round_element(x / np.float32(scale), name, fmt)
    want = (want.astype(np.float32) * np.float32(scale)).astype(np.float32)
    np.testing.assert_array_equal(got, want)
    lo = np.float32(np.asarray(fmt.values()).min()) * scale
    self.assertEqual(got.min(), lo)  # saturated, not wrapped or clipped
    self.assertEqual(got.max(), np.float32(fmt.max) * scale)

  @parameterized.parameters("mxfp4", "nvfp4", "mxint8")
  def test_ragged_blocks_are_the_spec_zero_padding(self, name):
    # 24 channels (a CNN's narrow layer): one short block, whose values are
    # those of the block padded with zeros to 32 (or 16 for nvfp4)
    x = np.ascontiguousarray(_activations((2, 5, 64))[..., :24])
    got = activations.fake_quant(x, activations.act_quant(name, ragged=True))
    pad = np.concatenate([x, np.zeros((2, 5, 8), np.float32)], -1)
    want = activations.fake_quant(pad, activations.act_quant(name))[..., :24]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with self.assertRaisesRegex(ValueError, "does not divide"):
      activations.fake_quant(x, activations.act_quant(name))

  def test_codes_decode_to_the_fake_quant_values(self):
    x = _activations(seed=5)
    quant = activations.act_quant("int4", "token")
    codes, grid = activations.codes_and_grid(x, quant)
    self.assertEqual(codes.shape, (21, 64))
    values = quant.fmt.decode(codes) * grid.scale_full
    np.testing.assert_array_equal(
      np.asarray(values).reshape(x.shape),
      np.asarray(activations.fake_quant(x, quant)),
    )

  def test_bfloat16_input_and_jit(self):
    x = jnp.asarray(_activations(seed=6), jnp.bfloat16)
    quant = activations.act_quant("int8", "token")
    got = jax.jit(activations.fake_quant, static_argnums=1)(x, quant)
    self.assertEqual(got.dtype, jnp.float32)
    want = _reference(np.asarray(x, np.float32), "int8", quant.fmt, "token")
    np.testing.assert_array_equal(np.asarray(got), want)

  def test_bits_per_value_counts_block_scales(self):
    self.assertEqual(
      activations.bits_per_value(activations.act_quant("mxfp4"), 64), 4.25
    )
    self.assertEqual(
      activations.bits_per_value(activations.act_quant("nvfp4"), 64), 4.5
    )
    self.assertEqual(
      activations.bits_per_value(activations.act_quant("int8", "token"), 64), 8
    )


class InputExpansionTest(parameterized.TestCase):
  """PIPE's input expansion: term k is the fake-quant of what the first
  k - 1 terms leave (NumPy reference), and the error shrinks per order."""

  @parameterized.parameters(("int4", "token"), ("mxfp4", None))
  def test_terms_quantize_the_residuals(self, name, granularity):
    x = _activations(seed=7)
    want, total, errors = None, np.zeros_like(x), []
    for orders in (1, 2, 3):
      residual = x - total
      if granularity:
        term = _reference(residual, name, formats.get(name), granularity)
        quant = activations.act_quant(name, granularity, orders=orders)
      else:
        term = _mx_reference(residual, name)
        quant = activations.act_quant(name, orders=orders)
      total = (total + term).astype(np.float32)
      want = total
      got = np.asarray(activations.fake_quant(x, quant))
      np.testing.assert_array_equal(got, want)
      errors.append(float(np.abs(got - x).max()))
    self.assertLess(errors[1], errors[0] / 4)
    self.assertLess(errors[2], errors[1] / 4)
    self.assertEqual(
      activations.bits_per_value(quant, 64),
      3 * (4.25 if not granularity else 4),
    )


class BadInputTest(absltest.TestCase):
  def test_errors_name_the_problem(self):
    with self.assertRaisesRegex(ValueError, "unsigned"):
      activations.act_quant("uint8")
    with self.assertRaisesRegex(ValueError, "granularity 'row'"):
      activations.act_quant("int8", "row")
    with self.assertRaisesRegex(ValueError, "needs block_size"):
      activations.act_quant("int8", "block")
    with self.assertRaisesRegex(ValueError, "fixes its own block size"):
      activations.act_quant("mxfp4", block_size=16)
    with self.assertRaisesRegex(ValueError, "static scale is one per tensor"):
      activations.act_quant("int8", "token", static=True)
    with self.assertRaisesRegex(ValueError, "unknown format"):
      activations.act_quant("int9000")
    with self.assertRaisesRegex(ValueError, "orders must be an integer"):
      activations.act_quant("int4", orders=0)
    with self.assertRaisesRegex(ValueError, "measures its scales per call"):
      activations.act_quant("int4", "tensor", static=True, orders=2)
    with self.assertRaisesRegex(ValueError, "observer"):
      activations.act_quant("int8", "tensor", static=True, observer="kl")
    static = activations.act_quant("int8", "tensor", static=True)
    with self.assertRaisesRegex(ValueError, "is static: pass the scale"):
      activations.fake_quant(np.ones((2, 4), np.float32), static)
    with self.assertRaisesRegex(ValueError, "block size 32 does not divide"):
      activations.fake_quant(
        np.ones((2, 48), np.float32), activations.act_quant("mxfp4")
      )


if __name__ == "__main__":
  absltest.main()
