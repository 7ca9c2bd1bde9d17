"""SmolLM2-135M's first blocks quantized int4 in groups of 128, saved as a
qjax checkpoint, exported and read back: GGUF (Q4_0) through gguf-py's own
reader and compressed-tensors through qjax's reader give every leaf's values
bit for bit, as does the main job's grid (uint4 with zero points, float32
scales) in compressed-tensors. The whole model's run is in docs/export.md."""

import pathlib
import tempfile

import pytest
from absl.testing import absltest

import qjax
from experiments import export
from qjax.formats import scaling as S
from qjax.io import checkpoint
from qjax.models import smollm2

pytestmark = pytest.mark.e2e  # make test-quick skips end-to-end runs


LAYERS = 4  # the full model's run is in docs/export.md (experiments/export.py)


def _checkpoint(directory, fmt, scaling):
  rule = qjax.rule("kernel", fmt, scaling, ragged=True)
  params = smollm2.load_params(layers=LAYERS)
  q = qjax.quantize(params, qjax.Recipe([rule]))
  checkpoint.save(directory, q)
  return q


class SmolLM2Export(absltest.TestCase):
  def test_int4_g128_gguf_and_compressed_tensors(self):
    with tempfile.TemporaryDirectory() as d:
      d = pathlib.Path(d)
      _checkpoint(d / "ckpt", "int4", S.per_block(128, 0, "float16"))
      g = export.export(d / "ckpt", "gguf", d / "m.gguf", "smollm2")
      c = export.export(d / "ckpt", "compressed-tensors", d / "ct", "smollm2")
    for s in (g, c):
      self.assertEqual(s["mismatched_leaves"], [])
      self.assertEqual(s["quantized_leaves"], LAYERS * 7)

  def test_main_job_grid_compressed_tensors(self):
    with tempfile.TemporaryDirectory() as d:
      d = pathlib.Path(d)
      scaling = S.per_block(128, 0, zero_point=True)
      _checkpoint(d / "ckpt", "uint4", scaling)
      s = export.export(d / "ckpt", "compressed-tensors", d / "ct", "smollm2")
      with self.assertRaisesRegex(ValueError, "no exact GGML type"):
        export.export(d / "ckpt", "gguf", d / "m.gguf", "smollm2")
      self.assertFalse((d / "m.gguf").exists())
    self.assertEqual(s["mismatched_leaves"], [])


if __name__ == "__main__":
  absltest.main()
