"""ldexp in integer arithmetic against numpy's float32 ldexp: every
exponent class of x (zero, subnormal, normal, inf, NaN) and every shift."""

import numpy as np
from absl.testing import absltest

from qjax.formats import power_of_two


def _inputs():
  rng = np.random.default_rng(0)
  specials = np.array(
    [0.0, -0.0, np.inf, -np.inf, 1.0, -1.5, 3.0, np.finfo(np.float32).max],
    np.float32,
  )
  tiny = np.finfo(np.float32).smallest_subnormal
  subnormal = np.array(
    [tiny, -tiny, 3 * tiny, 2**-127, 2**-126 - tiny], np.float32
  )
  bits = rng.integers(0, 2**32, 4000, dtype=np.uint64).astype(np.uint32)
  random = bits.view(np.float32)
  random = random[np.isfinite(random)]
  return np.concatenate([specials, subnormal, random])


class LdexpTest(absltest.TestCase):
  def test_equals_numpy_for_every_shift(self):
    x = _inputs()
    for n in range(-300, 301, 1):
      want = np.ldexp(x, n).astype(np.float32)
      got = np.asarray(power_of_two.ldexp(x, n))
      np.testing.assert_array_equal(
        got.view(np.uint32), want.view(np.uint32), err_msg=f"n={n}"
      )

  def test_nan_stays_nan_and_shapes_broadcast(self):
    x = np.array([[np.nan], [1.0]], np.float32)
    got = np.asarray(power_of_two.ldexp(x, np.array([-3, 2])))
    self.assertTrue(np.isnan(got[0]).all())
    np.testing.assert_array_equal(got[1], [0.125, 4.0])

  def test_side_breaks_subnormal_ties_towards_the_exact_value(self):
    # 3 * 2^-150 lies halfway between 2^-149 and 2^-148: to even gives
    # 2^-148; a value just above or below it must go up or down.
    x = np.float32(3.0 * 2.0**-86)
    tiny = np.finfo(np.float32).smallest_subnormal
    got = [float(power_of_two.ldexp(x, -64, side)) for side in (-1, 0, 1)]
    self.assertEqual(got, [tiny, 2 * tiny, 2 * tiny])
    x = np.float32(5.0 * 2.0**-86)  # halfway between 2 and 3 ulps: even 2
    got = [float(power_of_two.ldexp(x, -64, side)) for side in (-1, 0, 1)]
    self.assertEqual(got, [2 * tiny, 2 * tiny, 3 * tiny])
    # Not a tie: side changes nothing; normal results are exact anyway.
    for v in (np.float32(2.9 * 2.0**-86), np.float32(1.5)):
      np.testing.assert_array_equal(
        power_of_two.ldexp(v, -64, 1), power_of_two.ldexp(v, -64)
      )

  def test_below_and_is_zero_read_subnormals_by_value(self):
    tiny = np.finfo(np.float32).smallest_subnormal
    x = np.array([0.0, -0.0, tiny, -(2**-127), 2**-63, 2**-62, np.nan])
    x = x.astype(np.float32)
    np.testing.assert_array_equal(
      power_of_two.below(x, -62), [1, 1, 1, 1, 1, 0, 0]
    )
    np.testing.assert_array_equal(
      power_of_two.is_zero(x), [1, 1, 0, 0, 0, 0, 0]
    )


if __name__ == "__main__":
  absltest.main()
