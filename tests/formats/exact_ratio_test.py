"""exact_ratio: x against a * b compared exactly, against Python fractions."""

import fractions

import numpy as np
from absl.testing import absltest

from qjax import formats
from qjax.formats import exact_ratio


class CompareProductTest(absltest.TestCase):
  def test_matches_rational_arithmetic_on_ties_and_near_ties(self):
    rng = np.random.default_rng(0)
    n = 4000
    # a: at most 7 significant bits, as a midpoint times a block scale is.
    a = (rng.integers(64, 128, n) * 2.0 ** rng.integers(-8, 4, n)).astype(
      np.float32
    )
    b = rng.uniform(1e-4, 1e2, n).astype(np.float32)
    products = [
      fractions.Fraction(float(p)) * fractions.Fraction(float(q))
      for p, q in zip(a, b, strict=True)
    ]
    # x: the float32 nearest a * b, its neighbours, and exact ties where
    # a * b is a float32.
    nearest = np.array([float(p) for p in products], np.float32)
    x = np.concatenate(
      [
        nearest,
        np.nextafter(nearest, np.float32(np.inf)),
        np.nextafter(nearest, np.float32(0)),
        a * np.float32(0.5),  # a * 0.5: x == a * b exactly when b = 0.5
      ]
    )
    a4 = np.concatenate([a, a, a, a])
    b4 = np.concatenate([b, b, b, np.full(n, 0.5, np.float32)])
    products4 = products * 3 + [fractions.Fraction(float(p)) / 2 for p in a]
    greater, equal = exact_ratio.compare_product(x, a4, b4)
    want_greater = [
      fractions.Fraction(float(v)) > p
      for v, p in zip(x, products4, strict=True)
    ]
    want_equal = [
      fractions.Fraction(float(v)) == p
      for v, p in zip(x, products4, strict=True)
    ]
    np.testing.assert_array_equal(np.asarray(greater), want_greater)
    np.testing.assert_array_equal(np.asarray(equal), want_equal)
    # The float32 product alone gets some of these wrong.
    naive = x > a4 * b4
    self.assertGreater(int(np.sum(naive != np.array(want_greater))), 0)

  def test_significant_bits(self):
    self.assertEqual(exact_ratio.significant_bits(6.0), 2)
    self.assertEqual(exact_ratio.significant_bits(448.0), 3)
    self.assertEqual(exact_ratio.significant_bits(0.75), 2)
    self.assertEqual(exact_ratio.significant_bits(0.0), 0)
    self.assertEqual(exact_ratio.significant_bits(127.0), 7)

  def test_wide_elements_are_refused_not_rounded_wrongly(self):
    # A 4-bit E4M3 scale times an E5M7 midpoint needs 13 bits: the exact
    # comparison would not be exact, so it refuses instead of guessing.
    wide, narrow = formats.get("e5m7"), formats.get("float4_e2m1fn")
    self.assertTrue(exact_ratio.fits(4, narrow))
    self.assertFalse(exact_ratio.fits(4, wide))
    x = np.ones(3, np.float32)
    with self.assertRaisesRegex(ValueError, "13 > 12 bits"):
      exact_ratio.nearest_magnitude_code(x, 1.0, 4, x, wide, x.astype(np.int32))


if __name__ == "__main__":
  absltest.main()
