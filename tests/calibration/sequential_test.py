"""Calibration statistics and the sequential (block by block) driver."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest

import qjax
from qjax import calibration, formats
from qjax.models import smollm2


class TwoDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(16, name="up")(x))
    return nn.Dense(8, name="down")(h)


class DenseHessiansTest(absltest.TestCase):
  def test_matches_numpy_and_streams(self):
    model = TwoDense()
    x = jax.random.normal(jax.random.key(0), (6, 5, 8))
    variables = model.init(jax.random.key(1), x)
    batches = [(x[:2],), (x[2:],)]  # streamed in two batches
    hs, outs = calibration.dense_hessians(
      model, variables, batches, prefix="blk"
    )
    rows = np.asarray(x, np.float64).reshape(-1, 8)
    np.testing.assert_allclose(
      hs["blk/up/kernel"], 2 / 30 * rows.T @ rows, rtol=1e-5, atol=1e-6
    )
    hidden = nn.gelu(
      rows @ np.asarray(variables["params"]["up"]["kernel"], np.float64)
      + np.asarray(variables["params"]["up"]["bias"])
    )
    np.testing.assert_allclose(
      hs["blk/down/kernel"], 2 / 30 * hidden.T @ hidden, rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
      np.concatenate(outs), model.apply(variables, x), rtol=1e-5, atol=1e-6
    )


class SequentialTest(absltest.TestCase):
  @pytest.mark.e2e  # a whole real model: make test-quick skips it
  def test_gptq_sees_quantized_inputs(self):
    params = smollm2.load_params(layers=2)
    ids = jnp.asarray(
      np.asarray(
        smollm2.tokenizer()
        .encode("And God said, Let there be light: and there was light.")
        .ids
      )[None]
    )
    model = smollm2.block_model(params)
    recipe = qjax.Recipe(
      (qjax.rule("kernel", "int3", formats.per_block(64), method="gptq"),)
    )
    q = calibration.quantize_sequential(
      params, recipe, model, [ids], progress=False
    )
    self.assertIsInstance(q["layer_1"]["down"]["kernel"], qjax.QTensor)
    self.assertIsInstance(q["embed"]["embedding"], jax.Array)  # skipped
    # qjax.quantize(calib=...) is the same sequential run.
    via_api = qjax.quantize(params, recipe, calib=(model, [ids]))
    np.testing.assert_array_equal(
      via_api["layer_1"]["down"]["kernel"].codes,
      q["layer_1"]["down"]["kernel"].codes,
    )
    with self.assertRaisesRegex(ValueError, "either calib or hessians"):
      qjax.quantize(params, recipe, calib=(model, [ids]), hessians={})
    # Block 1's statistics come from quantized block 0's outputs: redo them
    # with float block 0 and the codes must differ somewhere.
    x0 = model.embed(params, ids)
    pos = model.block_args(ids)
    deq0 = qjax.dequantize(q["layer_0"])
    for block0, should_match in ((deq0, True), (params["layer_0"], False)):
      x1 = model.block_module.apply({"params": block0}, x0, *pos)
      hs, _ = calibration.dense_hessians(
        model.block_module,
        {"params": params["layer_1"]},
        [(x1, *pos)],
        prefix="layer_1",
      )
      again = qjax.quantize(
        {"layer_1": params["layer_1"]}, recipe, hessians=hs
      )["layer_1"]["q"]["kernel"]
      same = np.array_equal(again.codes, q["layer_1"]["q"]["kernel"].codes)
      self.assertEqual(same, should_match)

  def test_magr_on_the_last_sample_uses_only_its_gram(self):
    params = smollm2.load_params(layers=1)
    tok = smollm2.tokenizer()
    verses = ["In the beginning God created the heaven.", "Jesus wept."]
    batches = [jnp.asarray(np.asarray(tok.encode(v).ids)[None]) for v in verses]
    last_tokens = batches[-1].shape[1]
    model = smollm2.block_model(params)
    recipe = qjax.Recipe(
      (
        qjax.rule(
          "q/kernel",
          "uint3",
          formats.per_channel(zero_point=True),
          method=qjax.chain(
            qjax.MagR(alpha=1e-2, iters=5, statistics="last_sample"),
            qjax.RTN(),
          ),
        ),
      )
    )
    q = calibration.quantize_sequential(
      params, recipe, model, batches, last_tokens=last_tokens, progress=False
    )
    got = q["layer_0"]["q"]["kernel"]
    x0 = [(model.embed(params, b), *model.block_args(b)) for b in batches]
    for calls, should_match in ((x0[-1:], True), (x0, False)):
      grams, _ = calibration.dense_hessians(
        model.block_module,
        {"params": params["layer_0"]},
        calls,
        prefix="layer_0",
      )
      again = qjax.quantize(
        {"layer_0": params["layer_0"]},
        recipe,
        hessians=grams,  # unused by magr+rtn beyond the presence check
        grams=grams,
        report_unused=False,
      )["layer_0"]["q"]["kernel"]
      self.assertEqual(np.array_equal(again.codes, got.codes), should_match)
    with self.assertRaisesRegex(ValueError, "need 10000 calibration tokens"):
      calibration.quantize_sequential(
        params, recipe, model, batches, last_tokens=10_000, progress=False
      )

  def test_missing_statistics_name_the_layer(self):
    recipe = qjax.Recipe(
      (qjax.rule("kernel", "int4", formats.per_channel(), method="gptq"),)
    )
    params = {"dense": {"kernel": jnp.ones((8, 4))}}
    for hessians in (None, {}, {"other/kernel": jnp.eye(8)}):
      with self.assertRaisesRegex(ValueError, "'dense/kernel'.*calibration"):
        qjax.quantize(params, recipe, hessians=hessians)


if __name__ == "__main__":
  absltest.main()
