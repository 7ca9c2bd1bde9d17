"""Every notebook runs top to bottom on a CPU."""

import pathlib

import nbformat
import pytest
from absl.testing import absltest
from nbclient import NotebookClient

pytestmark = pytest.mark.e2e  # make test-quick skips end-to-end runs

NOTEBOOKS = pathlib.Path(__file__).parent.parent / "notebooks"


class NotebooksTest(absltest.TestCase):
  def test_no_notebook_installs_a_pypi_name_qjax_does_not_own(self):
    # The PyPI package called qjax is another project: install from the
    # repository (a git URL or a path), never by that name.
    for path in NOTEBOOKS.glob("*.ipynb"):
      text = " ".join(
        "".join(c["source"]) for c in nbformat.read(path, as_version=4).cells
      )
      self.assertNotRegex(text, r"pip install[^\n]*\bqjax\b(?![/.\w])", path)
      self.assertIn("QJAX_SOURCE", text, path)

  def test_quickstart_runs(self):
    nb = nbformat.read(NOTEBOOKS / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3").execute(
      cwd=str(NOTEBOOKS)
    )
    text = "".join(
      o.get("text", "")
      for c in nb.cells
      if c.cell_type == "code"
      for o in c.get("outputs", [])
    )
    self.assertIn("mxfp4", text)
    self.assertIn("4.250", text)  # mxfp4's exact bits per weight
    images = [
      o
      for c in nb.cells
      for o in c.get("outputs", [])
      if "image/png" in o.get("data", {})
    ]
    self.assertLen(images, 1)

  def test_activations_runs(self):
    nb = nbformat.read(NOTEBOOKS / "activations.ipynb", as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3").execute(
      cwd=str(NOTEBOOKS)
    )
    text = "".join(
      o.get("text", "")
      for c in nb.cells
      if c.cell_type == "code"
      for o in c.get("outputs", [])
    )
    cos = dict(
      (line[:38].strip(), float(line.split("cosine")[-1]))
      for line in text.splitlines()
      if "cosine" in line
    )
    self.assertGreater(cos["W8A8 int8 per token"], 0.99)
    self.assertGreater(
      cos["W8A8 int8 per token, Hadamard"], cos["W8A8 int8 per token"]
    )
    self.assertIn("W4A4 nvfp4 GPTQ on quantized inputs", cos)
    images = [
      o
      for c in nb.cells
      for o in c.get("outputs", [])
      if "image/png" in o.get("data", {})
    ]
    self.assertLen(images, 1)


if __name__ == "__main__":
  absltest.main()
