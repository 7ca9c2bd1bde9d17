"""Console entry points: packaged configs resolve by name from any
directory, --help lists methods, formats and config fields, and a real run
of qjax-quantize outside the clone writes its metrics."""

import contextlib
import json
import pathlib
import subprocess
import sys
import tempfile

import pytest
from absl.testing import absltest

from experiments import cli

BIN = pathlib.Path(sys.executable).parent


def _script(name):
  path = BIN / name
  if not path.exists():
    raise AssertionError(f"{path} is missing: is qjax installed (pip -e .)?")
  return str(path)


class Resolve(absltest.TestCase):
  def test_names_and_clone_paths_resolve_to_the_package(self):
    with tempfile.TemporaryDirectory() as d, contextlib.chdir(d):
      got = cli.resolve_config("smollm2:bits=4")
      self.assertEqual(got, f"{cli.CONFIG_DIR / 'smollm2.py'}:bits=4")
      self.assertEqual(
        cli.resolve_config("configs/minilm.py"),
        str(cli.CONFIG_DIR / "minilm.py"),
      )
      self.assertEqual(cli.resolve_config("mine.py:x=1"), "mine.py:x=1")

  def test_argv_gets_the_default_config_and_sweep_pieces(self):
    with tempfile.TemporaryDirectory() as d, contextlib.chdir(d):
      argv = cli.rewrite_argv(["qjax-quantize", "--workdir=w"], "quantize")
      self.assertEqual(argv[1], f"--config={cli.CONFIG_DIR / 'smollm2.py'}")
      (sweep,) = cli.rewrite_argv(
        ["--configs=minilm:bits=8,block=64,smollm2"], "sweep"
      )
      m, s = cli.CONFIG_DIR / "minilm.py", cli.CONFIG_DIR / "smollm2.py"
      self.assertEqual(sweep, f"--configs={m}:bits=8,block=64,{s}")


class Scripts(absltest.TestCase):
  def test_help_lists_methods_formats_fields(self):
    with tempfile.TemporaryDirectory() as d:
      out = subprocess.run(
        [_script("qjax-quantize"), "--help"],
        cwd=d,
        capture_output=True,
        text=True,
        timeout=300,
      )
    self.assertEqual(out.returncode, 0, out.stderr)
    text = out.stdout
    for word in ("--workdir", "magr+gptq", "mxfp4", "nvfp4", "act.format"):
      self.assertIn(word, text)

  def test_every_script_answers_help(self):
    for name in ("qjax-sweep", "qjax-convert", "qjax-export"):
      out = subprocess.run(
        [_script(name), "--help"], capture_output=True, text=True, timeout=300
      )
      self.assertEqual(out.returncode, 0, f"{name}: {out.stderr[-2000:]}")
      self.assertIn("flags:", out.stdout, name)

  @pytest.mark.e2e
  def test_quantize_runs_outside_the_clone(self):
    with tempfile.TemporaryDirectory() as d:
      out = subprocess.run(
        [
          _script("qjax-quantize"),
          "--config=fmnist_cnn:method=rtn,bits=8",
          "--config.save_checkpoint=False",
          "--workdir=run",
        ],
        cwd=d,
        capture_output=True,
        text=True,
        timeout=600,
      )
      self.assertEqual(out.returncode, 0, out.stderr[-3000:])
      metrics = json.loads((pathlib.Path(d) / "run/metrics.json").read_text())
    self.assertEqual(metrics["model"], "fmnist_cnn")


if __name__ == "__main__":
  absltest.main()
