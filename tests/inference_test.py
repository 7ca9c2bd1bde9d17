"""qjax.apply: quantized inference on models qjax has never seen equals
dequantize-then-apply (an NNX LM with LinearGeneral and Einsum layers, a
Linen CNN with BatchNorm and depthwise convs)."""

import jax
import numpy as np
from absl.testing import absltest
from flax import nnx

import qjax
from qjax import formats
from tests import user_models as um


class NnxApplyTest(absltest.TestCase):
  def test_quantized_lm_equals_dequantize_then_apply(self):
    lm = um.TinyLM()
    params = nnx.state(lm, nnx.Param)
    recipe = qjax.Recipe(
      (
        qjax.rule(r"attn/(q|k|v)/kernel", "int4", formats.per_block(um.DIM, 0)),
        qjax.rule("(up|down)/kernel", "mxfp4"),
        qjax.rule("kernel", "int4"),  # the Einsum [heads, head_dim, dim]
        qjax.rule("embed", "int8"),  # dequantized up front (attend reads it)
      )
    )
    q = qjax.quantize(params, recipe)
    self.assertIsInstance(q["embed"]["embedding"].get_value(), qjax.QTensor)
    ids = um.token_batches(1, 3)[0]
    graphdef, _, rest = nnx.split(lm, nnx.Param, ...)
    want = nnx.merge(graphdef, qjax.dequantize(q), rest)(ids)
    got = qjax.apply(lm, q, ids, mode="dequantize")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    jitted = jax.jit(lambda q, ids: qjax.apply(lm, q, ids))(q, ids)
    np.testing.assert_allclose(jitted, want, rtol=1e-4, atol=1e-4)
    # The float model is untouched and differs from the quantized one.
    self.assertFalse(
      qjax.qtensor.is_quantized(lm.layers[0].up.kernel.get_value())
    )
    self.assertGreater(float(abs(lm(ids) - want).max()), 1e-3)


class LinenApplyTest(absltest.TestCase):
  def test_batchnorm_cnn_equals_dequantize_then_apply(self):
    model = um.TinyCNN()
    v = um.cnn_variables()
    q = qjax.quantize(v["params"], qjax.Recipe((qjax.rule("kernel", "int4"),)))
    images = um.image_batches(1, 5)[0]
    want = model.apply({**v, "params": qjax.dequantize(q)}, images)
    for mode in ("dequantize", "qmatmul"):
      got = qjax.apply(model, {**v, "params": q}, images, mode=mode)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    jitted = jax.jit(lambda q: qjax.apply(model, {**v, "params": q}, images))
    np.testing.assert_allclose(jitted(q), want, rtol=1e-5, atol=1e-6)
    self.assertGreater(float(abs(model.apply(v, images) - want).max()), 1e-4)


if __name__ == "__main__":
  absltest.main()
