"""Every notebook runs top to bottom on a CPU, and prints what shows its
capability works (a broken capability changes a printed number)."""

import pathlib
import re

import nbformat
import pytest
from absl.testing import absltest
from nbclient import NotebookClient

pytestmark = pytest.mark.e2e  # make test-quick skips end-to-end runs

NOTEBOOKS = pathlib.Path(__file__).parent.parent / "notebooks"


def _run(name: str, timeout: int = 900) -> tuple[str, int]:
  """Executes notebooks/<name>.ipynb; returns its printed text and the
  number of images it showed."""
  nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  NotebookClient(nb, timeout=timeout, kernel_name="python3").execute(
    cwd=str(NOTEBOOKS)
  )
  outputs = [
    o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
  ]
  text = "".join(o.get("text", "") for o in outputs)
  images = sum("image/png" in o.get("data", {}) for o in outputs)
  return text, images


def _accuracy_kl(text: str, fmt: str) -> dict[str, tuple[float, float]]:
  """{method: (accuracy, KL)} from lines '<fmt> <method> accuracy A  KL K'."""
  pattern = rf"^{fmt} (\S+)\s+accuracy ([\d.]+)\s+KL ([\d.e+-]+)$"
  return {
    m: (float(a), float(k)) for m, a, k in re.findall(pattern, text, re.M)
  }


def _numbers(text: str, key: str) -> dict[str, float]:
  """{line prefix: number after `key`} for every printed line with `key`."""
  out = {}
  for line in text.splitlines():
    if key in line:
      head, _, tail = line.partition(key)
      out[head.strip()] = float(tail.split()[0])
  return out


class NotebooksTest(absltest.TestCase):
  def test_every_notebook_installs_from_the_repository(self):
    # The PyPI package called qjax is another project: install from the
    # repository (a git URL or a path), never by that name.
    books = list(NOTEBOOKS.glob("*.ipynb"))
    self.assertGreaterEqual(len(books), 9)
    for path in books:
      cells = nbformat.read(path, as_version=4).cells
      text = " ".join("".join(c["source"]) for c in cells)
      self.assertNotRegex(text, r"pip install[^\n]*\bqjax\b(?![/.\w])", path)
      first_code = next(c for c in cells if c.cell_type == "code")
      self.assertIn("QJAX_SOURCE", first_code.source, path)

  def test_quickstart_runs(self):
    text, images = _run("quickstart", 600)
    self.assertIn("mxfp4", text)
    self.assertIn("4.250", text)  # mxfp4's exact bits per weight
    self.assertEqual(images, 1)

  def test_activations_runs(self):
    text, images = _run("activations")
    cos = _numbers(text, "cosine")
    self.assertGreater(cos["W8A8 int8 per token"], 0.99)
    self.assertGreater(
      cos["W8A8 int8 per token, Hadamard"], cos["W8A8 int8 per token"]
    )
    self.assertIn("W4A4 nvfp4 GPTQ on quantized inputs", cos)
    self.assertEqual(images, 1)

  def test_formats_runs(self):
    text, images = _run("formats", 300)
    self.assertEqual(text.count("bit-identical to ml_dtypes: True"), 5)
    self.assertNotIn("ml_dtypes: False", text)
    self.assertIn("[0. 1. 1. 2.]", text)  # ties to even on e1m2
    self.assertIn("= 3.0 bits per value", text)
    self.assertEqual(images, 1)

  def test_gptq_magr_runs(self):
    text, images = _run("gptq_magr")
    rows = _accuracy_kl(text, "int2")
    self.assertEqual(set(rows), {"rtn", "gptq", "magr+gptq"})
    # At 2 bits RTN breaks the CNN; the Hessian methods keep it working.
    self.assertLess(rows["rtn"][0], 0.6)
    self.assertGreater(rows["gptq"][0], 0.8)
    self.assertGreater(rows["magr+gptq"][0], 0.8)
    self.assertIn("has no option 'act_ordr'", text)
    self.assertEqual(images, 1)

  def test_error_diffusion_runs(self):
    text, images = _run("error_diffusion")
    rows = _accuracy_kl(text, "mxfp4")
    self.assertEqual(set(rows), {"rtn", "gptq", "ed", "gpfq"})
    self.assertLess(rows["ed"][1], rows["rtn"][1])  # KL to float
    self.assertGreater(rows["ed"][0], 0.85)
    self.assertEqual(images, 1)

  def test_pipe_runs(self):
    text, images = _run("pipe")
    cos = _numbers(text, "cosine")
    dense = [v for k, v in cos.items() if "keep 1.0" in k]
    self.assertLen(dense, 3)
    self.assertEqual(dense, sorted(dense))  # each order adds precision
    self.assertEqual(text.count(": True"), 3)  # the error bound holds
    self.assertEqual(images, 1)

  def test_qaf_runs(self):
    text, images = _run("qaf")
    rows = re.findall(r"SQNR QAF ([\d.-]+) dB, FTQ ([\d.-]+) dB", text)
    self.assertLen(rows, 2)
    for qaf, ftq in rows:
      self.assertGreater(float(qaf), float(ftq))
    (accuracy,) = re.findall(r"QAF conv2 .*: accuracy ([\d.]+)", text)
    self.assertGreater(float(accuracy), 0.8)
    self.assertEqual(images, 1)

  def test_kernels_runs(self):
    text, images = _run("kernels")
    errors = [float(x) for x in re.findall(r"= ([\d.e+-]+)\n", text)]
    self.assertLen(errors, 6)  # five formats and the whole model
    self.assertLess(max(errors), 1e-3)
    interpreted = _numbers(text, "vs reference:")
    self.assertLess(max(interpreted.values()), 1e-4)
    self.assertEqual(images, 1)

  def test_convert_runs(self):
    text, images = _run("convert")
    self.assertIn("round trip bit for bit: True", text)
    self.assertIn("qwix.dequantize == QTensor.dequantize: True", text)
    self.assertIn("'x'", text)  # codes sharded over the mesh axis
    self.assertEqual(images, 1)


if __name__ == "__main__":
  absltest.main()
