"""QAF (CP-ADMM with factors on a grid): against a slow NumPy reference,
on-grid factors, and the comparison with factorize-then-quantize."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from qjax import formats
from qjax.formats import packing
from qjax.models import fmnist_cnn
from qjax.transforms import factorize as fz

INT4 = formats.get("int4")


# --- slow reference: float64 NumPy loops mirroring the authors' steps ------


def _np_project(x, candidates=200, qmin=-8, qmax=7):
  amax = np.max(np.abs(x))
  best, best_err = None, np.inf
  for t in np.linspace(0.2, 1.2, candidates) * amax:
    s = t / ((qmax - qmin) / 2)
    k = np.clip(np.round(x / s), qmin, qmax)  # numpy rounds half to even
    err = np.sum((k * s - x) ** 2)
    if err < best_err:
      best, best_err = (k * s, k, s), err
  return best


def _np_gram_mttkrp(x, fs, mode):
  others = [f for m, f in enumerate(fs) if m != mode]
  g = np.ones((fs[0].shape[1],) * 2)
  for f in others:
    g = g * (f.T @ f)
  spec = {0: "ijk,jr,kr->ir", 1: "ijk,ir,kr->jr", 2: "ijk,ir,jr->kr"}[mode]
  return g, np.einsum(spec, x, *others)


def _np_qaf(x, start, sweeps, inner):
  fs = [np.asarray(f, np.float64) for f in start]
  us = [np.zeros_like(f) for f in fs]
  fs = [_np_project(f)[0] for f in fs]
  errors = []
  for _ in range(sweeps):
    for mode in range(3):
      g, f = _np_gram_mttkrp(x, fs, mode)
      rank = g.shape[0]
      rho = np.trace(g) / rank
      a = g + rho * np.eye(rank)
      h, u = fs[mode], us[mode]
      for _ in range(inner):
        h_tilde = np.linalg.solve(a, (f + rho * (h + u)).T).T
        h = _np_project(h_tilde - u)[0]
        u = u + h - h_tilde
      fs[mode], us[mode] = h, u
    rec = np.einsum("ir,jr,kr->ijk", *fs)
    errors.append(np.linalg.norm(x - rec) / np.linalg.norm(x))
  return fs, errors


class RankTest(absltest.TestCase):
  def test_the_authors_ranks(self):
    # Checked in the authors' code at rate 2 (../shared/papers/qaf.md).
    for (cin, cout), want in {
      (64, 64): 134,
      (64, 128): 183,
      (128, 128): 278,
      (512, 512): 1141,
    }.items():
      self.assertEqual(fz.cp_rank((3, 3, cin, cout), 2), want)
    self.assertEqual(fz.cp_rank((128, 64), 2), 128 * 64 // (192 * 2))

  def test_bad_ranks_and_rates(self):
    with self.assertRaisesRegex(ValueError, "rank 0"):
      fz.cp_rank((3, 3, 1, 2), 10)
    with self.assertRaisesRegex(ValueError, "> 0"):
      fz.cp_rank((3, 3, 8, 8), 0)
    w = jnp.ones((3, 3, 4, 8))
    with self.assertRaisesRegex(ValueError, r"rank 0 is outside \[1, 32\]"):
      fz.cp_quantized(w, 0, INT4)
    with self.assertRaisesRegex(ValueError, "rank 33 is outside"):
      fz.cp_quantized(w, 33, INT4)
    with self.assertRaisesRegex(ValueError, "NaN/Inf"):
      fz.cp_quantized(w.at[0, 0, 0, 0].set(jnp.nan), 4, INT4)


class ReferenceTest(absltest.TestCase):
  def test_matches_float64_reference_with_fixed_iterations(self):
    w = jax.random.normal(jax.random.key(3), (3, 3, 10, 12))
    x = fz.to_tensor(w)
    x = x / jnp.max(jnp.abs(x))
    start = fz.initial_factors(x, 8, 30, jax.random.key(0))
    # eps = tol = 0: no early stop, so both run exactly 4 x 15 steps.
    projections, info = fz.qaf_factors(
      x, start, fmt=INT4, sweeps=4, inner=15, eps=0.0, tol=0.0, candidates=200
    )
    want, want_errors = _np_qaf(np.asarray(x, np.float64), start, 4, 15)
    np.testing.assert_allclose(info.errors, want_errors, atol=1e-4)
    self.assertEqual(int(info.sweeps), 4)
    np.testing.assert_array_equal(info.inner_steps, 15)
    for p, h in zip(projections, want, strict=True):
      # The MSE scale search may pick a neighbouring candidate (near-equal
      # errors); the codes must agree and the values stay close.
      k = np.asarray(INT4.decode(p.codes))
      k_want = np.round(h / _np_project(h)[2])
      self.assertGreater(np.mean(k == k_want), 0.99)
      np.testing.assert_allclose(p.values, h, rtol=0.02, atol=1e-3)

  def test_cp_als_start_fits_a_low_rank_tensor(self):
    keys = jax.random.split(jax.random.key(1), 3)
    true = [
      jax.random.normal(k, (n, 3)) for k, n in zip(keys, (7, 6, 5), strict=True)
    ]
    x = fz.reconstruct(true)
    start = fz.initial_factors(x, 3, 200, jax.random.key(2))
    rel = jnp.linalg.norm(fz.reconstruct(start) - x) / jnp.linalg.norm(x)
    self.assertLess(float(rel), 1e-3)


def _conv2():
  return fmnist_cnn.load_params()["conv2"]["kernel"]  # [3, 3, 32, 64]


class PropertyTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.w = _conv2()
    cls.rank = fz.cp_rank(cls.w.shape, 4)  # 43
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # the sweep cap, by design here
      cls.qaf4 = fz.cp_quantized(cls.w, cls.rank, INT4, sweeps=15, inner=50)

  def _error(self, kernel):
    return float(jnp.linalg.norm(kernel - self.w) / jnp.linalg.norm(self.w))

  def test_every_factor_is_on_its_int4_grid(self):
    for qt in self.qaf4.factors:
      self.assertEqual(qt.scaling.mode, "tensor")
      codes = packing.unpack(qt.codes, 4, qt.shape[-1])
      k = np.asarray(INT4.decode(codes))
      self.assertTrue(np.all((k >= -8) & (k <= 7)))
      self.assertLessEqual(len(np.unique(k)), 16)
      values = np.asarray(qt.dequantize())
      np.testing.assert_allclose(
        values / float(qt.scale.ravel()[0]), k, atol=1e-5
      )
    self.assertEqual(
      self.qaf4.nbytes,
      sum(
        qt.shape[0] * -(-qt.shape[1] * 4 // 8) + 4 for qt in self.qaf4.factors
      ),
    )

  def test_beats_factorize_then_quantize_on_a_real_conv(self):
    baseline = fz.cp_then_quantize(self.w, self.rank, INT4)
    ftq = self._error(fz.kernel_from_factors(baseline, self.w.shape))
    qaf = self._error(self.qaf4.dequantize())
    self.assertLess(qaf, ftq)
    errors = np.asarray(self.qaf4.info.errors)[: int(self.qaf4.info.sweeps)]
    self.assertLess(errors[-1], errors[0])  # the sweeps made progress

  def test_high_bit_width_approaches_float_cp(self):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      q8 = fz.cp_quantized(
        self.w, self.rank, formats.get("int8"), sweeps=10, inner=30
      )
    float_cp = float(q8.info.init_error)
    self.assertLess(self._error(q8.dequantize()), float_cp * 1.02)

  def test_sweep_cap_is_reported(self):
    with self.assertWarnsRegex(UserWarning, "sweep cap 2"):
      fz.cp_quantized(self.w, 8, INT4, sweeps=2, inner=5, tol=0.0)


class LayoutTest(absltest.TestCase):
  def test_tensor_layout_round_trips(self):
    w = jax.random.normal(jax.random.key(0), (3, 3, 4, 5))
    x = fz.to_tensor(w)
    self.assertEqual(x.shape, (5, 4, 9))
    np.testing.assert_array_equal(x[2, 1, 3 * 1 + 2], w[1, 2, 1, 2])
    np.testing.assert_array_equal(fz.from_tensor(x, w.shape), w)
    pointwise = jax.random.normal(jax.random.key(1), (1, 1, 6, 7))
    self.assertEqual(fz.tensor_modes(pointwise.shape), (7, 6))
    m = fz.to_tensor(pointwise)
    np.testing.assert_array_equal(m, pointwise[0, 0].T)
    np.testing.assert_array_equal(fz.from_tensor(m, pointwise.shape), pointwise)


if __name__ == "__main__":
  absltest.main()
