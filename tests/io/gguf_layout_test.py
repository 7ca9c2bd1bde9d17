"""GGUF files with llama.cpp names: the documented Flax tree (layout
'llama'), and a conversion whose rules match nothing exits non-zero naming
the rules and some leaves, before anything is written."""

import pathlib
import subprocess
import sys
import tempfile

import gguf
import numpy as np
from absl.testing import absltest

import qjax
from qjax.io import convert, sources

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _write_llama_gguf(path, d=64, ff=128, vocab=96, layers=2):
  rng = np.random.default_rng(0)
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_tensor("token_embd.weight", rng.normal(size=(vocab, d)).astype("f4"))
  for i in range(layers):
    for name, shape in (
      ("attn_q", (d, d)),
      ("attn_k", (d, d)),
      ("ffn_up", (ff, d)),
      ("ffn_down", (d, ff)),
    ):  # llama.cpp stores [out, in]
      w.add_tensor(
        f"blk.{i}.{name}.weight", rng.normal(size=shape).astype("f4")
      )
    w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(d, "f4"))
  w.add_tensor("output_norm.weight", np.ones(d, "f4"))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


class LlamaLayoutTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.dir = pathlib.Path(tempfile.mkdtemp())
    self.file = self.dir / "tiny-llama.gguf"
    _write_llama_gguf(self.file)

  def test_names_and_layouts(self):
    s = sources.open_source(self.file)  # auto: llama names
    specs = s.specs()
    self.assertEqual(specs["embed/embedding"].shape, (96, 64))
    self.assertEqual(specs["blk_0/ffn_up/kernel"].shape, (64, 128))  # [in, out]
    self.assertEqual(specs["blk_1/attn_norm/scale"].shape, (64,))
    reader = gguf.GGUFReader(str(self.file))
    raw = {t.name: np.asarray(t.data) for t in reader.tensors}
    np.testing.assert_array_equal(
      s.read("blk_0/ffn_up/kernel"), raw["blk.0.ffn_up.weight"].T
    )

  def test_default_recipe_quantizes_projections_not_the_embedding(self):
    s = sources.open_source(self.file)
    recipe = qjax.Recipe((qjax.rule("kernel", "mxfp4"),))
    summary = convert.convert(s, recipe, self.dir / "out", progress=False)
    leaves = summary["leaves"]
    self.assertEqual(leaves["blk_0/attn_q/kernel"]["rule"], 0)
    self.assertIsNone(leaves["embed/embedding"]["rule"])
    # Blocks of 32 along the input axis: 4.25 bits per weight.
    self.assertAlmostEqual(
      leaves["blk_1/ffn_down/kernel"]["bits_per_weight"], 4.25
    )
    # A rule matching every leaf still leaves the embedding alone (and the
    # plan says so before converting), unless its pattern names 'embed'.
    every = qjax.Recipe((qjax.rule(r"\w+$", "mxfp4"),))
    report = convert.plan_report(s, every)
    self.assertIn(
      "'embed' leaves are skipped by default: embed/embedding", report
    )
    self.assertIn("8 leaves", report)

  def test_raw_layout_matching_nothing_exits_non_zero(self):
    out = self.dir / "raw_out"
    run = subprocess.run(
      [
        sys.executable,
        "-c",
        "from experiments import cli; cli.convert()",  # qjax-convert
        f"--config=convert:source={self.file},layout=raw",  # packaged config
        f"--output={out}",
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=600,
    )
    self.assertNotEqual(run.returncode, 0)
    self.assertIn("no parameter matched a quantizing rule", run.stderr)
    self.assertIn("0: 'kernel'", run.stderr)
    self.assertIn("blk/0/attn_k/weight", run.stderr)  # a sample of the leaves
    self.assertFalse(out.exists())
    self.assertFalse(out.with_name(out.name + ".partial").exists())


if __name__ == "__main__":
  absltest.main()
