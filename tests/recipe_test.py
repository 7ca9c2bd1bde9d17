"""Rules and recipes: building, defaults, matching, and from_config."""

from absl.testing import absltest

import qjax
from qjax import formats


class RecipeTest(absltest.TestCase):
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
