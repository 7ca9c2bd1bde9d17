"""nearest64.nearest_code against exact rational arithmetic."""

from fractions import Fraction

import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from qjax import formats
from qjax.formats import nearest64
from qjax.quantizers import rtn


def _f64(v):
  # Under float64_allowed, Python and NumPy scalars still enter as float32;
  # a NumPy array with an explicit dtype keeps all 53 bits.
  return jnp.asarray(np.asarray(v, np.float64), jnp.float64)


def _exact_nearest(x, table, unit, zero):
  """The grid value v minimising |x - (v - zero) * unit| in exact
  arithmetic; None on a tie."""
  x, unit, zero = Fraction(float(x)), Fraction(float(unit)), Fraction(zero)
  dist = sorted((abs(x - (Fraction(v) - zero) * unit), v) for v in table)
  if dist[0][0] == dist[1][0]:
    return None
  return dist[0][1]


def _near_midpoints(table, zero, unit, rng, count=4000):
  """float64 x within a few float32 ulps of the grid's midpoints, and a
  few far outside the grid (saturation)."""
  mids = (table[1:] + table[:-1]) / 2
  pick = rng.choice(mids, count)
  x = (pick - zero) * unit
  # Offsets between float64's and float32's resolution, either side.
  ulps = rng.integers(-3, 4, count) * 2.0**-24 + rng.uniform(-1, 1, count) * (
    2.0**-30
  )
  x = x + np.abs(x) * ulps
  far = (np.array([table[0], table[-1]]) - zero) * unit * 3
  return np.concatenate([x, far])


class NearestCodeTest(parameterized.TestCase):
  @parameterized.parameters("uint4", "int8", "float8_e4m3fn", "e2m1", "nf4")
  def test_matches_exact_rational_rounding(self, name):
    fmt = rtn._saturating(formats.get(name))
    table = nearest64.grid_values(fmt)
    rng = np.random.default_rng(len(name))
    zero = 6.0 if name == "uint4" else 0.0
    unit = np.float32(rng.uniform(1e-3, 1e-2))
    x = _near_midpoints(table, zero, float(unit), rng)
    z = jnp.float32(zero) if name == "uint4" else None
    with nearest64.float64_allowed():
      x64 = _f64(x)
      estimate = rtn.encode_scaled(x64.astype(jnp.float32), fmt, unit, z)
      got = nearest64.nearest_code(x64, estimate, fmt, _f64(unit), z)
    got_values = np.asarray(fmt.decode(got), np.float64)
    estimate_values = np.asarray(fmt.decode(estimate), np.float64)
    want = [_exact_nearest(v, table, unit, zero) for v in x]
    decided = np.array([w is not None for w in want])
    want = np.array([np.nan if w is None else w for w in want])
    np.testing.assert_array_equal(got_values[decided], want[decided])
    # The float32 estimate alone gets some of these wrong: the data tells
    # the two apart.
    self.assertGreater(np.sum(estimate_values[decided] != want[decided]), 10)

  def test_two_level_unit_nvfp4(self):
    element, _ = formats.block_format("nvfp4")
    fmt = rtn._saturating(element)
    table = nearest64.grid_values(fmt)
    rng = np.random.default_rng(7)
    block, tensor = np.float32(1.75), np.float32(rng.uniform(1e-4, 1e-3))
    unit = float(block) * float(tensor)  # exact: 3 + 24 bits
    x = _near_midpoints(table, 0.0, unit, rng)
    with nearest64.float64_allowed():
      x64 = _f64(x)
      estimate = rtn.encode_scaled(
        x64.astype(jnp.float32), fmt, block * tensor, None, (block, tensor)
      )
      got = nearest64.nearest_code(x64, estimate, fmt, _f64(unit))
    want = [_exact_nearest(v, table, unit, 0) for v in x]
    want = np.array([np.nan if w is None else w for w in want])
    decided = ~np.isnan(want)
    np.testing.assert_array_equal(
      np.asarray(fmt.decode(got), np.float64)[decided], want[decided]
    )

  def test_float32_values_keep_the_float32_code(self):
    # Where x is itself a float32 value the float32 rule stands, so that a
    # float64 solver and RTN agree on unchanged weights; signs of zero too.
    fmt = rtn._saturating(formats.get("float8_e4m3fn"))
    x = np.array([-1e-30, 1e-30, -0.0, 0.3, -448.0, 1e9], np.float32)
    with nearest64.float64_allowed():
      estimate = rtn.encode_scaled(jnp.asarray(x), fmt, jnp.float32(1.0))
      got = nearest64.nearest_code(_f64(x), estimate, fmt, _f64(1.0))
    np.testing.assert_array_equal(got, estimate)

  def test_grid_values_sorted_finite_unique(self):
    values = nearest64.grid_values(formats.get("float8_e4m3fn"))
    self.assertEqual(values.size, 253)  # 256 codes, -0 and two NaNs merged
    self.assertTrue(np.all(np.diff(values) > 0))
    self.assertFalse(
      nearest64.refines(formats.IntFormat(4, rounding="toward_zero"))
    )


if __name__ == "__main__":
  absltest.main()
