"""qjax.flax: real models run from quantized trees."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest

import qjax
from qjax import kernels
from qjax import linen as qflax
from qjax.models import minilm, smollm2

PROMPT = "In the beginning God created the heaven and the earth."


@functools.cache
def _smollm2(layers=None, fmt="int4", block=128):
  params = smollm2.load_params(layers=layers)
  rule = qjax.rule("kernel", fmt, method="rtn") if block is None else None
  if rule is None:
    from qjax.formats.scaling import Scaling

    rule = qjax.rule(
      "kernel",
      fmt,
      Scaling("block", (0,), (block,), ragged=True),
      method="rtn",
    )
  return params, qjax.quantize(params, qjax.Recipe([rule]))


class SmolLM2Test(absltest.TestCase):
  @pytest.mark.e2e  # a whole real model: make test-quick skips it
  def test_greedy_tokens_through_qmatmul_equal_dequantized_float(self):
    _, q = _smollm2()
    model = smollm2.model_for(q)
    prompt = jnp.asarray(smollm2.tokenizer().encode(PROMPT).ids, jnp.int32)
    through_qmatmul = qflax.greedy_generate(
      lambda ids: qflax.apply(model, q, ids, mode="qmatmul"), prompt, 32
    )
    dense = qjax.dequantize(q)
    through_float = qflax.greedy_generate(
      lambda ids: smollm2.logits(dense, ids), prompt, 32
    )
    np.testing.assert_array_equal(through_qmatmul, through_float)
    self.assertGreater(len(set(np.asarray(through_float).tolist())), 4)

  @pytest.mark.e2e  # a whole real model: make test-quick skips it
  def test_triton_kernel_path_matches_dequantized_model(self):
    # Two blocks through the Pallas Triton kernel (interpret mode), MXFP4.
    params = smollm2.load_params(layers=2)
    q = qjax.quantize(params, qjax.Recipe([qjax.rule("kernel", "mxfp4")]))
    model = smollm2.model_for(q)
    ids = jnp.asarray(smollm2.tokenizer().encode(PROMPT).ids[:6])[None]
    want = smollm2.logits(qjax.dequantize(q), ids)
    prepared = kernels.prepare_tree(q, "triton")
    self.assertIsInstance(
      prepared["layer_0"]["q"]["kernel"], kernels.PreparedWeight
    )
    got = jax.jit(
      lambda p, i: qflax.apply(model, p, i, impl="triton", interpret=True)
    )(prepared, ids)
    np.testing.assert_allclose(
      got, want, atol=2e-3 * float(jnp.abs(want).max())
    )
    np.testing.assert_array_equal(jnp.argmax(got, -1), jnp.argmax(want, -1))


class MiniLMTest(absltest.TestCase):
  def test_embeddings_from_quantized_tree(self):
    params = minilm.load_params()
    from qjax.formats.scaling import Scaling

    rule = qjax.rule("kernel", "int8", Scaling("channel", (-1,)))
    q = qjax.quantize(params, qjax.Recipe([rule]))
    ids, mask = minilm.encode(
      minilm.tokenizer(), ["the quick brown fox", "a lazy dog"]
    )
    model = minilm.MiniLM()
    want = model.apply({"params": qjax.dequantize(q)}, ids, mask)
    for mode in qflax.MODES:
      got = qflax.apply(model, q, ids, mask, mode=mode)
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

  def test_unknown_mode(self):
    with self.assertRaisesRegex(ValueError, "unknown mode"):
      qflax.apply(None, {}, mode="fast")


if __name__ == "__main__":
  absltest.main()
