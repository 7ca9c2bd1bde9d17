"""Conversion under jax.distributed (2 processes x 4 CPU devices, gloo) and
interrupted by SIGKILL: the program as users run it, in subprocesses."""

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
from absl.testing import absltest

import qjax
from configs import convert as convert_config
from experiments import run_lib
from qjax.io import checkpoint, convert, sources
from qjax.models import minilm
from tests.io import convert_test

pytestmark = pytest.mark.e2e  # make test-quick skips end-to-end runs

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG = "configs/convert.py:source=minilm,part_kb={part_kb}"
# What the program builds from that config (mxfp4, ragged blocks).
RECIPE = run_lib.recipe_from_config(convert_config.get_config("source=minilm"))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(
  out, *, part_kb=0, process_id=0, processes=1, port=None, dequantize=None
):
  args = [
    sys.executable,
    "-m",
    "experiments.convert_checkpoint",
    f"--output={out}",
    "--local_devices=4",
  ]
  if dequantize:
    args += ["--dequantize", f"--input={dequantize}"]
  else:
    args += [f"--config={CONFIG.format(part_kb=part_kb)}"]
  if processes > 1:
    args += [
      f"--coordinator_address=localhost:{port}",
      f"--num_processes={processes}",
      f"--process_id={process_id}",
    ]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen(
    args,
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


class MultiProcessTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.dir = pathlib.Path(tempfile.mkdtemp())
    self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)

  def _single_process(self, out):
    # This pytest process: one process, 8 devices (conftest.py).
    return convert.convert(
      sources.open_source(minilm.safetensors_path()),
      RECIPE,
      out,
      progress=False,
    )

  def test_two_processes_equal_one_bit_for_bit(self):
    out = self.dir / "two"
    port = _free_port()
    procs = [
      _launch(out, part_kb=2048, process_id=i, processes=2, port=port)
      for i in range(2)
    ]
    logs = self._wait(procs)
    self.assertIn("quantized leaves 36", logs[0])
    doc = checkpoint.load_metadata(out)
    self.assertEqual(doc["conversion"]["processes"], 2)
    self.assertEqual(doc["conversion"]["devices"], 8)
    # Both processes wrote their shards into every orbax part.
    parts = sorted((out / "arrays").glob("part*"))
    self.assertGreater(len(parts), 1)
    for part in parts:
      writers = {d.name for d in part.glob("ocdbt.process_*")}
      self.assertEqual(writers, {"ocdbt.process_0", "ocdbt.process_1"})

    one = self.dir / "one"
    self._single_process(one)
    self.assertEqual(convert_test.digests(out), convert_test.digests(one))
    restored = checkpoint.restore(out)
    convert_test.assert_trees_equal(self, restored, checkpoint.restore(one))

    # The inverse under 2 processes: a float orbax checkpoint of the
    # dequantized tree.
    float_out = self.dir / "dequantized"
    port = _free_port()
    self._wait(
      [
        _launch(float_out, process_id=i, processes=2, port=port, dequantize=out)
        for i in range(2)
      ]
    )
    source = sources.open_source(float_out)
    want = convert_test.flat(qjax.dequantize(restored))
    self.assertEqual(sorted(source.specs()), sorted(want))
    for path in ("layer_0/query/kernel", "layer_5/ffn_out/bias"):
      np.testing.assert_array_equal(source.read(path), want[path])

  def _wait(self, procs) -> list[str]:
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
      self.assertEqual(p.returncode, 0, log[-3000:])
    return logs

  def test_killed_conversion_leaves_no_checkpoint_and_reruns(self):
    out = self.dir / "killed"
    partial = out.with_name(out.name + ".partial")
    # Small parts: many orbax writes, so the kill lands mid-conversion.
    proc = _launch(out, part_kb=64)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
      if len(list((partial / "arrays").glob("part*"))) >= 3:
        break
      time.sleep(0.05)
    self.assertIsNone(proc.poll(), "the conversion ended before the kill")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    self.assertTrue(partial.exists())
    self.assertFalse(out.exists())
    with self.assertRaisesRegex(ValueError, "not a complete qjax checkpoint"):
      checkpoint.restore(out)
    with self.assertRaisesRegex(ValueError, "not a complete qjax checkpoint"):
      checkpoint.restore(partial)

    # A rerun replaces the leftover and produces the full checkpoint.
    self._single_process(out)
    self.assertFalse(partial.exists())
    convert_test.assert_trees_equal(
      self,
      checkpoint.restore(out),
      qjax.quantize(minilm.load_params(), RECIPE),
    )


if __name__ == "__main__":
  absltest.main()
