"""Resumable calibrated runs: a directory that records every finished block.

  log = qjax.io.resume.BlockLog("workdir/resume")
  qparams = qjax.quantize(params, recipe, calib=(model, batches), resume=log)

GPTQ's sequential mode (qjax.calibration.quantize_sequential, also under a
streamed conversion, qjax.io.convert.convert_calibrated) and the two-stream
driver of ED and GPFQ (qjax.calibration.quantize_two_stream, which records
both streams' outputs) hand the log each block as soon as it is quantized,
with the outputs the quantized block gives (the next block's inputs) and
the rules matched so far. A run killed
after block k and started again with the same log reads blocks 0..k back and
goes on at block k + 1 from the saved outputs, so its codes are those of an
uninterrupted run bit for bit (the outputs are stored exactly, in their own
dtype, and the stream of dequantized blocks is rebuilt from the stored
codes).

Layout: `fingerprint.txt` (what run the directory belongs to: the recipe,
the blocks, the calibration batches and precision; a different run is an
error, never a silent mix), then one `block_00007/` per finished block,
written as `.block_00007.tmp/` and renamed when complete, so a block cut
off halfway is not read back:

  name.txt       the block's name in the tree
  qblock/        its quantized tree (qjax.io.checkpoint, verified on read)
  outputs.npz    the quantized block's outputs, one array per leaf, as
                 raw bytes (exact for any dtype)
  outputs.json   their dtypes and shapes
  outputs.tree   their tree structure (pickled jax treedef)
  used.json      the indices of the rules matched so far
  layers.json    the block's records of qjax.quantize(..., layer_log=[]):
                 a resumed run's log holds every block's, the recorded
                 ones (times from the first process) first

Only the last block keeps its outputs (earlier ones are deleted: the
outputs of a 16-window SmolLM2 calibration set are 38 MB per block).
"""

import collections.abc
import json
import os
import pathlib
import pickle
import shutil

import jax
import numpy as np

from qjax import dispatch
from qjax.io import checkpoint


def _block_dir(index: int) -> str:
  return f"block_{index:05d}"


class BlockLog:
  """The directory of one resumable run (see the module docstring)."""

  def __init__(self, path):
    self.path = pathlib.Path(path)
    self._logged = 0  # layer_log records already written to a block

  def start(self, fingerprint: str, names) -> tuple | None:
    """(last finished index, {name: quantized block} (RecordedBlocks: each
    block is read from disk when it is accessed), its outputs, rules used)
    when the directory holds blocks of this run, or None for a fresh start
    (the directory is created and stamped).

    Raises:
      ValueError: the directory belongs to another run, or its blocks are
        not the run's first blocks in order.
    """
    stamp = self.path / "fingerprint.txt"
    if not stamp.exists():
      if self.path.exists() and any(self.path.iterdir()):
        raise ValueError(
          f"resume directory {str(self.path)!r} is not empty and has no "
          "fingerprint.txt; give an empty or new directory"
        )
      self.path.mkdir(parents=True, exist_ok=True)
      stamp.write_text(fingerprint)
      return None
    if stamp.read_text() != fingerprint:
      raise ValueError(
        f"resume directory {str(self.path)!r} belongs to another run (its "
        "recipe, blocks, calibration batches or precision differ); give a "
        "new directory or delete it"
      )
    finished = sorted(p for p in self.path.glob("block_*") if p.is_dir())
    if not finished:
      return None
    done = RecordedBlocks()
    records = dispatch.current_layer_log()
    for index, d in enumerate(finished):
      name = (d / "name.txt").read_text()
      if d.name != _block_dir(index) or index >= len(names):
        raise ValueError(f"resume directory: unexpected block {d.name!r}")
      if name != names[index]:
        raise ValueError(
          f"resume directory: {d.name} holds block {name!r}, the run's "
          f"block {index} is {names[index]!r}"
        )
      done.dirs[name] = d / "qblock"
      if records is not None and (d / "layers.json").exists():
        records.extend(json.loads((d / "layers.json").read_text()))
    self._logged = 0 if records is None else len(records)
    last = finished[-1]
    leaves = _load_arrays(last)
    treedef = pickle.loads((last / "outputs.tree").read_bytes())
    outputs = jax.tree_util.tree_unflatten(treedef, leaves)
    used = set(json.loads((last / "used.json").read_text()))
    return len(finished) - 1, done, outputs, used

  def block_done(self, index: int, name: str, qblock, outputs, used) -> None:
    """Records block `index` (atomically: a temporary directory renamed)."""
    final = self.path / _block_dir(index)
    tmp = self.path / f".{_block_dir(index)}.tmp"
    if tmp.exists():
      shutil.rmtree(tmp)
    tmp.mkdir()
    (tmp / "name.txt").write_text(name)
    checkpoint.save(tmp / "qblock", {"block": qblock})
    leaves, treedef = jax.tree_util.tree_flatten(outputs)
    _save_arrays(tmp, [np.asarray(x) for x in leaves])
    (tmp / "outputs.tree").write_bytes(pickle.dumps(treedef))
    (tmp / "used.json").write_text(json.dumps(sorted(used)))
    records = dispatch.current_layer_log()
    if records is not None:
      (tmp / "layers.json").write_text(json.dumps(records[self._logged :]))
    os.replace(tmp, final)
    if records is not None:
      self._logged = len(records)
    if index:  # only the last block's outputs are ever read back
      previous = self.path / _block_dir(index - 1)
      for f in ("outputs.npz", "outputs.tree", "outputs.json"):
        (previous / f).unlink(missing_ok=True)


class RecordedBlocks(collections.abc.Mapping):
  """{name: quantized block} of the recorded blocks, in order; a block is
  restored (and verified) from its directory each time it is accessed, so
  a streamed conversion holds one at a time."""

  def __init__(self):
    self.dirs = {}

  def __getitem__(self, name):
    return checkpoint.restore(self.dirs[name])["block"]

  def __iter__(self):
    return iter(self.dirs)

  def __len__(self):
    return len(self.dirs)


def _save_arrays(d, arrays) -> None:
  """Raw bytes plus dtype names and shapes: exact for any dtype, bfloat16
  and the other ml_dtypes types included."""
  np.savez(
    d / "outputs.npz",
    **{
      f"a{i}": np.ascontiguousarray(a).view(np.uint8)
      for i, a in enumerate(arrays)
    },
  )
  meta = [{"dtype": a.dtype.name, "shape": list(a.shape)} for a in arrays]
  (d / "outputs.json").write_text(json.dumps(meta))


def _load_arrays(d) -> list:
  meta = json.loads((d / "outputs.json").read_text())
  out = []
  with np.load(d / "outputs.npz") as z:
    for i, m in enumerate(meta):
      raw = z[f"a{i}"]
      dtype = np.dtype(jax.numpy.dtype(m["dtype"]))
      out.append(raw.view(dtype).reshape(m["shape"]))
  return out
