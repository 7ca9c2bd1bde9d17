"""Metrics against direct NumPy formulas."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

import qjax
from qjax import metrics as qmetrics


class EvalTest(absltest.TestCase):
  def test_windows_are_disjoint(self):
    ids = np.arange(1000)
    ev = qmetrics.token_windows(ids, 100, 4)
    cal = qmetrics.token_windows(ids, 100, 4, from_end=True)
    self.assertEqual(ev.shape, (4, 100))
    np.testing.assert_array_equal(ev[0], np.arange(100))
    self.assertEmpty(np.intersect1d(ev, cal))
    with self.assertRaisesRegex(ValueError, "need 1100 tokens"):
      qmetrics.token_windows(ids, 100, 11)

  def test_perplexity_matches_numpy(self):
    rng = np.random.default_rng(0)
    table = rng.standard_normal((50, 50)).astype(np.float32)
    logits_fn = lambda w: jnp.asarray(table)[w]  # a bigram model
    windows = rng.integers(0, 50, (3, 20))
    nll = []
    for w in windows:
      for a, b in zip(w[:-1], w[1:], strict=True):
        row = table[a].astype(np.float64)
        nll.append(np.log(np.exp(row).sum()) - row[b])
    self.assertAlmostEqual(
      qmetrics.perplexity(logits_fn, windows, progress=False),
      float(np.exp(np.mean(nll))),
      places=4,
    )
    uniform = lambda w: jnp.zeros((*w.shape, 50))
    self.assertAlmostEqual(
      qmetrics.perplexity(uniform, windows, progress=False), 50.0, places=3
    )

  def test_agreement_kl_cosine(self):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((100, 10))
    b = a + 0.3 * rng.standard_normal((100, 10))
    self.assertEqual(qmetrics.top1_agreement(a, a), 1.0)
    self.assertAlmostEqual(
      qmetrics.top1_agreement(a, b), np.mean(a.argmax(-1) == b.argmax(-1))
    )
    p = np.exp(a) / np.exp(a).sum(-1, keepdims=True)
    q = np.exp(b) / np.exp(b).sum(-1, keepdims=True)
    self.assertAlmostEqual(
      qmetrics.kl_divergence(a, b),
      np.mean(np.sum(p * np.log(p / q), -1)),
      places=5,
    )
    self.assertAlmostEqual(qmetrics.kl_divergence(a, a), 0.0, places=6)
    np.testing.assert_allclose(qmetrics.cosine_similarity(a, 3 * a), 1.0)
    self.assertEqual(qmetrics.accuracy(a, a.argmax(-1)), 1.0)

  def test_model_bytes_and_bits(self):
    params = {
      "w": jax.random.normal(jax.random.key(0), (64, 32)),
      "b": jnp.zeros(32, jnp.bfloat16),
    }
    q = qjax.quantize(params, qjax.Recipe((qjax.rule("w", "mxfp4"),)))
    self.assertEqual(qmetrics.model_bytes(params), 64 * 32 * 4 + 32 * 2)
    self.assertEqual(qmetrics.model_bytes(q), 64 * 16 + 2 * 32 + 32 * 2)
    self.assertEqual(qmetrics.quantized_bits_per_weight(q), 4.25)


if __name__ == "__main__":
  absltest.main()
