"""Integer grids and codebooks against slow references."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from qjax import formats


def _reference_int(x, fmt):
  """Python round-half-even on k = x / step, saturated; two's complement."""
  out = []
  for v in np.asarray(x, np.float64) / 2.0**fmt.step_exponent:
    k = min(max(round(v), fmt.qmin), fmt.qmax)  # Python round: ties to even
    out.append(k % 2**fmt.bits)
  return np.array(out)


class IntFormatTest(parameterized.TestCase):
  @parameterized.product(
    bits=[2, 3, 4, 8], signed=[True, False], symmetric=[False, True]
  )
  def test_matches_reference(self, bits, signed, symmetric):
    if symmetric and not signed:
      return
    fmt = formats.IntFormat(bits, signed=signed, symmetric=symmetric)
    vals = fmt.values().astype(np.float64)
    mids = (vals[1:] + vals[:-1]) / 2
    x = np.concatenate(
      [
        vals,
        mids,
        mids + 1e-3,
        mids - 1e-3,
        [fmt.max + 5, fmt.min - 5, 0.0, -0.0],
      ]
    )
    x = x.astype(np.float32)
    np.testing.assert_array_equal(fmt.encode(x), _reference_int(x, fmt))
    # Every code decodes to its value (0x80-style codes included).
    codes = np.arange(2**bits, dtype=np.uint8)
    k = codes.astype(np.int64)
    if signed:
      k = np.where(k >= 2 ** (bits - 1), k - 2**bits, k)
    np.testing.assert_array_equal(fmt.decode(codes), k.astype(np.float32))

  def test_mxint8_element(self):
    fmt, _ = formats.block_format("mxint8")
    self.assertEqual(fmt.max, 127 / 64)
    self.assertEqual(float(fmt.round(jnp.float32(-5.0))), -127 / 64)
    x = np.array([0.5 / 64 * 3, -1.0 / 64 * 2.5], np.float32)
    np.testing.assert_array_equal(fmt.round(x), [2 / 64, -2 / 64])

  def test_stochastic_is_unbiased(self):
    fmt = formats.get("int4")
    out = fmt.round(
      jnp.full((200_000,), 2.3), rounding="stochastic", key=jax.random.key(0)
    )
    self.assertTrue(set(np.unique(out)) <= {2.0, 3.0})
    self.assertAlmostEqual(float(out.mean()), 2.3, delta=0.005)

  def test_bad_widths(self):
    with self.assertRaisesRegex(ValueError, "1..16"):
      formats.IntFormat(17)
    with self.assertRaisesRegex(ValueError, "at least 2 bits"):
      formats.IntFormat(1)


class CodebookTest(absltest.TestCase):
  def test_nf4_nearest_entry(self):
    nf4 = formats.get("nf4")
    table = nf4.values().astype(np.float64)
    x = np.random.default_rng(0).uniform(-1.3, 1.3, 20_000).astype(np.float32)
    want = np.argmin(np.abs(x[:, None] - table[None, :]), axis=1)
    np.testing.assert_array_equal(nf4.encode(x), want)
    np.testing.assert_array_equal(
      nf4.decode(np.arange(16, dtype=np.uint8)), nf4.values()
    )
    self.assertEqual(nf4.bits, 4)
    self.assertEqual(nf4.values()[7], 0.0)

  def test_ties_take_the_lower_code(self):
    book = formats.Codebook((-1.0, 0.0, 0.5, 2.0))
    np.testing.assert_array_equal(
      book.encode(np.array([-0.5, 0.25, 1.25, 9.0], np.float32)), [0, 1, 2, 3]
    )

  def test_bad_tables(self):
    with self.assertRaisesRegex(ValueError, "2\\^b entries"):
      formats.Codebook((0.0, 1.0, 2.0))
    with self.assertRaisesRegex(ValueError, "increasing"):
      formats.Codebook((0.0, 2.0, 1.0, 3.0))


if __name__ == "__main__":
  absltest.main()
