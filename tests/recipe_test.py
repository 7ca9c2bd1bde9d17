"""Rules and recipes: building, defaults, matching, and from_config."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

import qjax
from qjax import formats


class RecipeTest(absltest.TestCase):
  def test_block_format_runs_along_the_input_axis_of_dense_and_conv(self):
    r = qjax.rule("kernel", "mxfp4")
    self.assertEqual(r.scaling.axes, (-2,))
    key = jax.random.key(0)
    conv = jax.random.normal(key, (3, 3, 64, 8))  # HWIO: blocks along in
    dense = jax.random.normal(key, (64, 8))
    q = qjax.quantize(
      {"c": {"kernel": conv}, "d": {"kernel": dense}}, qjax.Recipe((r,))
    )
    self.assertEqual(q["c"]["kernel"].scale.shape, (3, 3, 2, 8))
    self.assertEqual(q["d"]["kernel"].scale.shape, (2, 8))
    # Each scale covers 32 input channels of one tap and one output.
    amax = jnp.abs(conv).reshape(3, 3, 2, 32, 8).max(axis=3)
    scale = qjax.qtensor.decode_scale(q["c"]["kernel"].scale, r.scaling)
    np.testing.assert_array_equal(
      np.asarray(scale), 2.0 ** (np.floor(np.log2(np.asarray(amax))) - 2)
    )

  def test_raw_out_in_layout_takes_axis_minus_one(self):
    r = qjax.rule("weight", "mxfp4", axis=-1)
    self.assertEqual(r.scaling.axes, (-1,))

  def test_from_config_per_stage_options_and_ragged(self):
    recipe = qjax.Recipe.from_config(
      {
        "rules": [
          {"pattern": "embed", "method": "skip"},
          {
            "pattern": "kernel",
            "format": "mxfp4",
            "axis": -2,
            "ragged": True,
            "method": "magr+gptq+cd",
            "options": {"magr": {"alpha": 1e-4}, "cd": {"sweeps": 2}},
          },
        ]
      }
    )
    self.assertTrue(recipe.rules[0].skips)
    rule = recipe.rules[1]
    self.assertEqual(
      rule.method,
      qjax.chain(
        qjax.MagR(alpha=1e-4), qjax.GPTQ(), qjax.CoordinateDescent(sweeps=2)
      ),
    )
    self.assertEqual(rule.scaling.axes, (-2,))
    self.assertTrue(rule.scaling.ragged)
    self.assertEqual(recipe.needs, frozenset({"hessian"}))
    self.assertTrue(recipe.needs_calibration)
    self.assertFalse(recipe.needs_two_streams)
    with self.assertRaisesRegex(ValueError, "scaling has no field.*'size'"):
      qjax.Recipe.from_config(
        {"rules": [{"pattern": "k", "format": "int4", "scaling": {"size": 3}}]}
      )

  def test_build_time_errors(self):
    with self.assertRaisesRegex(ValueError, "ragged applies to block"):
      qjax.rule("k", "int4", formats.per_channel(), ragged=True)
    with self.assertRaisesRegex(ValueError, "skip rule takes no options"):
      qjax.rule("k", method="skip", order=2)
    with self.assertRaisesRegex(ValueError, "not a regex"):
      qjax.rule("(", "int4")
    with self.assertRaisesRegex(ValueError, "nan_policy"):
      qjax.rule("k", "int4", nan_policy="ignore")
    with self.assertRaisesRegex(ValueError, "needs a format"):
      qjax.Rule("k", qjax.chain(qjax.RTN()))

  def test_match_reasons_and_unused(self):
    recipe = qjax.Recipe(
      (
        qjax.rule("skipme", method="skip"),
        qjax.rule("kernel", "int4"),
        qjax.rule("nothing", "int8"),
      )
    )
    self.assertEqual(recipe.match("a/skipme/kernel", 2)[0], None)
    self.assertEqual(recipe.match("a/kernel", 2), (1, "rule 1 'kernel' (rtn)"))
    self.assertEqual(recipe.match("a/bias", 1)[0], None)
    self.assertEqual(recipe.unused({1}), ["2: 'nothing'"])


if __name__ == "__main__":
  absltest.main()
