"""PIPE end to end: config-driven runs, the member ensemble on a real MiniLM
slice across 8 simulated devices, and the results table."""

import json
import pathlib
import tempfile

import jax
import pytest
from absl.testing import absltest

from configs import minilm as minilm_config
from experiments import pipe_ensemble, pipe_table, run_lib
from qjax.io import checkpoint

pytestmark = pytest.mark.e2e  # make test-quick skips end-to-end runs


class PipeRunTest(absltest.TestCase):
  def test_orders_improve_a_real_model(self):
    scores, bpw = [], []
    for order in (1, 2):
      config = minilm_config.get_config(
        f"method=pipe,bits=2,order={order},keep=0.5,block=0,layers=1,"
        "sentences=6"
      )
      workdir = tempfile.mkdtemp()
      m = run_lib.run(config, workdir)
      scores.append(m["quantized"]["cosine_mean"])
      bpw.append(m["bits_per_weight"])
      back = checkpoint.restore(pathlib.Path(workdir) / "checkpoint")
      kernel = back["layer_0"]["ffn_in"]["kernel"]
      self.assertEqual(kernel.order, order)
    self.assertGreater(scores[1], scores[0])
    self.assertGreater(bpw[1], bpw[0])

  def test_member_ensemble_on_eight_devices(self):
    self.assertEqual(jax.device_count(), 8)
    config = minilm_config.get_config(
      "method=pipe,bits=4,order=3,keep=0.5,block=0,layers=1,sentences=8"
    )
    groups = pipe_ensemble.parse_groups("0/1,2")
    self.assertEqual(groups, ((0,), (1, 2)))
    workdir = tempfile.mkdtemp()
    out = pipe_ensemble.run(config, groups, workdir)
    self.assertEqual(out["devices"], 8)
    for combine in ("layer", "output"):
      self.assertLess(out[combine]["max_abs_diff_parallel_vs_single"], 1e-4)
    # The per-layer sum is the expanded model: better than member 0 alone.
    self.assertGreater(out["layer"]["cosine_to_float"], 0.99)
    self.assertGreater(
      out["layer"]["cosine_to_float"], out["member0_alone_cosine"]
    )
    saved = json.loads((pathlib.Path(workdir) / "ensemble.json").read_text())
    self.assertEqual(saved["groups"], [[0], [1, 2]])
    self.assertLen(saved["members"], 2)


class PipeTableTest(absltest.TestCase):
  def test_table_cells_and_rtn_row(self):
    workdir = pathlib.Path(tempfile.mkdtemp())
    runs = {
      "minilm_pipe_int4_o1": (0.95, 4.1),
      "minilm_pipe_int4_o2": (0.999, 8.2),
      "minilm_pipe_int4_o2_k0.5": (0.99, 6.2),
      "minilm_rtn_int4": (0.95, 4.1),
      "minilm_rtn_int8": (0.9995, 8.1),
      "minilm_gptq_uint4_g128": (0.98, 4.3),  # not a pipe/rtn-intN row
    }
    for name, (cos, bpw) in runs.items():
      (workdir / name).mkdir()
      (workdir / name / "metrics.json").write_text(
        json.dumps(
          {
            "name": name,
            "model": "minilm",
            "quantized": {"cosine_mean": cos},
            "bits_per_weight": bpw,
          }
        )
      )
    rows = pipe_table.load(workdir)
    self.assertLen(rows, 5)
    text = pipe_table.table(rows)
    self.assertIn("| int4 | 1 | 0.9500 (4.10) | 0.9990 (8.20) |", text)
    self.assertIn("| int4 | 0.5 | 0.9500 (4.10) | 0.9900 (6.20) |", text)
    self.assertIn("| RTN | int4 | int8 |", text)
    self.assertIn("0.9995 (8.10)", text)
    png = workdir / "p.png"
    pipe_table.plot(rows, png)
    self.assertGreater(png.stat().st_size, 1000)


if __name__ == "__main__":
  absltest.main()
