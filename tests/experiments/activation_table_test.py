"""experiments.activation_table on the first block of SmolLM2: each kind of
row runs end to end, and the table and plot come out of the results."""

import math
import tempfile

import jax.numpy as jnp
import pytest
from absl.testing import absltest

from configs import smollm2 as smollm2_config
from experiments import activation_table, tasks

pytestmark = pytest.mark.e2e  # make test-quick skips end-to-end runs


class ActivationTableTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    config = smollm2_config.get_config()
    config.layers = 1
    config.eval.windows = 1
    config.eval.window = 64
    config.calib.windows = 2
    config.calib.window = 64
    cls.config = config
    cls.params = tasks.get("smollm2").load(config)

  def test_rows_of_every_kind(self):
    names = (
      "float",
      "W8A8 int8 token",
      "W8A8 int8 tensor static p99.99",
      "W4A4 nvfp4 GPTQ +H",
      "W8A8 int8 token +SQ",
      "W4A4 int4 PIPE o2 inputs x2",
      "KV int8",
    )
    cache, results = {}, {}
    for name in names:
      results[name] = activation_table.measure(
        name, self.params, self.config, cache
      )
    ppl = {n: r["perplexity"] for n, r in results.items()}
    self.assertTrue(all(math.isfinite(p) for p in ppl.values()), ppl)
    # int8 everywhere moves a one-block model's perplexity by little;
    # 4 bits everywhere by more.
    self.assertLess(abs(ppl["W8A8 int8 token"] / ppl["float"] - 1), 0.05)
    self.assertGreater(
      abs(ppl["W4A4 nvfp4 GPTQ +H"] - ppl["float"]),
      abs(ppl["W8A8 int8 token"] - ppl["float"]),
    )
    self.assertEqual(
      results["W4A4 nvfp4 GPTQ +H"]["activations"],
      "nvfp4/block/dynamic",
    )
    self.assertEqual(results["W4A4 nvfp4 GPTQ +H"]["pre"], "Hadamard")
    self.assertLess(abs(ppl["W8A8 int8 token +SQ"] / ppl["float"] - 1), 0.05)
    self.assertEqual(
      results["W4A4 int4 PIPE o2 inputs x2"]["activations"],
      "int4/token/dynamic/x2",
    )
    text = activation_table.table(results)
    self.assertIn("| KV int8 | float | int8/token/dynamic |", text)
    with tempfile.TemporaryDirectory() as d:
      results.update(
        {
          f"W4A4 {f} {k}": results["W4A4 nvfp4 GPTQ +H"]
          for f in ("int4", "mxfp4")
          for k in ("RTN", "GPTQ")
        }
      )
      activation_table.plot(results, f"{d}/p.png")


class AwareRowsTest(absltest.TestCase):
  def test_rotated_rows_calibrate_with_the_rotation_they_will_meet(self):
    fmt, method, pre, recipe = activation_table.ROWS["W4A4 int4 GPTQ +H aware"]
    self.assertEqual((method, pre), ("gptq+aware", "H"))
    (rule,) = activation_table._calibration_rules(recipe, pre).rules
    self.assertEqual(rule.quant.rotate, 0)  # the Rotated leaf's R: block 0
    self.assertEqual(rule.quant.rotate_seed, 0)
    self.assertIsNone(recipe.rules[0].quant.rotate)  # inference: the leaf's
    plain = activation_table.ROWS["W4A4 nvfp4 GPTQ aware"][3]
    self.assertIs(activation_table._calibration_rules(plain, ""), plain)

  def test_minilm_aware_row_changes_the_weights(self):
    from configs import minilm as minilm_config  # noqa: PLC0415

    config = minilm_config.get_config()
    config.layers = 1
    config.eval.sentences = 8
    config.calib.sentences = 32
    params = tasks.get("minilm").load(config)
    cache = {}
    got = {
      n: activation_table.measure(n, params, config, cache, "minilm")
      for n in ("float", "W4A4 nvfp4 GPTQ", "W4A4 nvfp4 GPTQ aware")
    }
    self.assertEqual(
      got["W4A4 nvfp4 GPTQ aware"]["weights"], "nvfp4 gptq aware"
    )
    plain = cache[("nvfp4", "gptq", "", False)]
    aware = cache[("nvfp4", "gptq", "", True)]
    a = aware["layer_0"]["ffn_out"]["kernel"].codes
    p = plain["layer_0"]["ffn_out"]["kernel"].codes
    self.assertFalse(jnp.array_equal(a, p))
    self.assertGreater(got["W4A4 nvfp4 GPTQ aware"]["cosine_mean"], 0.9)


class MobileNetRowsTest(absltest.TestCase):
  def test_cnn_rows_score_agreement_and_kl(self):
    from configs import mobilenet_v2 as mobilenet_config  # noqa: PLC0415

    rows = activation_table.rows_for("mobilenet_v2")
    self.assertIn("W6A6 int6 PIPE o2 inputs x2", rows)
    self.assertNotIn("KV int8", rows)
    self.assertNotIn("W4A4 int4 GPTQ +H aware", rows)
    rule = rows["W4A4 mxfp4 RTN"][3].rules[0]
    self.assertTrue(rule.quant.scaling.ragged)  # 24-channel inputs
    self.assertNotRegex("stem/conv", rule.pattern)  # the image stays float
    self.assertRegex("block_3/depthwise/conv", rule.pattern)
    config = mobilenet_config.get_config("crops_per_photo=1")
    params = tasks.get("mobilenet_v2").load(config)
    cache = {}
    got = {
      n: activation_table.measure(n, params, config, cache, "mobilenet_v2")
      for n in ("float", "W8A8 int8 token", "W4A4 mxfp4 RTN +H")
    }
    self.assertEqual(got["float"]["top1_agreement"], 1.0)
    self.assertLess(got["float"]["kl"], 1e-5)
    self.assertLess(
      got["W8A8 int8 token"]["kl"], got["W4A4 mxfp4 RTN +H"]["kl"]
    )
    self.assertEqual(got["W4A4 mxfp4 RTN +H"]["pre"], "Hadamard")
    text = activation_table.table(got)
    self.assertIn("| W8A8 int8 token | int8 rtn | int8/token/dynamic | ", text)


class MetricTest(absltest.TestCase):
  def test_metric_is_read_from_any_row(self):
    # a --rows run into a fresh file has no 'float' row
    self.assertEqual(
      activation_table._metric({"KV int8": {"perplexity": 7.0}}), "perplexity"
    )
    self.assertEqual(
      activation_table._metric({"W8A8": {"cosine_mean": 0.9}}), "cosine_mean"
    )


class MiniLMRowsTest(absltest.TestCase):
  def test_encoder_rows_score_embedding_cosine(self):
    from configs import minilm as minilm_config  # noqa: PLC0415

    config = minilm_config.get_config()
    config.layers = 1
    config.eval.sentences = 8
    params = tasks.get("minilm").load(config)
    rows = activation_table.rows_for("minilm")
    self.assertNotIn("KV int8", rows)  # no cache taps in an encoder
    cache = {}
    got = {
      n: activation_table.measure(n, params, config, cache, "minilm")
      for n in ("float", "W8A8 int8 token", "W4A4 int4 RTN")
    }
    cos = {n: r["cosine_mean"] for n, r in got.items()}
    self.assertAlmostEqual(cos["float"], 1.0, places=6)
    self.assertGreater(cos["W8A8 int8 token"], 0.99)
    self.assertLess(cos["W4A4 int4 RTN"], cos["W8A8 int8 token"])


if __name__ == "__main__":
  absltest.main()
