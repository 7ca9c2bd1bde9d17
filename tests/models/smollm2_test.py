"""SmolLM2: NumPy reference forward, tokenizer, and KJV perplexity."""

import numpy as np
import pytest
from absl.testing import absltest

from qjax import datasets
from qjax import metrics as qmetrics
from qjax.models import smollm2


def _unpermute(w, heads):
  """Undo llama.cpp's Q/K permutation: rows (h, d/2, 2) -> (h, 2, d/2)."""
  out_dim = w.shape[0]
  return (
    w.reshape(heads, out_dim // heads // 2, 2, -1)
    .swapaxes(1, 2)
    .reshape(w.shape)
  )


def _numpy_forward(params, ids):
  """Llama forward in float64 with RoPE on halves (HF layout), [t] -> logits.

  It un-permutes Q and K first, so it agrees with qjax's interleaved-pair
  RoPE on the GGUF weights only if both readings are right.
  """
  c = smollm2.Config()
  p = {
    k: {
      kk: {kkk: np.asarray(v3, np.float64) for kkk, v3 in v2.items()}
      for kk, v2 in v.items()
    }
    if k.startswith("layer_")
    else {kk: np.asarray(v2, np.float64) for kk, v2 in v.items()}
    for k, v in params.items()
  }
  t, hd = len(ids), c.hidden // c.heads
  x = p["embed"]["embedding"][ids]

  def norm(x, w):
    return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + c.eps) * w

  inv = c.rope_base ** (-np.arange(0, hd, 2) / hd)
  ang = np.arange(t)[:, None] * inv[None]
  cos, sin = np.cos(ang), np.sin(ang)

  def rope_half(x):  # x: [t, heads, hd], rotate (x[:hd/2], x[hd/2:])
    a, b = x[..., : hd // 2], x[..., hd // 2 :]
    cs, sn = cos[:, None], sin[:, None]
    return np.concatenate([a * cs - b * sn, a * sn + b * cs], -1)

  layers = sum(k.startswith("layer_") for k in p)
  for i in range(layers):
    L = p[f"layer_{i}"]
    h = norm(x, L["attn_norm"]["scale"])
    wq = _unpermute(L["q"]["kernel"].T, c.heads)
    wk = _unpermute(L["k"]["kernel"].T, c.kv_heads)
    q = rope_half((h @ wq.T).reshape(t, c.heads, hd))
    k = rope_half((h @ wk.T).reshape(t, c.kv_heads, hd))
    v = (h @ L["v"]["kernel"]).reshape(t, c.kv_heads, hd)
    out = np.zeros((t, c.heads, hd))
    for head in range(c.heads):
      kv = head // (c.heads // c.kv_heads)
      s = q[:, head] @ k[:, kv].T / np.sqrt(hd)
      s = np.where(np.tril(np.ones((t, t))) > 0, s, -np.inf)
      s = np.exp(s - s.max(-1, keepdims=True))
      out[:, head] = (s / s.sum(-1, keepdims=True)) @ v[:, kv]
    x = x + out.reshape(t, -1) @ L["o"]["kernel"]
    h = norm(x, L["ffn_norm"]["scale"])
    g = h @ L["gate"]["kernel"]
    x = (
      x + (g / (1 + np.exp(-g)) * (h @ L["up"]["kernel"])) @ L["down"]["kernel"]
    )
  x = norm(x, p["final_norm"]["scale"])
  return x @ p["embed"]["embedding"].T


class SmolLM2Test(absltest.TestCase):
  def test_two_layer_slice_matches_numpy(self):
    params = smollm2.load_params(layers=2)
    ids = np.array(
      smollm2.tokenizer()
      .encode("In the beginning God created the heaven and the earth.")
      .ids
    )
    got = np.asarray(smollm2.logits(params, ids[None].astype(np.int32))[0])
    want = _numpy_forward(params, ids)
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-3)

  def test_tokenizer(self):
    tok = smollm2.tokenizer()
    text = "In the beginning God created 1234 things.\nAnd lo"
    enc = tok.encode(text)
    self.assertEqual(tok.decode(enc.ids), text)
    digits = [t for t in enc.tokens if any(ch.isdigit() for ch in t)]
    self.assertEqual(digits, ["1", "2", "3", "4"])  # split one by one
    self.assertEqual(enc.ids[:3], [788, 260, 3616])  # "In", " the", " beg.."

  @pytest.mark.e2e  # a whole real model: make test-quick skips it
  def test_kjv_perplexity_matches_independent_measurement(self):
    # ../shared/DATA.md: 6.35 with an independent implementation (8 windows
    # of 512 tokens from the first token, labels removed, no BOS).
    params = smollm2.load_params()
    ids = smollm2.tokenizer().encode(datasets.kjv_text()[:40_000]).ids
    windows = qmetrics.token_windows(ids, 512, 8)
    ppl = qmetrics.perplexity(
      lambda w: smollm2.logits(params, w), windows, progress=False
    )
    self.assertAlmostEqual(ppl, 6.35, delta=0.05)


if __name__ == "__main__":
  absltest.main()
