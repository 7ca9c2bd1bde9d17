"""MagR against a bisection prox and a slow NumPy solver, plus properties."""

import numpy as np
from absl.testing import absltest, parameterized

from qjax.transforms import magr


def _prox_bisection(v, t):
  """sign(v) min(|v|, tau) with sum (|v| - tau)_+ = t; 0 if ||v||_1 <= t."""
  a = np.abs(v)
  if a.sum() <= t:
    return np.zeros_like(v)
  lo, hi = 0.0, a.max()
  for _ in range(200):
    tau = (lo + hi) / 2
    if np.maximum(a - tau, 0).sum() > t:
      lo = tau
    else:
      hi = tau
  return np.sign(v) * np.minimum(a, (lo + hi) / 2)


def _slow_magr(w0, h, alpha, iters, group=None):
  w0 = w0.astype(np.float64)
  hn = h.astype(np.float64) / np.linalg.eigvalsh(h.astype(np.float64))[-1]
  w = w0.copy()
  m, n = w.shape
  g = group or m
  for _ in range(iters):
    v = w - hn @ (w - w0)
    for j in range(n):
      for s in range(0, m, g):
        w[s : s + g, j] = _prox_bisection(v[s : s + g, j], alpha)
  return w


def _layer(seed, m=64, n=12, tokens=48):  # tokens < m: singular H
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((tokens, m))
  w = rng.standard_normal((m, n)).astype(np.float32)
  w[rng.integers(0, m, n), np.arange(n)] *= 6  # outliers to shrink
  return w, (x.T @ x).astype(np.float32)


class ProxTest(parameterized.TestCase):
  @parameterized.parameters("sort", "pivot")
  def test_prox_matches_bisection_and_properties(self, projection):
    rng = np.random.default_rng(0)
    v = rng.standard_normal((40, 30)) * rng.uniform(0.01, 3, (1, 30))
    v[:3, 0] = 0.0  # zeros and ties must not upset rho or the pivot
    v[:5, 1] = 2.5
    for t in (0.05, 1.0, 30.0):
      got = np.asarray(magr.prox_linf(v.astype(np.float32), t, projection))
      want = np.stack([_prox_bisection(v[:, j], t) for j in range(30)], 1)
      np.testing.assert_allclose(got, want, atol=1e-5)
      self.assertTrue(np.all(np.abs(got).max(0) <= np.abs(v).max(0) + 1e-6))
    p = np.asarray(magr.project_l1_ball(v.astype(np.float32), projection))
    self.assertTrue(np.all(np.abs(p).sum(0) <= 1 + 1e-5))
    # On the sphere's outside the projection lands on it (||P(v)||_1 = 1).
    outside = np.abs(v).sum(0) > 1
    np.testing.assert_allclose(np.abs(p).sum(0)[outside], 1.0, rtol=1e-5)

  @parameterized.parameters("sort", "pivot")
  def test_zero_and_tiny_t_on_huge_values_give_v_not_nan(self, projection):
    # v / t overflowed: t = 0 and |v| > 3.4e8 returned NaN.
    v = np.array([[1e9, 0.5], [-3e38, 0.25], [2.0, -0.125]], np.float32)
    for t in (0.0, 1e-30, 1e-35):
      got = np.asarray(magr.prox_linf(v, t, projection))
      np.testing.assert_array_equal(got, v, err_msg=f"t={t}")
    # An ordinary column beside an overflowing one is still shrunk.
    w = np.array([[3e38, 2.0], [1.0, 0.5]], np.float32)
    got = np.asarray(magr.prox_linf(w, 1e-3, projection))
    np.testing.assert_array_equal(got[:, 0], w[:, 0])
    np.testing.assert_allclose(
      got[:, 1], _prox_bisection(w[:, 1].astype(np.float64), 1e-3), atol=1e-6
    )

  def test_sort_and_pivot_agree_on_a_real_scale_layer(self):
    rng = np.random.default_rng(1)
    v = rng.standard_normal((576, 300)).astype(np.float32) * 0.05
    a = magr.project_l1_ball(v, "sort")
    b = magr.project_l1_ball(v, "pivot")
    np.testing.assert_allclose(a, b, atol=1e-6)

  def test_unknown_projection(self):
    with self.assertRaisesRegex(ValueError, "unknown projection 'heap'"):
      magr.project_l1_ball(np.ones((3, 2), np.float32), "heap")


class MagRTest(parameterized.TestCase):
  @parameterized.parameters(
    (None, 1e-3, "pivot"),
    (None, 1e-3, "sort"),
    (16, 1e-4, "pivot"),
    (24, 1e-4, "sort"),  # 64 = 2 x 24 + 16: a short last group
    (24, 1e-4, "pivot"),
  )
  def test_matches_slow_solver(self, group, alpha, projection):
    w, h = _layer(1)
    got, _ = magr.magr(
      w, h, alpha=alpha, iters=30, group_size=group, projection=projection
    )
    want = _slow_magr(w, h, alpha, 30, group)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-3)

  def test_objective_descends_and_ranges_shrink(self):
    w, h = _layer(2)
    out, info = magr.magr(w, h, alpha=1e-3, iters=200)
    obj = np.asarray(info.objective)
    self.assertTrue(np.all(np.diff(obj) <= 1e-5 * obj[0]))
    self.assertLess(obj[-1], obj[0])
    before, after = np.abs(w).max(0), np.abs(np.asarray(out)).max(0)
    self.assertTrue(np.all(after <= before + 1e-6))
    # Every iterate, not only the last (the solver is deterministic, so
    # iters=k returns the k-th iterate).
    for k in (1, 3, 10, 40):
      w_k, _ = magr.magr(w, h, alpha=1e-3, iters=k)
      self.assertTrue(np.all(np.abs(np.asarray(w_k)).max(0) <= before + 1e-6))
    # The fit term is 0 at W0, so a lower objective means a smaller penalty.
    self.assertLess(after.sum(), before.sum())

  def test_alpha_zero_and_scale_invariance(self):
    w, h = _layer(3)
    same, _ = magr.magr(w, h, alpha=0.0, iters=20)
    np.testing.assert_allclose(same, w, atol=1e-6)
    a, _ = magr.magr(w, h, alpha=1e-3, iters=50)
    b, _ = magr.magr(w, 7.0 * h, alpha=1e-3, iters=50)
    np.testing.assert_allclose(a, b, atol=1e-5)

  def test_bad_input(self):
    w, h = _layer(4)
    with self.assertRaisesRegex(ValueError, "group_size must be positive"):
      magr.magr(w, h, group_size=0)
    with self.assertRaisesRegex(ValueError, "NaN/Inf"):
      magr.magr(w, h * np.nan)
    with self.assertRaisesRegex(ValueError, "all zeros"):
      magr.magr(w, h * 0)
    with self.assertRaisesRegex(ValueError, "w \\[in, out\\] and h"):
      magr.magr(w, h[:3, :3])


if __name__ == "__main__":
  absltest.main()
