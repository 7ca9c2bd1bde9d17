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


if __name__ == "__main__":
  absltest.main()
