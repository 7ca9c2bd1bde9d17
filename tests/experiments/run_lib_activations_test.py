"""Activation rules in configs: config fields -> ActRecipe -> the run's
score, pre-transform methods and weight calibration under the rules."""

import tempfile

import jax
import numpy as np
import pytest
from absl.testing import absltest

import qjax
from configs import fmnist_cnn as fmnist_config
from configs import minilm as minilm_config
from configs import smollm2 as smollm2_config
from experiments import run_lib, tasks
from qjax import activations as act
from qjax import metrics as qmetrics
from qjax.io import checkpoint
from qjax.models import fmnist_cnn
from qjax.transforms import smoothquant

pytestmark = pytest.mark.e2e  # make test-quick skips end-to-end runs


class ConfigTest(absltest.TestCase):
  def test_fields_become_rules(self):
    c = smollm2_config.get_config("act=int8,kv=nvfp4")
    recipe = run_lib.act_recipe_from_config(c)
    kv, layers = recipe.rules
    self.assertEqual(kv.pattern, tasks.SmolLM2Task.kv_pattern)
    self.assertEqual(kv.quant.spec(), "nvfp4/block/dynamic")
    self.assertEqual(layers.pattern, tasks.SmolLM2Task.act_pattern)
    self.assertEqual(layers.quant.spec(), "int8/token/dynamic")
    self.assertIsNone(
      run_lib.act_recipe_from_config(smollm2_config.get_config())
    )
    c = minilm_config.get_config("act=int8")
    c.act.granularity, c.act.static = "tensor", True
    c.act.observer, c.act.rotate = "percentile", 0
    (rule,) = run_lib.act_recipe_from_config(c).rules
    self.assertEqual(
      rule.quant.spec(), "int8/tensor/static-percentile/hadamard"
    )
    self.assertEqual(rule.quant.percentile, 99.99)
    self.assertIn("_aint8-tensor-percentile99.99-rot", run_lib.run_name(c))
    c = minilm_config.get_config()
    c.act_recipe = {"rules": [{"pattern": "ffn_in$", "format": "mxfp4"}]}
    (rule,) = run_lib.act_recipe_from_config(c).rules
    self.assertEqual((rule.pattern, rule.quant.name), ("ffn_in$", "mxfp4"))

  def test_pre_transform_methods(self):
    c = minilm_config.get_config("method=smoothquant+hadamard+gptq,alpha=0.8")
    (rule,) = run_lib.recipe_from_config(c).rules
    names = [type(s).__name__ for s in rule.method.stages]
    self.assertEqual(names, ["SmoothQuant", "Hadamard", "GPTQ"])
    self.assertEqual(rule.method.stages[0].alpha, 0.8)
    self.assertIn("_sq0.8_had", run_lib.run_name(c))
    for bad in ("hadamard+qaf", "hadamard+hadamard+rtn", "rotate+rtn"):
      with self.assertRaisesRegex(ValueError, "method"):
        run_lib.recipe_from_config(minilm_config.get_config(f"method={bad}"))

  def test_rotated_methods_calibrate_on_rotated_inputs(self):
    c = smollm2_config.get_config("method=hadamard+gptq,act=int4,kv=int8")
    c.act.weights_see = True
    rules = run_lib.calibration_rules(run_lib.act_recipe_from_config(c), c)
    self.assertEqual([r.quant.rotate for r in rules.rules], [0, 0])
    plain = smollm2_config.get_config("method=gptq,act=int4")
    recipe = run_lib.act_recipe_from_config(plain)
    self.assertIs(run_lib.calibration_rules(recipe, plain), recipe)

  def test_bad_combinations_are_named(self):
    c = fmnist_config.get_config("bits=8")
    c.act.weights_see = True
    with self.assertRaisesRegex(ValueError, "weights_see needs act.format"):
      run_lib.run(c, tempfile.mkdtemp())
    c.act.format = "int8"
    with self.assertRaisesRegex(ValueError, "is not calibrated"):
      run_lib.run(c, tempfile.mkdtemp())
    c = fmnist_config.get_config("bits=8,act=int8")
    c.act.granularity, c.act.static = "tensor", True
    with self.assertRaisesRegex(ValueError, "calibration batches"):
      run_lib.run(c, tempfile.mkdtemp())
    c = fmnist_config.get_config("bits=8,kv=int8")
    with self.assertRaisesRegex(ValueError, "has no KV cache"):
      run_lib.run_name(c), run_lib.act_recipe_from_config(c)


class RunTest(absltest.TestCase):
  def test_quantized_inputs_reach_the_score(self):
    c = fmnist_config.get_config("bits=8,act=int4")
    c.save_checkpoint = False
    m = run_lib.run(c, tempfile.mkdtemp())
    self.assertIn("_aint4", m["name"])
    # the same tree, scored by hand: every conv's and dense layer's input
    # int4 per row, through qjax.apply
    params = fmnist_cnn.load_params()
    q = qjax.quantize(params, run_lib.recipe_from_config(c))
    rules = act.recipe(act.act_rule(r"(conv|dense)", "int4", "token"))
    x, y = fmnist_cnn.load_split("test")
    fn = jax.jit(
      lambda p, x: qjax.apply(
        fmnist_cnn.CNN(), {"params": p}, x, activations=rules
      )
    )
    want = qmetrics.accuracy(np.asarray(fn(q, x)), y)
    self.assertEqual(m["quantized"]["accuracy"], want)
    plain = run_lib.run(fmnist_config.get_config("bits=8"), tempfile.mkdtemp())
    self.assertLess(m["quantized"]["accuracy"], plain["quantized"]["accuracy"])

  def test_smoothquant_gptq_calibrated_under_the_rules(self):
    c = minilm_config.get_config(
      "method=smoothquant+gptq,bits=4,block=128,layers=1,sentences=6,"
      "calib_sentences=32,act=int8"
    )
    plain = run_lib.run(c, tempfile.mkdtemp())
    c.act.weights_see = True
    workdir = tempfile.mkdtemp()
    aware = run_lib.run(c, workdir)
    self.assertTrue(aware["name"].endswith("_aint8_aware_layers1"))
    self.assertNotEqual(aware["quantized"], plain["quantized"])
    self.assertGreater(aware["quantized"]["cosine_mean"], 0.95)
    # per-layer logs: the method's time and GPTQ's loss
    layer = aware["layers"]["layer_0/ffn_in/kernel"]
    self.assertGreater(layer["seconds"], 0)
    self.assertGreater(layer["loss"], 0)
    back = checkpoint.restore(f"{workdir}/checkpoint")
    self.assertIsInstance(
      back["layer_0"]["ffn_in"]["kernel"], smoothquant.Smoothed
    )


if __name__ == "__main__":
  absltest.main()
