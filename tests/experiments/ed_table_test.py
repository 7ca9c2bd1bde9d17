"""experiments.ed_table: rows and cells from sweep CSV rows."""

import pytest
from absl.testing import absltest

from experiments import ed_table

pytestmark = pytest.mark.e2e  # make test-quick skips end-to-end runs


def _row(name, method, fmt, q):
  return dict(
    name=name,
    method=method,
    format=fmt,
    quantized_quality=str(q),
    bits_per_weight="4.25",
    quality="cosine_mean",
  )


class EDTableTest(absltest.TestCase):
  def test_adjust_variants_get_their_own_rows(self):
    rows = [
      _row("minilm_rtn_mxfp4", "rtn", "mxfp4", 0.95),
      _row("minilm_ed_mxfp4", "ed", "mxfp4", 0.98),
      _row("minilm_ed_mxfp4_rescale", "ed", "mxfp4", 0.97),
      _row("minilm_rtn_nvfp4", "rtn", "nvfp4", 0.96),
    ]
    text, cells = ed_table.table(rows)
    self.assertEqual(cells["ed_rescale", "mxfp4"], 0.97)
    self.assertEqual(cells["ed", "mxfp4"], 0.98)
    lines = text.splitlines()
    self.assertEqual(lines[0], "| method | mxfp4 | nvfp4 |")
    self.assertIn("| ed | 0.98000 | not run |", lines)
    self.assertLess(
      lines.index("| rtn | 0.95000 | 0.96000 |"),
      lines.index("| ed | 0.98000 | not run |"),
    )

  def test_kl_joins_the_agreement_cells(self):
    rows = [
      _row("m_rtn_mxfp4", "rtn", "mxfp4", 0.5),
      _row("m_ed_mxfp4", "ed", "mxfp4", 0.9),
    ]
    text, _ = ed_table.table(rows, {"m_ed_mxfp4": 0.0123})
    self.assertIn("| ed | 0.90000 / 0.0123 |", text.splitlines())
    self.assertIn("| rtn | 0.50000 |", text.splitlines())


if __name__ == "__main__":
  absltest.main()
