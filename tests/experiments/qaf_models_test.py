"""experiments/qaf_models: the comparison table pivots one row per arm into
one line per (model, rate, bits), and reads back the CSVs it writes."""

import csv

import pytest

from experiments import qaf_models

pytestmark = pytest.mark.e2e  # make test-quick skips end-to-end runs


def _row(arm, quality, kl, nbytes, bits=4):
  return {
    "model": "m",
    "rate": 2.0,
    "bits": bits,
    "arm": arm,
    "layer_bytes": nbytes,
    "float_layer_bytes": 1000,
    "quality": "accuracy",
    "accuracy": str(quality),
    "kl": str(kl),
  }


def test_table_has_one_line_per_setting_and_names_rtn_format():
  rows = [
    _row("qaf", 0.88, 0.01, 60),
    _row("cp", 0.89, 0.005, 500),
    _row("rtn_int2", 0.46, 1.2, 62),
    _row("ftq", 0.86, 0.03, 60),
    _row("qaf+bn", 0.8, 0.5, 60),
  ]
  lines = qaf_models.table(rows).splitlines()
  assert lines[0] == (
    "| model | rate | bits | cp | ftq | qaf | rtn | qaf+bn | QAF bytes "
    "| RTN bytes |"
  )
  assert len(lines) == 3
  assert lines[2] == (
    "| m | 2 | 4 | 0.89 / 0.005 | 0.86 / 0.03 | 0.88 / 0.01 "
    "| 0.46 / 1.2 (int2) | 0.8 / 0.5 | 60 | 62 |"
  )


def test_table_is_the_same_from_csv_strings(tmp_path):
  path = tmp_path / "rows.csv"
  rows = [_row("qaf", 0.88, 0.01, 60), _row("rtn_int2", 0.46, 1.2, 62)]
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  read = list(csv.DictReader(open(path)))
  for r in read:
    r["rate"] = float(r["rate"])
  assert qaf_models.table(read) == qaf_models.table(rows)


def test_activation_quantized_arms_get_their_own_columns():
  rows = [
    _row("qaf", 0.88, 0.01, 60),
    _row("qaf@aint8", 0.87, 0.02, 60),
    _row("rtn_int2@aint8", 0.45, 1.3, 62),
    _row("ftq@aint8", 0.85, 0.04, 60),
  ]
  lines = qaf_models.table(rows).splitlines()
  assert lines[0] == (
    "| model | rate | bits | qaf | ftq@aint8 | qaf@aint8 | rtn@aint8 "
    "| QAF bytes | RTN bytes |"
  )
  assert "| 0.45 / 1.3 (int2) |" in lines[2]
