"""The methods x bits table built from sweep CSVs."""

import csv
import os
import tempfile

import pytest
from absl.testing import absltest

from experiments import method_table

pytestmark = pytest.mark.e2e  # make test-quick skips end-to-end runs

_FIELDS = (
  "name,model,method,format,bits_per_weight,float_bytes,quantized_bytes,"
  "quality,float_quality,quantized_quality"
).split(",")


def _csv(rows):
  fd, path = tempfile.mkstemp(suffix=".csv")
  with os.fdopen(fd, "w", newline="") as f:
    w = csv.DictWriter(f, _FIELDS)
    w.writeheader()
    for name, model, q in rows:
      w.writerow(
        dict(
          name=name,
          model=model,
          bits_per_weight=3.3,
          quality="perplexity",
          float_quality=6.3,
          quantized_quality=q,
        )
      )
  return path


class MethodTableTest(absltest.TestCase):
  def test_cells_missing_runs_and_variants(self):
    path = _csv(
      [
        ("m_rtn_uint3_g128", "m", 45.0),
        ("m_magr+gptq_uint3_g128", "m", 19.8),
        ("m_magr+gptq_uint3_g128_last", "m", 1.0),  # a variant: not a cell
        ("m_gptq_uint3", "m", 30.0),
      ]
    )
    text = method_table.table(method_table.read([path]))
    lines = text.splitlines()
    self.assertIn("3-bit g128 | 3-bit per channel", lines[0])
    self.assertEqual(lines[2], "| rtn | 45 | not run |")
    self.assertEqual(lines[3], "| gptq | not run | 30 |")
    self.assertEqual(lines[5], "| magr+gptq | 19.8 | not run |")

  def test_one_model_per_table(self):
    path = _csv([("a_rtn_uint3", "a", 1.0), ("b_rtn_uint3", "b", 2.0)])
    with self.assertRaisesRegex(ValueError, "one model per table"):
      method_table.read([path])


if __name__ == "__main__":
  absltest.main()
