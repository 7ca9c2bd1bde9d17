"""qjax.quantize(..., layer_log=[...]): one record per quantized leaf, with
SQNR and the calibration loss against NumPy references."""

import jax
import numpy as np
from absl.testing import absltest

import qjax


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((256, 48)) @ rng.standard_normal((48, 48))
  w = rng.standard_normal((48, 24)).astype(np.float32)
  return x.astype(np.float32), w


class LayerLogTest(absltest.TestCase):
  def test_data_free_records_match_stats(self):
    _, w = _problem()
    params = {"a": {"kernel": w, "bias": np.zeros(24, np.float32)}}
    records = []
    recipe = qjax.Recipe((qjax.rule("kernel", "int4"),))
    q = qjax.quantize(params, recipe, layer_log=records)
    (r,) = records  # the bias is not quantized
    self.assertEqual((r["path"], r["method"]), ("a/kernel", "rtn"))
    self.assertGreater(r["seconds"], 0)
    self.assertNotIn("loss", r)
    want = qjax.stats(q, params)["a/kernel"]["sqnr_db"]
    self.assertAlmostEqual(r["sqnr_db"], want, places=4)

  def test_loss_is_the_output_error_over_calibration_rows(self):
    x, w = _problem(1)
    h = 2.0 / len(x) * x.T.astype(np.float64) @ x
    losses = {}
    for method in ("rtn", "gptq"):
      records = []
      recipe = qjax.Recipe((qjax.rule("kernel", "int4", method=method),))
      q = qjax.quantize(
        {"a": {"kernel": w}},
        recipe,
        hessians={"a/kernel": h.astype(np.float32)},
        layer_log=records,
      )
      d = w.astype(np.float64) - np.asarray(q["a"]["kernel"].dequantize())
      want = np.sum((x.astype(np.float64) @ d) ** 2) / len(x)
      self.assertAlmostEqual(records[0]["loss"] / want, 1.0, places=4)
      losses[method] = records[0]["loss"]
    self.assertLess(losses["gptq"], losses["rtn"])  # what GPTQ minimizes

  def test_nothing_is_recorded_inside_a_trace(self):
    _, w = _problem()
    records = []
    recipe = qjax.Recipe((qjax.rule("kernel", "int8"),))
    jax.jit(lambda p: qjax.quantize(p, recipe, layer_log=records))(
      {"a": {"kernel": w}}
    )
    self.assertEqual(records, [])


if __name__ == "__main__":
  absltest.main()
