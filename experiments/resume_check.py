"""A calibrated run killed partway and resumed gives the uninterrupted codes.

  python -m experiments.resume_check                 # SmolLM2, the main job
  python -m experiments.resume_check --kill_after=20 --layers=0

Quantizes SmolLM2 with the main job's recipe (GPTQ act-order, uint4 g128,
float64 calibration) three ways in one command: uninterrupted; in a child
process that records blocks (qjax.io.resume) and kills itself with
os._exit right after block `kill_after` is recorded; and resumed from that
log in this process. Prints whether every leaf of the resumed tree equals
the uninterrupted one bit for bit, and how many blocks the resumed run
calibrated.
"""

import os
import pathlib
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

import qjax
from configs import smollm2 as smollm2_config
from experiments import run_lib, tasks
from qjax import qtensor
from qjax.io import resume

if __name__ == "__main__":
  flags.DEFINE_integer("kill_after", 20, "the child dies after this block")
  flags.DEFINE_integer("layers", 0, "first N blocks only (0: all 30)")
  flags.DEFINE_string("child", "", "internal: run as the dying child")


class DyingLog(resume.BlockLog):
  def __init__(self, path, kill_after):
    super().__init__(path)
    self.kill_after = kill_after

  def block_done(self, index, *args):
    super().block_done(index, *args)
    if index == self.kill_after:
      print(f"child: block {index} recorded, dying", flush=True)
      os._exit(3)


def quantize(layers, log=None, walk_wrapper=None):
  config = smollm2_config.get_config()
  config.layers = layers or None
  task = tasks.get("smollm2")
  params = task.load(config)
  walk = task.block_model(params)
  if walk_wrapper is not None:
    walk = walk_wrapper(walk)
  return qjax.quantize(
    params,
    run_lib.recipe_from_config(config),
    calib=(walk, task.calibration_batches(config)),
    calib_precision=config.calib.precision,
    resume=log,
    progress=True,
  )


class Counting:
  """The walk, counting the blocks it calibrates."""

  def __init__(self, walk):
    self.walk, self.calibrated = walk, []

  def __getattr__(self, name):
    return getattr(self.walk, name)

  def hessians(self, name, *args, **kwargs):
    self.calibrated.append(name)
    return self.walk.hessians(name, *args, **kwargs)


def main(argv):
  del argv
  f = flags.FLAGS
  if f.child:
    quantize(f.layers, DyingLog(f.child, f.kill_after))
    raise SystemExit("child: finished without dying")
  start = time.perf_counter()
  whole = quantize(f.layers)
  print(f"uninterrupted: {time.perf_counter() - start:.0f} s", flush=True)
  log = pathlib.Path(tempfile.mkdtemp()) / "resume"
  child = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.resume_check",
      f"--child={log}",
      f"--kill_after={f.kill_after}",
      f"--layers={f.layers}",
    ],
    check=False,
  )
  recorded = len(list(log.glob("block_*")))
  print(f"child exit code {child.returncode}, blocks recorded: {recorded}")
  counting = []

  def wrap(walk):
    counting.append(Counting(walk))
    return counting[0]

  start = time.perf_counter()
  resumed = quantize(f.layers, resume.BlockLog(log), wrap)
  print(
    f"resumed: {time.perf_counter() - start:.0f} s, calibrated "
    f"{len(counting[0].calibrated)} blocks ({counting[0].calibrated[0]} on)"
  )
  a = jax.tree.leaves(whole, is_leaf=qtensor.is_quantized)
  b = jax.tree.leaves(resumed, is_leaf=qtensor.is_quantized)
  same = len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    xs = jax.tree.leaves(x) if qtensor.is_quantized(x) else [x]
    ys = jax.tree.leaves(y) if qtensor.is_quantized(y) else [y]
    same &= all(
      np.array_equal(np.asarray(u), np.asarray(v))
      for u, v in zip(xs, ys, strict=True)
    )
  print(f"resumed == uninterrupted, bit for bit, every leaf: {same}")
  if not same:
    raise SystemExit(1)


if __name__ == "__main__":
  app.run(main)
