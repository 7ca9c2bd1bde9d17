"""RTN against NumPy references of the OCP MX / NVFP4 rules, plus properties."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl.testing import absltest, parameterized

from qjax import formats
from qjax.quantizers import rtn

# The worked example of ../shared/papers/block_scaled.md, padded to 32 with
# values of |v| <= 3.7 that do not change the block's amax.
EXAMPLE = np.array(
  [0.07, -0.5, 1.3, 2.9, -3.7, 0.26, -1.1, 0.9] + [0.5] * 24, np.float32
)


def _nearest_on_grid(y, grid):
  """Nearest grid value, ties to the even index (grid sorted, saturating)."""
  y = np.clip(y, grid[0], grid[-1])
  idx = np.searchsorted(grid, y)
  idx = np.clip(idx, 1, len(grid) - 1)
  lo, hi = grid[idx - 1], grid[idx]
  pick_hi = (hi - y < y - lo) | ((hi - y == y - lo) & (idx % 2 == 0))
  return np.where(pick_hi, hi, lo)


def _mx_reference(w, element_grid, emax_elem, rule="floor"):
  """OCP MX v1.0 FLOOR rule over blocks of 32 along axis 0, NumPy loops;
  rule='midmax': one exponent up when amax / 2^e passes the midpoint of
  [element max, 2^(emax_elem + 1)] (TensorCast)."""
  k, n = w.shape
  codes = np.zeros((k // 32, n), np.uint8)
  out = np.zeros_like(w)
  for b in range(k // 32):
    for j in range(n):
      block = w[32 * b : 32 * b + 32, j].astype(np.float64)
      amax = np.abs(block).max()
      e = -127 if amax == 0 else math.floor(math.log2(amax)) - emax_elem
      mid = (element_grid.max() + 2.0 ** (emax_elem + 1)) / 2
      if rule == "midmax" and amax / 2.0**e > mid:
        e += 1
      e = min(max(e, -127), 127)
      codes[b, j] = e + 127
      out[32 * b : 32 * b + 32, j] = (
        _nearest_on_grid(block / 2.0**e, element_grid) * 2.0**e
      )
  return codes, out


class MxTest(parameterized.TestCase):
  @parameterized.parameters(
    ("mxfp4", 2),
    ("mxfp6_e3m2", 4),
    ("mxfp6_e2m3", 2),
    ("mxfp8_e4m3", 8),
    ("mxfp8_e5m2", 15),
    ("mxint8", 0),
  )
  def test_matches_spec_reference(self, name, emax_elem):
    element, scaling = formats.block_format(name, axis=0)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 12)).astype(np.float32)
    w *= 10.0 ** rng.uniform(-3, 3, (1, 12)).astype(np.float32)
    w[:32, 0] = 0.0  # an all-zero block: scale code 0
    grid = np.unique(element.values().astype(np.float64))
    want_codes, want = _mx_reference(w, grid, emax_elem)
    q = rtn.rtn(w, element, scaling)
    q.validate()
    np.testing.assert_array_equal(q.scale, want_codes)
    np.testing.assert_array_equal(q.dequantize(), want.astype(np.float32))

  @parameterized.parameters(("mxfp4", 2), ("mxfp8_e4m3", 8), ("mxint8", 0))
  def test_midmax_rule_matches_reference(self, name, emax_elem):
    element, scaling = formats.block_format(name, axis=0)
    scaling = dataclasses.replace(scaling, scale_rule="midmax")
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 40)).astype(np.float32)
    w *= 10.0 ** rng.uniform(-2, 2, (1, 40)).astype(np.float32)
    w[5, 0] = 1.999 * 2.0**10  # amax / 2^e just under 2^(emax_elem + 1)
    grid = np.unique(element.values().astype(np.float64))
    want_codes, want = _mx_reference(w, grid, emax_elem, "midmax")
    floor_codes, _ = _mx_reference(w, grid, emax_elem)
    self.assertTrue(np.any(want_codes != floor_codes))  # the rule bites
    q = rtn.rtn(w, element, scaling)
    np.testing.assert_array_equal(q.scale, want_codes)
    np.testing.assert_array_equal(q.dequantize(), want.astype(np.float32))
    with self.assertRaisesRegex(ValueError, "rule for e8m0 scales"):
      formats.per_channel(scale_format="float32").__class__(
        scale_format="float32", scale_rule="midmax"
      )

  def test_worked_example_mxfp4(self):
    element, scaling = formats.block_format("mxfp4")
    q = rtn.rtn(EXAMPLE[:, None], element, scaling)
    self.assertEqual(int(q.scale[0, 0]), 0x7E)
    np.testing.assert_array_equal(
      q.dequantize()[:8, 0], [0, -0.5, 1.5, 3, -3, 0.25, -1, 1]
    )

  def test_worked_example_mxint8(self):
    element, scaling = formats.block_format("mxint8")
    q = rtn.rtn(EXAMPLE[:, None], element, scaling)
    self.assertEqual(int(q.scale[0, 0]), 127 + 1)  # X = 2
    codes = formats.unpack(q.codes, 8, 1)[:8, 0].view(np.int8)
    np.testing.assert_array_equal(codes, [2, -16, 42, 93, -118, 8, -35, 29])

  def test_worked_example_mxfp8_saturates(self):
    element, scaling = formats.block_format("mxfp8_e4m3")
    q = rtn.rtn(EXAMPLE[:, None], element, scaling)
    self.assertEqual(int(q.scale[0, 0]) - 127, -7)
    self.assertEqual(float(q.dequantize()[4, 0]), -3.5)  # -473.6 -> -448

  def test_mxint8_decodes_minus_two(self):
    element, _ = formats.block_format("mxint8")
    self.assertEqual(float(element.decode(np.array([0x80], np.uint8))[0]), -2)

  def test_ragged_blocks_are_an_error(self):
    element, scaling = formats.block_format("mxfp4")
    with self.assertRaisesRegex(ValueError, "block size 32 does not divide"):
      rtn.rtn(np.ones((48, 4), np.float32), element, scaling)


class NvFp4Test(absltest.TestCase):
  def _reference(self, w, naive=False):
    """float64 correctly rounded NVFP4 (naive=True: the float32 chain
    e4m3(f32(f32(amax_b / 6) / s_t)), e2m1(f32(w / f32(s_b * s_t))) that
    qjax used before, to show the test data has cases that tell them
    apart)."""
    positive = formats.get("float8_e4m3fn").values().astype(np.float64)
    e4m3 = np.unique(positive[np.isfinite(positive) & (positive >= 0)])
    e2m1 = np.unique(
      np.abs(formats.get("float4_e2m1fn").values().astype(np.float64))
    )
    s_t = np.float32(np.abs(w).max() / (6 * 448))
    out = np.zeros_like(w)
    for b in range(w.shape[0] // 16):
      for j in range(w.shape[1]):
        blk = w[16 * b : 16 * b + 16, j]
        amax = np.abs(blk).max()
        if naive:
          ratio = np.float32(amax / np.float32(6)) / s_t
        else:
          ratio = np.float64(amax) / (6 * np.float64(s_t))
        s_b = _nearest_on_grid(np.clip(ratio, 2.0**-9, 448), e4m3)
        if naive:
          y = np.abs(blk / np.float32(s_b * s_t)).astype(np.float64)
        else:
          y = np.abs(blk.astype(np.float64)) / (s_b * np.float64(s_t))
        q = np.sign(blk) * _nearest_on_grid(y, e2m1)
        s = np.float32(np.float32(s_b) * s_t)
        out[16 * b : 16 * b + 16, j] = q.astype(np.float32) * s
    return out

  def test_bf16_weights_round_as_the_exact_ratio_does(self):
    # bfloat16 weights (8-bit significands, like SmolLM2's) put block and
    # element ratios on midpoints exactly, where two float32 roundings
    # before the grid's used to pick the wrong neighbour.
    rng = np.random.default_rng(3)
    w = rng.standard_normal((512, 64)).astype(ml_dtypes.bfloat16)
    w = w.astype(np.float32)
    w[:16, 0] = [6 * 3.25, 1, 0.75, -2.5, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    element, scaling = formats.block_format("nvfp4")
    got = np.asarray(rtn.rtn(w, element, scaling).dequantize())
    want = self._reference(w)
    self.assertGreater(int(np.sum(self._reference(w, naive=True) != want)), 0)
    np.testing.assert_array_equal(got, want)

  def test_matches_reference(self):
    w = np.random.default_rng(1).standard_normal((64, 8)).astype(np.float32)
    element, scaling = formats.block_format("nvfp4")
    q = rtn.rtn(w, element, scaling)
    np.testing.assert_array_equal(q.dequantize(), self._reference(w))

  def test_worked_example(self):
    element, scaling = formats.block_format("nvfp4")
    q = rtn.rtn(EXAMPLE[:16, None], element, scaling)
    np.testing.assert_allclose(
      q.dequantize()[:8, 0],
      [0, -0.617, 1.233, 2.467, -3.7, 0.308, -1.233, 0.925],
      atol=1e-3,
    )
    self.assertEqual(float(q.dequantize()[4, 0]), np.float32(-3.7))


class BitsTest(parameterized.TestCase):
  @parameterized.parameters(
    ("mxfp4", 4.25),
    ("mxfp6_e3m2", 6.25),
    ("mxfp8_e4m3", 8.25),
    ("mxint8", 8.25),
    ("nvfp4", 4.5 + 32 / (256 * 64)),
  )
  def test_bits_per_weight_is_exact(self, name, bits):
    element, scaling = formats.block_format(name)
    q = rtn.rtn(np.ones((256, 64), np.float32), element, scaling)
    self.assertEqual(q.bits_per_weight, bits)

  def test_nbytes_formula(self):
    q = rtn.rtn(
      np.ones((96, 20), np.float32),
      formats.get("int3"),
      formats.per_block(32, axis=0, scale_format="bfloat16"),
    )
    self.assertEqual(q.nbytes, 96 * math.ceil(20 * 3 / 8) + 3 * 20 * 2)


class PropertiesTest(parameterized.TestCase):
  @parameterized.parameters(2, 3, 4, 8)
  def test_error_at_most_half_a_step(self, bits):
    w = jax.random.normal(jax.random.key(bits), (128, 33))
    scaling = formats.per_channel(axis=-1)
    q = rtn.rtn(w, formats.get(f"int{bits}"), scaling)
    scale = np.asarray(q.scale)  # [1, 33]
    err = np.abs(np.asarray(q.dequantize()) - np.asarray(w))
    self.assertTrue(np.all(err <= scale / 2 * (1 + 1e-6)))

  def test_exactly_representable_is_exact(self):
    rng = np.random.default_rng(3)
    codes = rng.integers(-7, 8, (64, 16)).astype(np.float32)
    codes[0] = 7  # every channel reaches the grid's max
    w = codes * 2.0 ** rng.integers(-4, 4, (1, 16)).astype(np.float32)
    q = rtn.rtn(w, formats.get("int4"), formats.per_channel())
    np.testing.assert_array_equal(q.dequantize(), w)

  @parameterized.parameters("int3", "uint3", "nf4", "float4_e2m1fn")
  def test_clip_search_never_worse(self, name):
    fmt = formats.get(name)
    w = jax.random.t(jax.random.key(0), 3.0, (256, 16))  # heavy tails
    scaling = formats.per_block(64, zero_point=name.startswith("u"))
    plain = rtn.rtn(w, fmt, scaling).dequantize()
    best = rtn.rtn(w, fmt, scaling, clip_ratios=(1.0, 0.9, 0.8, 0.7, 0.6))
    err = lambda d: np.sum(
      (np.asarray(d) - np.asarray(w)).reshape(4, 64, 16) ** 2, axis=1
    )
    e_plain, e_best = err(plain), err(best.dequantize())
    self.assertTrue(np.all(e_best <= e_plain * (1 + 1e-6)))
    self.assertLess(e_best.sum(), e_plain.sum())  # the search found something

  def test_zero_point_covers_range(self):
    w = np.linspace(0.5, 3.0, 64, dtype=np.float32)[:, None]  # all positive
    q = rtn.rtn(w, formats.get("uint4"), formats.per_block(64, zero_point=True))
    step = float(q.scale[0, 0])
    self.assertAlmostEqual(step, 3.0 / 15, places=6)  # [0, 3] in 15 steps
    err = np.abs(np.asarray(q.dequantize()) - w)
    self.assertLessEqual(err.max(), step / 2 + 1e-6)

  def test_shrunk_grid_keeps_its_bottom_and_clips_the_top(self):
    # MagR's beta: step beta * (max - min) / qmax, zero point from min.
    rng = np.random.default_rng(5)
    w = rng.standard_normal((64, 8)).astype(np.float32)
    scaling = formats.per_channel(-1, zero_point=True)
    qt = rtn.rtn(w, formats.get("uint3"), scaling, shrink=0.8)
    lo, hi = w.min(0), w.max(0)
    step = np.asarray(qt.scale).reshape(-1)
    np.testing.assert_allclose(step, 0.8 * (hi - lo) / 7, rtol=1e-6)
    np.testing.assert_array_equal(
      np.asarray(qt.zero).reshape(-1), np.round(-lo / step)
    )
    deq = np.asarray(qt.dequantize())
    top = (7 - np.round(-lo / step)) * step
    np.testing.assert_allclose(deq.max(0), top, rtol=1e-6)
    self.assertTrue(np.all(top < hi))  # clipped at the top

  def test_stochastic_rounding_is_unbiased(self):
    w = jnp.full((4096, 1), 0.3)
    w = w.at[0].set(1.0)  # channel max: scale 1/7
    keys = jax.random.split(jax.random.key(0), 64)
    means = [
      float(
        rtn.rtn(
          w,
          formats.get("int4"),
          formats.per_channel(),
          rounding="stochastic",
          key=k,
        )
        .dequantize()[1:]
        .mean()
      )
      for k in keys
    ]
    self.assertAlmostEqual(np.mean(means), 0.3, delta=2e-3)
    with self.assertRaisesRegex(ValueError, "key"):
      rtn.rtn(
        w, formats.get("int4"), formats.per_channel(), rounding="stochastic"
      )

  def test_ragged_blocks_when_allowed(self):
    w = jax.random.normal(jax.random.key(1), (576, 8))
    ragged = formats.per_block(128, ragged=True)
    q = rtn.rtn(w, formats.get("int4"), ragged)
    self.assertEqual(q.scale.shape, (5, 8))
    tail = np.asarray(w[512:])
    want = np.abs(tail).max(axis=0) / 7  # the short block's own amax
    np.testing.assert_allclose(q.scale[4], want, rtol=1e-6)
    with self.assertRaisesRegex(ValueError, "does not divide axis 0"):
      rtn.rtn(w, formats.get("int4"), formats.per_block(128))

  def test_format_and_zero_point_must_agree(self):
    with self.assertRaisesRegex(ValueError, "zero point"):
      rtn.rtn(
        np.ones((4, 4), np.float32), formats.get("uint4"), formats.per_channel()
      )


class QTensorTest(absltest.TestCase):
  def _q(self):
    w = jax.random.normal(jax.random.key(0), (64, 24))
    return w, rtn.rtn(w, *formats.block_format("mxfp4"))

  def test_jit_vmap_eval_shape_and_tree(self):
    w, q = self._q()
    np.testing.assert_array_equal(
      jax.jit(lambda t: t.dequantize())(q), q.dequantize()
    )
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), q, q)
    self.assertEqual(
      jax.vmap(lambda t: t.dequantize())(stacked).shape, (2, 64, 24)
    )
    element, scaling = formats.block_format("mxfp4")
    abstract = jax.eval_shape(lambda x: rtn.rtn(x, element, scaling), w)
    self.assertEqual(abstract.codes.shape, q.codes.shape)
    self.assertEqual(abstract.shape, (64, 24))
    self.assertLen(jax.tree.leaves(q), 2)  # codes, scale (None leaves drop)

  def test_validate_catches_broken_leaves(self):
    _, q = self._q()
    q.validate()
    broken = q.__class__(
      q.codes[:, :-1], q.scale, None, None, q.fmt, q.scaling, q.shape, q.dtype
    )
    with self.assertRaisesRegex(ValueError, "codes are"):
      broken.validate()
    broken = q.__class__(
      q.codes,
      q.scale.astype(jnp.float32),
      None,
      None,
      q.fmt,
      q.scaling,
      q.shape,
      q.dtype,
    )
    with self.assertRaisesRegex(ValueError, "scale dtype"):
      broken.validate()


if __name__ == "__main__":
  absltest.main()
