"""Gemma 3 270M from its GGUF: tokenizer, causal logits, a plausible float
perplexity, and GPTQ through block discovery (no BlockModel)."""

import numpy as np
import pytest
from absl.testing import absltest

import qjax
from qjax import datasets, formats, metrics
from qjax.models import gemma3


@pytest.mark.e2e  # a whole real model: make test-quick skips it
class Gemma3Test(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    cls.params = gemma3.load_params(layers=2)
    cls.full = None

  def test_tokenizer_round_trips_and_splits_words(self):
    text = "In the beginning God created the heaven and the earth."
    ids = gemma3.encode(text)
    self.assertEqual(gemma3.tokenizer().decode(ids), text)
    pieces = [gemma3.tokenizer().id_to_piece(i) for i in ids]
    self.assertEqual(pieces[:3], ["In", "▁the", "▁beginning"])

  def test_logits_are_causal(self):
    ids = np.asarray(
      [[gemma3.BOS, *gemma3.encode("And God said, Let there be")]]
    )
    changed = ids.copy()
    changed[0, -1] = 1234
    a = gemma3.logits(self.params, ids)
    b = gemma3.logits(self.params, changed)
    np.testing.assert_array_equal(a[0, :-1], b[0, :-1])
    self.assertFalse(np.array_equal(a[0, -1], b[0, -1]))

  def test_float_perplexity_is_a_language_model_s(self):
    params = gemma3.load_params()
    ids = gemma3.encode(datasets.kjv_text()[:4000])[:255]
    w = np.asarray([[gemma3.BOS, *ids]], np.int32)
    ppl = metrics.perplexity(
      lambda x: gemma3.logits(params, x), w, progress=False
    )
    # Measured 2.9 on 8 windows (docs/gemma3.md); a wrong RoPE or norm
    # gives hundreds.
    self.assertLess(ppl, 6.0)

  def test_gptq_through_discovery_quantizes_dense_general_kernels(self):
    model = gemma3.model_for(self.params)
    ids = gemma3.encode(datasets.kjv_text()[-3000:])[-127:]
    batch = np.asarray([[gemma3.BOS, *ids]], np.int32)
    recipe = qjax.Recipe(
      (
        qjax.rule(
          r"attn/(q|k|v)/kernel",
          "int4",
          formats.per_block(640, 0),
          method="gptq",
        ),
        qjax.rule("kernel", "int4", method="gptq"),
      )
    )
    q = qjax.quantize(self.params, recipe, calib=(model, [batch]))
    self.assertEqual(q["layer_1"]["attn"]["q"]["kernel"].shape, (640, 4, 256))
    self.assertEqual(q["layer_1"]["attn"]["o"]["kernel"].shape, (4, 256, 640))
    self.assertIsInstance(
      q["embed"]["embedding"], type(self.params["embed"]["embedding"])
    )


if __name__ == "__main__":
  absltest.main()
