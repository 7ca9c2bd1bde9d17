"""tiny_scales.times_scale and times_two_level against NumPy float32, which
rounds subnormal products correctly (XLA:CPU flushes them)."""

import numpy as np
from absl.testing import absltest

from qjax.formats import tiny_scales


class TimesScaleTest(absltest.TestCase):
  def test_bit_exact_against_numpy_float32(self):
    rng = np.random.default_rng(0)
    values = rng.integers(-255, 256, (400, 6)).astype(np.float32)
    exponents = np.array([-149, -140, -130, -127, -100, -3])
    scale = (rng.uniform(1, 2, 6) * 2.0**exponents).astype(np.float32)
    got = np.asarray(tiny_scales.times_scale(values, scale, 9))
    want = values * scale  # NumPy: one correctly rounded product
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    self.assertTrue(np.all(got[:, :4].any(0)))  # flushing would zero these

  def test_ties_round_once(self):
    # v * s exactly halfway between subnormals, while v * (s * 2^64) in
    # float32 is exact: the single rounding to even must hold, and a
    # product just off the tie must round towards its side.
    tiny = np.finfo(np.float32).smallest_subnormal
    values = np.array([3.0, 5.0, 7.0, 255.0], np.float32)
    scale = np.float32(2.0**-150)
    got = np.asarray(tiny_scales.times_scale(values, scale, 9))
    np.testing.assert_array_equal(got, values * scale)
    off = np.float32(np.nextafter(np.float32(2.0**-86), np.float32(1)))
    scale = np.ldexp(off, -64).astype(np.float32)  # subnormal: rounded
    got = np.asarray(tiny_scales.times_scale(values, scale, 9))
    np.testing.assert_array_equal(got, values * scale)
    self.assertGreater(float(got[0]), 0)
    del tiny

  def test_two_level_with_a_subnormal_tensor_scale(self):
    rng = np.random.default_rng(1)
    values = rng.choice([-6.0, -1.5, 0.5, 3.0, 4.0], (64, 4)).astype(np.float32)
    block = rng.choice([0.25, 1.75, 448.0], (64, 4)).astype(np.float32)
    tensor = np.float32(3.3e-41)
    got = np.asarray(tiny_scales.times_two_level(values, block, tensor))
    up = block * np.ldexp(tensor, 64)  # the normal-range rule, at 2^64
    np.testing.assert_array_equal(got, np.ldexp(values * up, -64))
    self.assertTrue(got.any())
    normal = np.float32(0.01)
    np.testing.assert_array_equal(
      tiny_scales.times_two_level(values, block, normal),
      values * (block * normal),
    )


if __name__ == "__main__":
  absltest.main()
