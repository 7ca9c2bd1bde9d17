"""Coordinate-descent refinement against a slow NumPy sweep, plus descent."""

import numpy as np
from absl.testing import absltest, parameterized

from qjax import formats
from qjax.quantizers import coordinate_descent, gptq, rtn


def _layer(seed, n_in=48, n_out=10, tokens=200):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((tokens, n_in))
  x = x @ rng.standard_normal((n_in, n_in)) * 0.3 + x  # correlated inputs
  w = rng.standard_normal((n_in, n_out)).astype(np.float32)
  return w, ((2 / tokens) * x.T @ x).astype(np.float32)


def _slow_sweeps(w0, qt, h, sweeps, damp):
  """Entry by entry, in float64, nearest grid point of the 1-D optimum."""
  w0 = w0.astype(np.float64)
  scale, zero = (
    np.asarray(a, np.float64) for a in coordinate_descent._full_grid(qt)
  )
  fmt = qt.fmt
  # Every value the (saturating) encoder can produce: the grid's levels.
  sat = rtn._saturating(fmt)
  all_codes = np.arange(2**fmt.bits, dtype=np.uint8)
  levels = np.unique(np.asarray(sat.decode(sat.encode(sat.decode(all_codes)))))
  levels = levels.astype(np.float64)
  s = h.astype(np.float64) + damp * np.mean(np.diag(h)) * np.eye(len(h))
  q = np.asarray(qt.dequantize(), np.float64)
  for _ in range(sweeps):
    for j in range(w0.shape[0]):
      for c in range(w0.shape[1]):
        d = w0[:, c] - q[:, c]
        others = s[j] @ d - s[j, j] * d[j]
        target = w0[j, c] + others / s[j, j]
        values = (levels - zero[j, c]) * scale[j, c]
        q[j, c] = values[np.argmin(np.abs(values - target))]
  return q


class RefineTest(parameterized.TestCase):
  @parameterized.parameters(
    ("uint3", formats.per_channel(-1, zero_point=True), 2, 128),
    ("uint3", formats.per_channel(-1, zero_point=True), 2, 16),
    ("int4", formats.per_block(16, axis=0), 1, 20),  # 48 = 20 + 20 + 8
  )
  def test_matches_slow_sweeps(self, name, scaling, sweeps, block_size):
    w, h = _layer(0)
    fmt = formats.get(name)
    qt = rtn.rtn(w, fmt, scaling)
    got, _ = coordinate_descent.refine(
      w, qt, h, sweeps=sweeps, block_size=block_size
    )
    want = _slow_sweeps(w, qt, h, sweeps, 0.75)
    np.testing.assert_allclose(got.dequantize(), want, atol=1e-5)
    np.testing.assert_array_equal(got.scale, qt.scale)

  def test_damped_loss_never_increases_from_gptq(self):
    for seed in range(3):
      w, h = _layer(seed)
      scaling = formats.per_channel(-1, zero_point=True)
      qt, _ = gptq.gptq(w, h, formats.get("uint2"), scaling)
      refined, info = coordinate_descent.refine(w, qt, h, sweeps=5)
      losses = np.asarray(info.losses)
      self.assertTrue(np.all(np.diff(losses) <= 1e-6 * losses[0]), losses)
      self.assertLess(losses[-1], losses[0])  # 2-bit GPTQ is never optimal
      self.assertFalse(np.array_equal(refined.codes, qt.codes))

  def test_bad_input(self):
    w, h = _layer(0)
    qt = rtn.rtn(w, formats.get("int4"), formats.per_channel(-1))
    with self.assertRaisesRegex(ValueError, "does not match"):
      coordinate_descent.refine(w[:5], qt, h)
    with self.assertRaisesRegex(ValueError, "NaN/Inf"):
      coordinate_descent.refine(w, qt, h * np.nan)


if __name__ == "__main__":
  absltest.main()
