"""SmolLM2-135M quantized int4 in groups of 128, saved as a qjax
checkpoint, exported and read back: GGUF (Q4_0) through gguf-py's own reader
and compressed-tensors through qjax's reader give every leaf's values bit
for bit, as does the main job's grid (uint4 with zero points, float32
scales) in compressed-tensors."""

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


def _checkpoint(directory, fmt, scaling):
  rule = qjax.rule("kernel", fmt, scaling, ragged=True)
  q = qjax.quantize(smollm2.load_params(), qjax.Recipe([rule]))
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
      self.assertEqual(s["quantized_leaves"], 30 * 7)
    # 4.125 bits per projection weight against float32: the file shrinks
    # by the projections' share (the embedding stays float32).
    self.assertLess(g["file_bytes"], 0.5 * 4 * 134.5e6)

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
