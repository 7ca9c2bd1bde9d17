"""quantize / dequantize / stats over trees, driven by recipes."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

import qjax
from qjax import formats
from qjax.quantizers import rtn
from qjax.transforms import residual


def _params():
  k = jax.random.split(jax.random.key(0), 3)
  return {
    "embed": {"embedding": jax.random.normal(k[0], (50, 32))},
    "layer": {
      "attn": {
        "kernel": jax.random.normal(k[1], (32, 64)),
        "bias": jnp.zeros(64),
      },
      "mlp": {"kernel": jax.random.normal(k[2], (64, 32))},
      "norm": {"scale": jnp.ones(32)},
    },
  }


class QuantizeTest(absltest.TestCase):
  def test_first_match_wins_and_defaults_skip(self):
    recipe = qjax.Recipe(
      (
        qjax.rule("attn/kernel", "mxfp4"),
        qjax.rule("kernel", "int4", formats.per_block(32)),
      )
    )
    q = qjax.quantize(_params(), recipe)
    self.assertEqual(str(q["layer"]["attn"]["kernel"].fmt), "float4_e2m1fn")
    self.assertEqual(str(q["layer"]["mlp"]["kernel"].fmt), "int4")
    for untouched in (
      q["embed"]["embedding"],
      q["layer"]["attn"]["bias"],
      q["layer"]["norm"]["scale"],
    ):
      self.assertIsInstance(untouched, jax.Array)
    want = rtn.rtn(
      _params()["layer"]["mlp"]["kernel"],
      formats.get("int4"),
      formats.per_block(32),
    )
    np.testing.assert_array_equal(q["layer"]["mlp"]["kernel"].codes, want.codes)
    everything = qjax.Recipe((qjax.rule(".", "int8", formats.per_channel()),))
    plan = qjax.plan(_params(), everything)
    self.assertEqual(
      plan["embed/embedding"], "'embed' leaves are skipped by default"
    )
    self.assertEqual(plan["layer/norm/scale"], "rank 1: skipped by default")
    self.assertEqual(plan["layer/mlp/kernel"], "rule 0 '.' (rtn)")

  def test_a_rule_naming_embeddings_quantizes_them(self):
    recipe = qjax.Recipe((qjax.rule("embed", "int8", formats.per_channel(0)),))
    q = qjax.quantize(_params(), recipe)
    self.assertIsInstance(q["embed"]["embedding"], qjax.QTensor)

  def test_unused_rules_are_reported(self):
    recipe = qjax.Recipe(
      (
        qjax.rule("kernel", "int8", formats.per_channel()),
        qjax.rule("nope", "int4", formats.per_channel()),
      )
    )
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      qjax.quantize(_params(), recipe)
    self.assertTrue(any("1: 'nope'" in str(w.message) for w in caught))

  def test_nan_is_an_error_naming_the_path(self):
    params = _params()
    params["layer"]["mlp"]["kernel"] = (
      params["layer"]["mlp"]["kernel"].at[3, 4].set(jnp.nan)
    )
    recipe = qjax.Recipe((qjax.rule("kernel", "int8", formats.per_channel()),))
    with self.assertRaisesRegex(ValueError, "'layer/mlp/kernel' has 1 NaN"):
      qjax.quantize(params, recipe)
    lenient = qjax.Recipe(
      (qjax.rule("kernel", "int8", formats.per_channel(), nan_policy="zero"),)
    )
    q = qjax.quantize(params, lenient)
    self.assertEqual(float(q["layer"]["mlp"]["kernel"].dequantize()[3, 4]), 0)

  def test_block_error_names_the_path(self):
    recipe = qjax.Recipe((qjax.rule("kernel", "int4", formats.per_block(48)),))
    with self.assertRaisesRegex(ValueError, "'layer/attn/kernel'.*48"):
      qjax.quantize(_params(), recipe)

  def test_unknown_names_list_choices(self):
    with self.assertRaisesRegex(ValueError, "known: .*mxfp4"):
      qjax.rule("kernel", "mxfp5")
    with self.assertRaisesRegex(ValueError, "unknown method 'gptqq'"):
      qjax.rule("kernel", "int4", formats.per_channel(), method="gptqq")
    # An option typo fails when the rule is built, listing the valid names.
    with self.assertRaisesRegex(
      ValueError,
      "GPTQ has no option 'act_ordr'; valid options: block_size, damp, "
      "act_order, clip_ratios, shrink",
    ):
      qjax.rule("kernel", "int4", method="gptq", act_ordr=True)
    with self.assertRaisesRegex(ValueError, "MagR has no option 'alfa'"):
      qjax.rule("kernel", "int4", method="magr+gptq", magr={"alfa": 1e-3})
    with self.assertRaisesRegex(TypeError, "unexpected keyword.*alfa"):
      qjax.MagR(alfa=1e-3)
    with self.assertRaisesRegex(ValueError, "unknown scale format"):
      formats.Scaling(scale_format="e5m0")

  def test_equal_recipes_compile_once(self):
    def make():
      return qjax.Recipe(
        (
          qjax.rule("kernel", "mxfp4"),
          qjax.rule("kernel", "int4", formats.per_block(32)),
        )
      )

    qjax.quantize(_params(), make())
    before = rtn._rtn._cache_size()
    self.assertEqual(make(), make())
    self.assertEqual(hash(make()), hash(make()))
    qjax.quantize(_params(), make())
    self.assertEqual(rtn._rtn._cache_size(), before)

  def test_from_config_matches_rule(self):
    config = {
      "rules": [
        {"pattern": "mlp", "format": "nvfp4"},
        {
          "pattern": "kernel",
          "format": "uint4",
          "scaling": {
            "mode": "block",
            "axes": [0],
            "sizes": [32],
            "zero_point": True,
          },
          "options": {"clip_ratios": [1.0, 0.9]},
        },
      ]
    }
    recipe = qjax.Recipe.from_config(config)
    self.assertEqual(
      recipe.rules[1],
      qjax.rule(
        "kernel",
        "uint4",
        formats.per_block(32, zero_point=True),
        clip_ratios=(1.0, 0.9),
      ),
    )
    with self.assertRaisesRegex(ValueError, "unknown keys"):
      qjax.Recipe.from_config({"rules": [{"pattern": "x", "fromat": "int4"}]})

  def test_magr_and_cd_options_are_checked(self):
    w = jax.random.normal(jax.random.key(0), (32, 8))
    x = jax.random.normal(jax.random.key(1), (64, 32))
    params, hs = {"d": {"kernel": w}}, {"d/kernel": x.T @ x}
    scaling = formats.per_channel(zero_point=True)

    def run(method, **options):
      recipe = qjax.Recipe(
        (qjax.rule("kernel", "uint2", scaling, method=method, **options),)
      )
      return qjax.quantize(params, recipe, hessians=hs)["d"]["kernel"]

    # Options are checked when the rule is built, before any data.
    with self.assertRaisesRegex(ValueError, "statistics must be one of"):
      run("magr+rtn", magr={"statistics": "first"})
    with self.assertRaisesRegex(ValueError, "'d/kernel'.*last_sample"):
      run("magr+rtn", magr={"statistics": "last_sample"})
    with self.assertRaisesRegex(ValueError, "options per stage.*'cd'"):
      run("magr+rtn", cd={"sweeps": 1})
    # The refinement is applied: codes move and the damped loss drops.
    plain = run("magr+gptq", magr={"iters": 20})
    refined = run("magr+gptq+cd", magr={"iters": 20}, cd={"sweeps": 3})
    self.assertFalse(np.array_equal(plain.codes, refined.codes))
    h = np.asarray(hs["d/kernel"])
    s = h + 0.75 * np.mean(np.diag(h)) * np.eye(32)  # CD's damped S

    def loss(q):
      d = np.asarray(w) - np.asarray(q.dequantize())
      return np.sum(d * (s @ d))

    self.assertLess(loss(refined), loss(plain))

  def test_data_free_quantize_is_traceable(self):
    params = _params()
    for recipe in (
      qjax.Recipe((qjax.rule("kernel", "int4", formats.per_block(32)),)),
      qjax.Recipe(
        (qjax.rule("attn/kernel", "nvfp4"), qjax.rule("kernel", "mxfp4"))
      ),
      qjax.Recipe((qjax.rule("kernel", "int4", method="pipe", order=2),)),
      qjax.Recipe(
        (qjax.rule("kernel", "int8", nan_policy="zero", method=qjax.RTN()),)
      ),
    ):
      eager = qjax.quantize(params, recipe)
      jitted = jax.jit(lambda p, r=recipe: qjax.quantize(p, r))(params)
      self.assertEqual(
        jax.tree.structure(eager), jax.tree.structure(jitted), recipe
      )
      pairs = zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True)
      for a, b in pairs:
        np.testing.assert_array_equal(a, b)
      shapes = jax.eval_shape(lambda p, r=recipe: qjax.quantize(p, r), params)
      self.assertEqual(jax.tree.structure(shapes), jax.tree.structure(eager))
    # Inside a trace NaN cannot raise; 'zero' still zeroes it.
    params["layer"]["mlp"]["kernel"] = (
      params["layer"]["mlp"]["kernel"].at[0, 0].set(jnp.nan)
    )
    zero = qjax.Recipe((qjax.rule("mlp", "int8", nan_policy="zero"),))
    got = jax.jit(lambda p: qjax.quantize(p, zero))(params)
    self.assertEqual(float(got["layer"]["mlp"]["kernel"].dequantize()[0, 0]), 0)

  def test_dequantize_and_stats(self):
    params = _params()
    recipe = qjax.Recipe((qjax.rule("kernel", "int8", formats.per_channel()),))
    q = qjax.quantize(params, recipe)
    back = qjax.dequantize(q)
    self.assertEqual(jax.tree.structure(back), jax.tree.structure(params))
    s = qjax.stats(q, params)
    mlp = s["layer/mlp/kernel"]
    self.assertEqual(mlp["bytes"], 64 * 32 + 32 * 4)
    w = np.asarray(params["layer"]["mlp"]["kernel"], np.float64)
    d = np.asarray(back["layer"]["mlp"]["kernel"], np.float64)
    want = 10 * np.log10(np.sum(w**2) / np.sum((w - d) ** 2))
    self.assertAlmostEqual(mlp["sqnr_db"], want, places=4)
    self.assertGreater(mlp["sqnr_db"], 35)
    self.assertFalse(s["layer/norm/scale"]["quantized"])

  def test_pipe_methods(self):
    w = jax.random.normal(jax.random.key(0), (32, 8))
    x = jax.random.normal(jax.random.key(1), (64, 32))
    params, hs = {"d": {"kernel": w}}, {"d/kernel": x.T @ x}
    scaling = formats.per_channel()

    def run(method, **options):
      recipe = qjax.Recipe(
        (qjax.rule("kernel", "int4", scaling, method=method, **options),)
      )
      return qjax.quantize(params, recipe, hessians=hs)["d"]["kernel"]

    e = run("pipe", order=3, keep=0.5)
    np.testing.assert_array_equal(
      e.dequantize(),
      residual.reconstruct(
        residual.expand(w, formats.get("int4"), scaling, order=3, keep=0.5)
      ),
    )
    # R_1 comes from GPTQ, and the order-2 term refines it.
    g = run("gptq+pipe", pipe={"order": 2})
    first = qjax.gptq(w, hs["d/kernel"], formats.get("int4"), scaling)[0]
    np.testing.assert_array_equal(g.terms[0].codes, first.codes)
    err = lambda q: float(jnp.sum((w - q.dequantize()) ** 2))  # noqa: E731
    self.assertLess(err(g), err(first) / 10)
    got = run("magr+pipe", pipe={"order": 2}, magr={"iters": 5})
    self.assertEqual(got.order, 2)
    with self.assertRaisesRegex(ValueError, "Pipe needs the option.*order"):
      run("pipe")
    with self.assertRaisesRegex(ValueError, "RTN has no option 'order'"):
      run("rtn", order=2)
    with self.assertRaisesRegex(ValueError, "order must be >= 1"):
      run("pipe", order=0)
    # Dequantize, stats and model bytes see through the expansion.
    q = qjax.dequantize({"k": e})
    np.testing.assert_array_equal(q["k"], e.dequantize())
    self.assertEqual(qjax.stats({"k": e})["k"]["bytes"], e.nbytes)


if __name__ == "__main__":
  absltest.main()
