"""ExMy against ml_dtypes (bit-exact) and against a slow reference."""

import dataclasses
import fractions

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl.testing import absltest, parameterized

from qjax import formats
from qjax.formats import exmy

ML_DTYPES_PRESETS = [
  n for n in formats.PRESETS if n not in ("bfloat16", "float16")
]


def _numpy_type(name):
  if name == "float16":
    return np.float16
  return getattr(ml_dtypes, name)


def _as_bits(x):
  return np.asarray(x, np.float32).view(np.uint32)


def _probe_inputs(fmt):
  """Every bf16 and fp16 value, every target value, midpoints, edges, random."""
  rng = np.random.default_rng(0)
  every_bf16 = (np.arange(2**16, dtype=np.uint32) << 16).view(np.float32)
  every_f16 = np.arange(2**16, dtype=np.uint16).view(np.float16)
  vals = _reference_values(fmt).astype(np.float64)
  mids = (vals[1:] + vals[:-1]) / 2
  mids = mids[mids.astype(np.float32) == mids].astype(np.float32)
  around = np.concatenate(
    [mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf)]
  )
  top = np.float32(fmt.max)
  ulp = np.float32(fmt.max - vals[-2])
  twice = np.float32(min(2 * fmt.max, 3e38))
  edges = np.array(
    [
      top,
      top + ulp / 2,
      top + ulp,
      twice,
      np.inf,
      -np.inf,
      np.nan,
      0.0,
      -0.0,
      fmt.smallest_subnormal,
      fmt.smallest_subnormal / 2,
      fmt.smallest_normal,
    ],
    np.float32,
  )
  edges = np.concatenate(
    [edges, np.nextafter(edges, np.inf), np.nextafter(edges, -np.inf)]
  )
  random_bits = rng.integers(0, 2**32, 500_000, dtype=np.uint32)
  random_range = (rng.standard_normal(500_000) * fmt.max / 3).astype(np.float32)
  x = np.concatenate(
    [
      every_bf16,
      every_f16.astype(np.float32),
      vals.astype(np.float32),
      -vals.astype(np.float32),
      around,
      -around,
      edges,
      -edges,
      random_bits.view(np.float32),
      random_range,
    ]
  ).astype(np.float32)
  return x


def _reference_values(fmt):
  """Finite non-negative values, by the eXmY definition, in code order."""
  y, b = fmt.mantissa_bits, fmt.bias
  out = []
  for mag in range(fmt.max_magnitude_code + 1):
    e, m = mag >> y, mag & (2**y - 1)
    if e > 0 or not fmt.subnormals:
      v = fractions.Fraction(2) ** (e - b) * (1 + fractions.Fraction(m, 2**y))
    else:
      v = fractions.Fraction(2) ** (1 - b) * fractions.Fraction(m, 2**y)
    out.append(float(v))
  return np.array(out)


def _reference_encode_magnitude(a, fmt, rounding="nearest_even"):
  """Slow nearest-value reference on |x| (finite); returns (mag, overflow).

  The value list is extended by the first value past max, so that overflow is
  judged after rounding; ties take the even magnitude code.
  """
  vals = _reference_values(fmt)
  step = vals[-1] - vals[-2] if len(vals) > 1 else vals[-1]
  ext = np.append(vals, vals[-1] + step)
  mags = np.empty(a.shape, np.int64)
  for i, v in enumerate(a.astype(np.float64)):
    j = int(np.searchsorted(ext, v))
    if j == 0:
      mags[i] = 0
      continue
    if j >= len(ext):
      mags[i] = len(ext) - 1
      continue
    lo, hi = ext[j - 1], ext[j]
    if v == hi:
      mags[i] = j
    elif rounding == "toward_zero":
      mags[i] = j - 1
    elif v - lo < hi - v:
      mags[i] = j - 1
    elif v - lo > hi - v:
      mags[i] = j
    elif rounding == "nearest_away":
      mags[i] = j
    else:
      mags[i] = j if j % 2 == 0 else j - 1
  return np.minimum(mags, len(vals) - 1), mags >= len(vals)


class MlDtypesBitExactTest(parameterized.TestCase):
  @parameterized.parameters(*ML_DTYPES_PRESETS, "float16", "bfloat16")
  def test_codes_and_round_trip_match_ml_dtypes(self, name):
    fmt = formats.get(name)
    t = _numpy_type(name) if name != "bfloat16" else ml_dtypes.bfloat16
    x = _probe_inputs(fmt)
    with np.errstate(all="ignore"):
      want = x.astype(t)
    view = np.uint8 if fmt.bits <= 8 else np.uint16
    got = np.asarray(fmt.encode(x))
    self.assertEqual(got.dtype, view)
    codes_to_compare = np.ones(x.shape, bool)
    if fmt.bits == 16:
      # numpy/ml_dtypes keep NaN payloads in 16-bit casts; qjax emits the
      # canonical quiet NaN (NaN-ness is still checked by the round trip).
      codes_to_compare = ~np.isnan(x)
    np.testing.assert_array_equal(
      got[codes_to_compare], want.view(view)[codes_to_compare]
    )
    np.testing.assert_array_equal(
      np.asarray(fmt.round(x)), want.astype(np.float32)
    )  # NaN compares equal to NaN here

  @parameterized.parameters(*ML_DTYPES_PRESETS, "float16", "bfloat16")
  def test_decode_every_code(self, name):
    fmt = formats.get(name)
    t = _numpy_type(name) if name != "bfloat16" else ml_dtypes.bfloat16
    view = np.uint8 if fmt.bits <= 8 else np.uint16
    codes = np.arange(2**fmt.bits, dtype=view)
    want = codes.view(t).astype(np.float32)
    got = np.asarray(fmt.decode(codes))
    np.testing.assert_array_equal(got, want)
    # Same bits, so -0/+0 and NaN vs number are told apart too.
    finite = np.isfinite(want)
    np.testing.assert_array_equal(_as_bits(got[finite]), _as_bits(want[finite]))

  def test_e8m0_float32_subnormal_inputs(self):
    bits = np.arange(0x400000, 0x800000, 997, dtype=np.uint32)
    x = bits.view(np.float32)
    preset = formats.get("float8_e8m0fnu")  # as ml_dtypes >= 0.7.0
    # 1.5 * 2^-127 is the tie between 2^-127 and 2^-126: ties go up.
    np.testing.assert_array_equal(
      np.asarray(preset.encode(x)), np.where(bits >= 0x600000, 1, 0)
    )
    np.testing.assert_array_equal(
      np.asarray(preset.encode(x)),
      x.astype(ml_dtypes.float8_e8m0fnu).view(np.uint8),
    )
    old = dataclasses.replace(preset, subnormal_inputs_round_up=True)
    # ml_dtypes before 0.7.0: anything above 2^-127 up.
    np.testing.assert_array_equal(
      np.asarray(old.encode(x)), np.where(bits > 0x400000, 1, 0)
    )

  @parameterized.parameters(*ML_DTYPES_PRESETS)
  def test_limits_match_finfo(self, name):
    fmt = formats.get(name)
    info = ml_dtypes.finfo(_numpy_type(name))
    self.assertEqual(fmt.max, float(info.max))
    self.assertEqual(fmt.smallest_normal, float(info.smallest_normal))
    self.assertEqual(fmt.smallest_subnormal, float(info.smallest_subnormal))
    self.assertEqual(fmt.bits, info.bits)

  @parameterized.parameters(*ML_DTYPES_PRESETS)
  def test_values_are_every_finite_value(self, name):
    fmt = formats.get(name)
    t = _numpy_type(name)
    view = np.uint8
    every = np.arange(2**fmt.bits, dtype=view).view(t).astype(np.float32)
    want = np.sort(np.unique(every[np.isfinite(every)]))
    np.testing.assert_array_equal(np.unique(fmt.values()), want)


NONSTANDARD = [
  formats.get("e1m2"),
  formats.get("e3m0"),
  formats.get("e2m2"),
  formats.get("e3m1"),
  formats.get("e3m3"),
  formats.get("e5m1"),
  formats.get("e2m0"),
  formats.ExMy(0, 3),
  formats.ExMy(3, 2, bias=5),
  formats.ExMy(4, 5, bias=3),
  formats.ExMy(6, 9),
]


class SlowReferenceTest(parameterized.TestCase):
  @parameterized.parameters(*NONSTANDARD)
  def test_nearest_even_matches_reference(self, fmt):
    vals = _reference_values(fmt)
    self.assertEqual(fmt.max, vals[-1])
    np.testing.assert_array_equal(fmt.values()[~np.signbit(fmt.values())], vals)
    rng = np.random.default_rng(1)
    mids = (vals[1:] + vals[:-1]) / 2
    a = np.concatenate(
      [
        vals,
        mids,
        np.nextafter(mids, 0),
        np.nextafter(mids, np.inf),
        rng.uniform(0, fmt.max * 1.2, 20_000),
        [fmt.max * 4, 1e30],
      ]
    ).astype(np.float32)
    mag, _ = _reference_encode_magnitude(a, fmt)
    sign = rng.integers(0, 2, a.shape)
    x = np.where(sign == 1, -a, a).astype(np.float32)
    want = (sign << (fmt.bits - 1)) | mag
    np.testing.assert_array_equal(np.asarray(fmt.encode(x)), want)
    np.testing.assert_array_equal(
      np.abs(np.asarray(fmt.round(x))), vals[mag].astype(np.float32)
    )

  @parameterized.product(
    fmt=[formats.get("e3m1"), formats.ExMy(2, 3)],
    rounding=["toward_zero", "nearest_away"],
  )
  def test_other_modes_match_reference(self, fmt, rounding):
    vals = _reference_values(fmt)
    mids = (vals[1:] + vals[:-1]) / 2
    rng = np.random.default_rng(2)
    a = np.concatenate([vals, mids, rng.uniform(0, fmt.max, 5000)]).astype(
      np.float32
    )
    mag, _ = _reference_encode_magnitude(a, fmt, rounding)
    got = np.asarray(fmt.encode(-a, rounding=rounding))
    np.testing.assert_array_equal(got, (1 << (fmt.bits - 1)) | mag)

  @parameterized.parameters(
    formats.ExMy(3, 3, special="ieee"),
    formats.ExMy(3, 3, special="fn"),
    formats.ExMy(2, 2, special="fnuz"),
  )
  def test_nonfinite_overflow_after_rounding(self, fmt):
    vals = _reference_values(fmt)
    ulp = vals[-1] - vals[-2]
    tie = np.float32(vals[-1] + ulp / 2)
    above = np.nextafter(tie, np.float32(np.inf))
    below = np.nextafter(tie, np.float32(0))
    out = np.asarray(fmt.round(np.array([below, tie, above], np.float32)))
    self.assertEqual(out[0], fmt.max)
    self.assertFalse(np.isfinite(out[2]))
    # The tie goes to the even neighbour: the overflow code when max is odd.
    max_is_odd = fmt.max_magnitude_code % 2 == 1
    self.assertEqual(np.isfinite(out[1]), not max_is_odd)
    sat = formats.ExMy(
      fmt.exponent_bits,
      fmt.mantissa_bits,
      special=fmt.special,
      overflow="saturate",
    )
    np.testing.assert_array_equal(
      np.asarray(sat.round(np.array([above, np.inf, -np.inf], np.float32))),
      [fmt.max, fmt.max, -fmt.max],
    )


class StochasticRoundingTest(parameterized.TestCase):
  @parameterized.parameters(
    ("float4_e2m1fn", 1.3),
    ("float4_e2m1fn", 0.2),
    ("e3m3", 0.01171875 * 1.7),
    ("float8_e4m3fn", 3.3),
  )
  def test_unbiased_and_between_neighbours(self, name, x):
    fmt = formats.get(name)
    n = 100_000
    xs = jnp.full((n,), x, jnp.float32)
    out = np.asarray(
      fmt.round(xs, rounding="stochastic", key=jax.random.key(0))
    )
    vals = fmt.values()
    lo, hi = vals[vals <= x].max(), vals[vals >= x].min()
    self.assertTrue(np.all((out == lo) | (out == hi)))
    p = (x - lo) / (hi - lo)
    sigma = (hi - lo) * np.sqrt(p * (1 - p) / n)
    self.assertLess(abs(out.mean() - x), 5 * sigma)
    self.assertGreater(p, 0.05)  # the probe is not on a grid point

  def test_key_reproducible_and_required(self):
    fmt = formats.get("e3m3")
    x = jnp.linspace(-5, 5, 1000)
    a = fmt.encode(x, rounding="stochastic", key=jax.random.key(3))
    b = fmt.encode(x, rounding="stochastic", key=jax.random.key(3))
    c = fmt.encode(x, rounding="stochastic", key=jax.random.key(4))
    np.testing.assert_array_equal(a, b)
    self.assertFalse(np.array_equal(a, c))
    with self.assertRaisesRegex(ValueError, "key"):
      fmt.encode(x, rounding="stochastic")


class TransformsAndErrorsTest(parameterized.TestCase):
  def test_jit_vmap_and_input_dtypes(self):
    fmt = formats.get("float6_e3m2fn")
    x = jax.random.normal(jax.random.key(0), (4, 257)) * 10
    eager = fmt.encode(x)
    np.testing.assert_array_equal(jax.jit(fmt.encode)(x), eager)
    np.testing.assert_array_equal(jax.vmap(fmt.encode)(x), eager)
    for dtype in (jnp.bfloat16, jnp.float16):
      xd = x.astype(dtype)
      np.testing.assert_array_equal(
        fmt.encode(xd), fmt.encode(xd.astype(jnp.float32))
      )

  def test_equal_formats_do_not_recompile(self):
    x = jnp.ones((33,), jnp.float32)
    formats.ExMy(3, 3, name="a").encode(x)
    before = exmy._encode._cache_size()
    formats.ExMy(3, 3, name="b").encode(x)  # equal: the name is not compared
    formats.get("e3m3").encode(x)
    self.assertEqual(exmy._encode._cache_size(), before)

  @parameterized.parameters((0, 0), (9, 1), (1, 24), (-1, 2))
  def test_impossible_format(self, e, m):
    with self.assertRaisesRegex(ValueError, r"0 <= e <= 8, 0 <= m <= 23"):
      formats.ExMy(e, m)

  def test_bias_out_of_float32(self):
    with self.assertRaisesRegex(ValueError, "overflows float32"):
      formats.ExMy(8, 3, bias=100)
    with self.assertRaisesRegex(ValueError, "below float32"):
      formats.ExMy(8, 3, bias=150)

  def test_bad_input_types(self):
    fmt = formats.get("e3m3")
    with self.assertRaisesRegex(TypeError, "floating point"):
      fmt.encode(jnp.arange(4))
    with self.assertRaisesRegex(TypeError, "round twice"):
      fmt.encode(np.ones(3, np.float64))
    with self.assertRaisesRegex(TypeError, "unsigned"):
      fmt.decode(jnp.arange(4))
    with self.assertRaisesRegex(ValueError, "rounding="):
      fmt.encode(jnp.ones(3), rounding="up")

  def test_unknown_name_lists_known(self):
    with self.assertRaisesRegex(ValueError, "float8_e4m3fn.*eXmY"):
      formats.get("float8_e4m4")

  def test_spec_is_canonical(self):
    self.assertEqual(formats.get("float8_e4m3fn").spec(), "e4m3_b7_fn")
    self.assertEqual(
      formats.get("float8_e8m0fnu").spec(),
      "ue8m0_b127_fn_nosub_nearest_away",
    )
    self.assertEqual(str(formats.get("e3m3")), "e3m3")


if __name__ == "__main__":
  absltest.main()
