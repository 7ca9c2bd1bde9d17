"""Resumable calibrated runs (qjax.io.resume): a run whose process dies
after a block is recorded, started again with the same log, gives the codes
of an uninterrupted run bit for bit, and does not redo the recorded blocks;
for GPTQ's sequential mode and for the two-stream driver (Error Diffusion).
"""

import os
import pathlib
import subprocess
import sys
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

import qjax
from qjax.calibration import discover
from qjax.io import resume

ROOT = pathlib.Path(__file__).resolve().parents[2]


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x + nn.Dense(16, name="down")(nn.gelu(nn.Dense(48, name="up")(x)))


class Net(nn.Module):
  """Four blocks, with a pooling glue before the last (a re-run anchor)."""

  @nn.compact
  def __call__(self, x):
    for i in range(3):
      x = Block(name=f"block_{i}")(x)
    x = x - x.mean(axis=0, keepdims=True)
    return Block(name="block_3")(x)


def _setup(method="gptq"):
  net = Net()
  params = net.init(jax.random.key(0), jnp.ones((1, 16)))["params"]
  rng = np.random.default_rng(0)
  batches = [
    jnp.asarray(rng.standard_normal((32, 16)), jnp.float32) for _ in range(3)
  ]
  recipe = qjax.Recipe((qjax.rule("kernel", "int4", method=method),))
  return net, params, batches, recipe


class _DyingLog(resume.BlockLog):
  """Kills its process right after block `die_after` is recorded, or
  (midway) while it is being written."""

  def __init__(self, path, die_after, midway):
    super().__init__(path)
    self.die_after, self.midway = die_after, midway

  def block_done(self, index, name, *args):
    if index == self.die_after and self.midway:
      tmp = self.path / f".block_{index:05d}.tmp"
      tmp.mkdir()
      (tmp / "name.txt").write_text(name)
      os._exit(3)
    super().block_done(index, name, *args)
    if index == self.die_after:
      os._exit(3)  # no cleanup, as a killed job


def run_and_die(path, die_after, precision, midway, method="gptq"):
  net, params, batches, recipe = _setup(method)
  qjax.quantize(
    params,
    recipe,
    calib=(net, batches),
    resume=_DyingLog(path, die_after, midway),
    calib_precision=precision,
    layer_log=[],
  )


def run_child_that_dies(test, code: str) -> None:
  """Runs `python -c code` from the repository root; it must end as a
  _DyingLog ends it (status 3)."""
  proc = subprocess.run(
    [sys.executable, "-c", code],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  test.assertEqual(proc.returncode, 3, proc.stderr[-2000:])


class _CountingWalk:
  """A discovered walk that counts the blocks it calibrates."""

  def __init__(self, walk):
    self.walk, self.calibrated = walk, []

  def __getattr__(self, name):
    return getattr(self.walk, name)

  def hessians(self, name, *args, **kwargs):
    self.calibrated.append(name)
    return self.walk.hessians(name, *args, **kwargs)

  def layer_order(self, name, *args, **kwargs):  # the two-stream driver
    self.calibrated.append(name)
    return self.walk.layer_order(name, *args, **kwargs)


def _codes(tree):
  return {
    f"{b}/{layer}": np.asarray(tree[b][layer]["kernel"].codes)
    for b in tree
    for layer in ("up", "down")
  }


class ResumeTest(absltest.TestCase):
  def _killed_then_resumed(
    self, die_after, precision="float32", midway=False, method="gptq"
  ):
    net, params, batches, recipe = _setup(method)
    whole_log, resumed_log = [], []
    whole = qjax.quantize(
      params,
      recipe,
      calib=(net, batches),
      calib_precision=precision,
      layer_log=whole_log,
    )
    path = tempfile.mkdtemp() + "/log"
    run_child_that_dies(
      self,
      "from tests.io.resume_test import run_and_die; "
      f"run_and_die({path!r}, {die_after}, {precision!r}, {midway}, "
      f"{method!r})",
    )
    recorded = sorted(p.name for p in pathlib.Path(path).glob("block_*"))
    finished = die_after if midway else die_after + 1
    self.assertLen(recorded, finished)
    walk = _CountingWalk(discover(net, params, batches))
    resumed = qjax.quantize(
      params,
      recipe,
      calib=(walk, batches),
      resume=resume.BlockLog(path),
      calib_precision=precision,
      layer_log=resumed_log,
    )
    # only the blocks after the recorded ones were calibrated again
    self.assertEqual(walk.calibrated, list(walk.names[finished:]))
    want, got = _codes(whole), _codes(resumed)
    self.assertEqual(want.keys(), got.keys())
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
      b, layer = k.split("/")
      np.testing.assert_array_equal(
        resumed[b][layer]["kernel"].scale, whole[b][layer]["kernel"].scale
      )
    # the per-layer log covers the recorded blocks too, in order
    self.assertEqual(
      [r["path"] for r in resumed_log], [r["path"] for r in whole_log]
    )
    for a, b in zip(resumed_log, whole_log, strict=True):
      self.assertEqual(a["sqnr_db"], b["sqnr_db"], a["path"])

  def test_killed_after_block_1_resumes_to_the_same_codes(self):
    self._killed_then_resumed(1)

  def test_resume_past_a_rerun_anchor_in_float64(self):
    # block 3 follows pooling glue: its call comes from a re-run, which the
    # resumed walk has not made yet
    self._killed_then_resumed(2, "float64")

  def test_killed_while_writing_a_block(self):
    # the process dies halfway through recording block 2: that block stays
    # a temporary directory, and the run resumes after block 1
    self._killed_then_resumed(2, midway=True)

  def test_error_diffusion_resumes_both_streams(self):
    # killed after block 2: block 3's two inputs (float and quantized
    # stream) come from the log, through the pooling glue's re-run
    self._killed_then_resumed(2, method="ed")

  def test_error_diffusion_killed_while_writing_a_block(self):
    self._killed_then_resumed(1, midway=True, method="ed")

  def test_a_log_of_the_other_driver_is_refused(self):
    net, params, batches, recipe = _setup()
    path = tempfile.mkdtemp() + "/log"
    qjax.quantize(
      params, recipe, calib=(net, batches), resume=resume.BlockLog(path)
    )
    ed = _setup("ed")[3]
    with self.assertRaisesRegex(ValueError, "belongs to another run"):
      qjax.quantize(
        params, ed, calib=(net, batches), resume=resume.BlockLog(path)
      )

  def test_another_run_is_refused(self):
    net, params, batches, recipe = _setup()
    path = tempfile.mkdtemp() + "/log"
    qjax.quantize(
      params, recipe, calib=(net, batches), resume=resume.BlockLog(path)
    )
    other = qjax.Recipe((qjax.rule("kernel", "int3", method="gptq"),))
    with self.assertRaisesRegex(ValueError, "belongs to another run"):
      qjax.quantize(
        params, other, calib=(net, batches), resume=resume.BlockLog(path)
      )
    with self.assertRaisesRegex(ValueError, "belongs to another run"):
      qjax.quantize(
        params,
        recipe,
        calib=(net, batches[:2]),
        resume=resume.BlockLog(path),
      )
    busy = tempfile.mkdtemp()
    pathlib.Path(busy, "notes.txt").write_text("mine")
    with self.assertRaisesRegex(ValueError, "not empty"):
      qjax.quantize(
        params, recipe, calib=(net, batches), resume=resume.BlockLog(busy)
      )
    with self.assertRaisesRegex(ValueError, "give calib"):
      qjax.quantize(params, recipe, resume=resume.BlockLog(busy))

  def test_outputs_round_trip_any_dtype(self):
    import ml_dtypes  # noqa: PLC0415

    d = pathlib.Path(tempfile.mkdtemp())
    arrays = [
      np.arange(6, dtype=np.float64).reshape(2, 3) / 7,
      np.arange(4, dtype=np.float32).astype(ml_dtypes.bfloat16),
      np.float32(np.pi),
    ]
    resume._save_arrays(d, arrays)
    for a, b in zip(resume._load_arrays(d), arrays, strict=True):
      self.assertEqual(a.dtype, b.dtype)
      np.testing.assert_array_equal(a, b)


if __name__ == "__main__":
  absltest.main()
