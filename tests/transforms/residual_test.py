"""PIPE/REx residual expansion against a slow NumPy reference, plus its
error bound, monotonicity, sparsity budget and bad-input errors."""

import functools
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl.testing import absltest, parameterized

from qjax import formats
from qjax.models import minilm
from qjax.transforms import residual

CHANNEL = formats.per_channel()


def _heavy_tailed(shape, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_t(3, shape) * 0.05).astype(np.float32)


def _ref_round(y, fmt_name):
  """Round y (already divided by its scale) onto the element grid."""
  if fmt_name == "e2m1":
    return np.clip(y, -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
  q = {"int4": 7, "int2": 1, "int8": 127}[fmt_name]
  return np.clip(np.round(y), -q, q).astype(np.float32)  # half to even


def _ref_quantize(x, fmt_name):
  """Symmetric per-output-channel RTN in float32, column by column."""
  top = np.float32(
    6 if fmt_name == "e2m1" else {"int4": 7, "int2": 1, "int8": 127}[fmt_name]
  )
  out = np.zeros_like(x)
  for c in range(x.shape[-1]):
    col = x[..., c]
    s = np.float32(np.max(np.abs(col)) / top)
    if s == 0:
      continue
    out[..., c] = _ref_round(col / s, fmt_name) * s
  return out


def _ref_expand(w, fmt_name, order, keep):
  """The expansion by its definition: lists of dense terms and kept columns."""
  total = np.zeros_like(w)
  terms, kept = [], []
  for k in range(order):
    res = w - total
    if k == 0 or keep >= 1:
      cols = np.arange(w.shape[-1])
    else:
      norms = np.sqrt(np.sum(res.reshape(-1, w.shape[-1]) ** 2, axis=0))
      n = math.ceil(keep * w.shape[-1])
      cols = np.sort(np.argsort(-norms, kind="stable")[:n])
    term = np.zeros_like(w)
    term[..., cols] = _ref_quantize(res[..., cols], fmt_name)
    terms.append(term)
    kept.append(cols)
    total = total + term
  return terms, kept


class ExpandTest(parameterized.TestCase):
  @parameterized.product(
    fmt=["int4", "int2", "e2m1"],
    keep=[1.0, 0.5, 0.3],
    shape=[(96, 40), (3, 3, 8, 24)],
  )
  def test_matches_reference(self, fmt, keep, shape):
    w = _heavy_tailed(shape)
    e = residual.expand(w, formats.get(fmt), CHANNEL, order=4, keep=keep)
    e.validate()
    terms, kept = _ref_expand(w, fmt, 4, keep)
    for k in range(4):
      if keep < 1 and k:
        np.testing.assert_array_equal(e.keep[k], kept[k])
        self.assertEqual(e.terms[k].shape[-1], len(kept[k]))
      else:
        self.assertIsNone(e.keep[k])
      np.testing.assert_allclose(e.term(k), terms[k], rtol=0, atol=1e-7)
    np.testing.assert_allclose(
      residual.reconstruct(e), sum(terms), rtol=0, atol=1e-6
    )

  @parameterized.product(fmt=["int4", "int2", "e2m1"], keep=[1.0, 0.5])
  def test_error_never_grows_with_the_order(self, fmt, keep):
    w = _heavy_tailed((128, 64), seed=1)
    e = residual.expand(w, formats.get(fmt), CHANNEL, order=5, keep=keep)
    errors = [np.abs(w - residual.reconstruct(e, k)) for k in range(1, 6)]
    for a, b in zip(errors, errors[1:], strict=False):
      self.assertTrue(np.all(b <= a))
      if keep == 1.0:
        self.assertLess(b.max(), a.max())

  @parameterized.parameters("int4", "int2", "int8", "e2m1", "nf4")
  def test_dense_error_within_bound_and_half_step(self, fmt):
    w = _heavy_tailed((256, 32), seed=2)
    f = formats.get(fmt)
    ulp = 4 * np.finfo(np.float32).eps * np.abs(w).max()
    for order in range(1, 4):
      e = residual.expand(w, f, CHANNEL, order=order)
      err = np.abs(w - np.asarray(residual.reconstruct(e)))
      bound = np.asarray(residual.error_bound(w, f, CHANNEL, order))
      self.assertTrue(np.all(err <= bound + ulp), f"order {order}")
      if fmt.startswith("int"):  # within the last order's half step
        step = np.asarray(e.terms[-1].scale)
        self.assertTrue(np.all(err <= step / 2 + ulp))

  def test_bound_is_nearly_attained_on_heavy_tails(self):
    w = _heavy_tailed((512, 16), seed=3)
    f = formats.get("int4")
    e = residual.expand(w, f, CHANNEL, order=2)
    err = np.abs(w - np.asarray(residual.reconstruct(e))).max(axis=0)
    bound = np.asarray(residual.error_bound(w, f, CHANNEL, 2)).max(axis=0)
    self.assertGreater(np.max(err / bound), 0.5)  # a loose bound would fail

  def test_ternary_error_at_least_halves_per_order(self):
    w = _heavy_tailed((64, 16), seed=4)
    e = residual.expand(w, formats.get("int2"), CHANNEL, order=6)
    maxes = [
      np.abs(w - np.asarray(residual.reconstruct(e, k))).max(axis=0)
      for k in range(1, 7)
    ]
    for a, b in zip(maxes, maxes[1:], strict=False):
      self.assertTrue(np.all(b <= a / 2 + 1e-9))

  @parameterized.parameters("mxfp4", "mxint8", "mxfp8_e4m3")
  def test_mx_terms_within_bound(self, name):
    fmt, scaling = formats.block_format(name, axis=0)
    w = _heavy_tailed((128, 48), seed=5)
    for order in (1, 2, 3):
      e = residual.expand(w, fmt, scaling, order=order, keep=0.5)
      err = np.abs(w - np.asarray(residual.reconstruct(e)))
      counts = residual.orders_per_channel(e)
      bound = residual.error_bound(w, fmt, scaling, counts)
      self.assertTrue(np.all(err <= np.asarray(bound) * (1 + 1e-6)))

  def test_sparse_bound_counts_orders_per_channel(self):
    w = _heavy_tailed((64, 30), seed=6)
    f = formats.get("int4")
    e = residual.expand(w, f, CHANNEL, order=3, keep=0.2)
    counts = np.asarray(residual.orders_per_channel(e))
    self.assertEqual(counts.sum(), 30 + 2 * 6)
    err = np.abs(w - np.asarray(residual.reconstruct(e)))
    bound = np.asarray(residual.error_bound(w, f, CHANNEL, counts))
    self.assertTrue(np.all(err <= bound * (1 + 1e-6)))
    dense = np.asarray(residual.error_bound(w, f, CHANNEL, 3))
    self.assertTrue(np.any(err > dense))  # dropped channels miss orders

  @parameterized.parameters(0.1, 0.25, 0.5, 0.77, 1.0)
  def test_budget_met_exactly(self, keep):
    w = _heavy_tailed((64, 50), seed=7)
    e = residual.expand(w, formats.get("int4"), CHANNEL, order=3, keep=keep)
    n = math.ceil(keep * 50)
    cols = [50] + [n if keep < 1 else 50] * 2
    self.assertEqual([t.shape[-1] for t in e.terms], cols)
    for idx in e.keep[1:]:
      if idx is not None:
        self.assertLen(np.unique(idx), n)
    # Hand count: 4-bit codes packed along each row (a byte holds two), a
    # float32 scale per column, int32 indices.
    want = sum(64 * math.ceil(c / 2) + 4 * c for c in cols)
    want += 0 if keep == 1 else 2 * 4 * n
    self.assertEqual(e.nbytes, want)
    self.assertAlmostEqual(e.bits_per_weight, 8 * want / (64 * 50))

  def test_first_order_from_another_quantizer(self):
    w = _heavy_tailed((64, 16), seed=8)
    f = formats.get("int4")
    first = formats_rtn(w, f, CHANNEL, shrink=0.5)
    e = residual.expand(w, f, CHANNEL, order=2, first=first)
    np.testing.assert_array_equal(e.terms[0].codes, first.codes)
    err1 = np.abs(w - np.asarray(first.dequantize())).max()
    err2 = np.abs(w - np.asarray(residual.reconstruct(e))).max()
    self.assertLess(err2, err1 / 5)

  def test_rank_by_weight(self):
    w = _heavy_tailed((32, 20), seed=9)
    w[:, 3] *= 50  # the largest column by norm
    e = residual.expand(
      w, formats.get("int4"), CHANNEL, order=3, keep=0.05, rank_by="weight"
    )
    np.testing.assert_array_equal(e.keep[1], [3])
    np.testing.assert_array_equal(e.keep[2], [3])

  def test_jit_and_no_recompile(self):
    f = formats.get("int4")
    expand = jax.jit(
      functools.partial(
        residual.expand, fmt=f, scaling=CHANNEL, order=3, keep=0.5
      )
    )
    w1, w2 = _heavy_tailed((64, 32), 10), _heavy_tailed((64, 32), 11)
    a = expand(w1)
    eager = residual.expand(w1, f, CHANNEL, order=3, keep=0.5)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(eager), strict=True):
      np.testing.assert_array_equal(x, y)
    before = expand._cache_size()
    expand(w2)
    self.assertEqual(expand._cache_size(), before)

  def test_real_layer(self):
    w = np.asarray(minilm.load_params()["layer_0"]["ffn_in"]["kernel"])
    f = formats.get("int4")
    prev = np.inf
    for order in (1, 2, 3):
      e = residual.expand(w, f, CHANNEL, order=order, keep=0.5)
      err = np.abs(w - np.asarray(residual.reconstruct(e)))
      counts = residual.orders_per_channel(e)
      bound = np.asarray(residual.error_bound(w, f, CHANNEL, counts))
      self.assertTrue(np.all(err <= bound * (1 + 1e-6)))
      self.assertLess(np.sum(err**2), prev)
      prev = np.sum(err**2)

  def test_split_sums_to_the_expansion(self):
    w = _heavy_tailed((40, 24), seed=12)
    e = residual.expand(w, formats.get("int4"), CHANNEL, order=4, keep=0.5)
    for groups in [((0,), (1,), (2,), (3,)), ((0, 2), (1, 3)), ((0, 1, 2, 3),)]:
      parts = residual.split(e, groups)
      total = sum(residual.reconstruct(p) for p in parts)
      np.testing.assert_allclose(total, residual.reconstruct(e), atol=1e-7)
      self.assertEqual(sum(p.nbytes for p in parts), e.nbytes)


def formats_rtn(w, fmt, scaling, **kw):
  from qjax.quantizers import rtn

  return rtn.rtn(w, fmt, scaling, **kw)


class BadInputTest(parameterized.TestCase):
  w = jnp.ones((8, 8))

  @parameterized.parameters(0, -1, 1.5, "2")
  def test_order(self, order):
    with self.assertRaisesRegex(ValueError, "order must be an integer >= 1"):
      residual.expand(self.w, formats.get("int4"), CHANNEL, order=order)

  @parameterized.parameters(0.0, -0.5, 1.5, ((0.5,),))
  def test_keep(self, keep):
    with self.assertRaisesRegex(ValueError, "keep"):
      residual.expand(self.w, formats.get("int4"), CHANNEL, order=3, keep=keep)

  def test_formats_it_cannot_use(self):
    zp = formats.per_channel(zero_point=True)
    with self.assertRaisesRegex(ValueError, "signed, symmetric grid"):
      residual.expand(self.w, formats.get("uint4"), zp, order=2)
    fmt, scaling = formats.block_format("nvfp4")
    with self.assertRaisesRegex(ValueError, "tensor scale"):
      residual.expand(jnp.ones((32, 8)), fmt, scaling, order=2)
    blocks_on_out = formats.per_block(4, axis=-1)
    with self.assertRaisesRegex(ValueError, "keep whole output channels"):
      residual.expand(
        self.w, formats.get("int4"), blocks_on_out, order=2, keep=0.5
      )
    with self.assertRaisesRegex(ValueError, "no closed-form"):
      residual.error_bound(
        self.w,
        formats.get("int4"),
        formats.per_channel(scale_format="bfloat16"),
        2,
      )

  def test_rank_by(self):
    with self.assertRaisesRegex(ValueError, "rank_by"):
      residual.expand(
        self.w, formats.get("int4"), CHANNEL, order=2, rank_by="l1"
      )


if __name__ == "__main__":
  absltest.main()
