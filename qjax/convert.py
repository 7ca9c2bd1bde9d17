"""Checkpoint conversion: a float source in, a quantized checkpoint out,
streamed leaf by leaf and sharded across devices and processes.

  summary = convert(sources.open_source(path), recipe, out)
  dequantize_checkpoint(out, float_out)      # the inverse, for other tools

Each leaf is read as a global jax.Array sharded over a 1-D mesh of every
device (each process reads only its own shards), quantized where it lives
(qjax.api.quantize_leaf, the same function qjax.quantize applies), and
handed to checkpoint.Writer, which flushes a part to orbax every
`max_part_bytes`. Host memory therefore holds one float leaf, its quantized
form and one unwritten part, not the model. Under jax.distributed every
process runs the same calls in the same order (they are collective), and the
result equals a single-process conversion bit for bit: quantization is
elementwise per block, so sharding does not change a value.

Calibrated recipes (GPTQ, MagR, ED) need activations from the whole model
and are refused here; run them with qjax.quantize(calib=...) and
checkpoint.save.
"""

import math
import resource
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from qjax import api, checkpoint, qtensor
from qjax.recipe import CALIBRATED, TWO_STREAM, Recipe


def default_spec(shape: tuple[int, ...], devices: int) -> PartitionSpec:
  """Shard the last axis (a kernel's output channels, so scale blocks along
  the input axis stay whole on one device) when `devices` divides it, else
  the first, else replicate."""
  for axis in (len(shape) - 1, 0):
    if shape and shape[axis] % devices == 0 and shape[axis] >= devices:
      spec = [None] * len(shape)
      spec[axis] = "x"
      return PartitionSpec(*spec)
  return PartitionSpec()


def default_mesh() -> jax.sharding.Mesh:
  """Every device of every process on one axis 'x'."""
  return jax.make_mesh(
    (jax.device_count(),), ("x",), axis_types=(AxisType.Auto,)
  )


def peak_rss_bytes() -> int:
  """This process's peak resident memory so far (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@jax.jit
def _sqnr_terms(w, approx):
  w = w.astype(jnp.float32)
  return jnp.sum(w * w), jnp.sum((w - approx.astype(jnp.float32)) ** 2)


def _sqnr_db(w, q) -> float:
  signal, noise = (float(x) for x in _sqnr_terms(w, q.dequantize(jnp.float32)))
  return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def _refuse_calibrated(recipe: Recipe) -> None:
  needs = [
    r.method for r in recipe.rules if r.method in CALIBRATED + TWO_STREAM
  ]
  if needs:
    raise ValueError(
      f"recipe methods {sorted(set(needs))} need calibration activations; "
      "convert streams data-free recipes (rtn, pipe, skip). Quantize with "
      "qjax.quantize(params, recipe, calib=...) and write with "
      "qjax.checkpoint.save instead"
    )


def convert(
  source,
  recipe: Recipe,
  out,
  *,
  mesh=None,
  spec_fn=default_spec,
  key: jax.Array | None = None,
  max_part_bytes: int | None = None,
  progress: bool = True,
) -> dict:
  """Quantizes every leaf of `source` with `recipe` into the checkpoint
  `out` (see qjax.checkpoint), one leaf at a time.

  Args:
    source: a qjax.sources.Source.
    recipe: data-free rules (rtn, pipe, skip).
    out: the output directory; must not exist (a leftover `<out>.partial`
      of an interrupted run is removed and the conversion restarts).
    mesh: a Mesh with axis 'x'; default every device (default_mesh).
    spec_fn: (shape, number of devices on 'x') -> PartitionSpec per leaf.
    key: for stochastic-rounding rules; leaf i gets fold_in(key, i).
    max_part_bytes: flush an orbax part after this many buffered bytes;
      default the largest float leaf's bytes, so the buffer never holds
      more than about two leaves.
    progress: a progress bar (on process 0).

  Returns:
    A summary: per leaf {shape, bytes before/after, bits_per_weight,
    sqnr_db, rule}, the totals, the largest leaf and this process's peak
    resident memory. The same summary is stored in the checkpoint's
    qjax.json under "conversion".

  Raises:
    ValueError: a calibrated recipe; NaN/Inf weights or blocks that do not
      divide (naming the parameter); a damaged source (naming the file and
      leaf).
  """
  _refuse_calibrated(recipe)
  mesh = default_mesh() if mesh is None else mesh
  devices = mesh.shape["x"]
  specs = source.specs()
  if max_part_bytes is None:
    max_part_bytes = max(
      math.prod(s.shape) * np.dtype(s.dtype).itemsize for s in specs.values()
    )
  rows, used = {}, set()
  with checkpoint.Writer(
    out, recipe=recipe, max_part_bytes=max_part_bytes
  ) as writer:
    bar = tqdm(
      list(specs.items()),
      desc="convert",
      disable=not progress or jax.process_index() != 0,
    )
    for i, (path, spec) in enumerate(bar):
      sharding = NamedSharding(mesh, spec_fn(spec.shape, devices))
      w = source.read(path, sharding)
      leaf_key = None if key is None else jax.random.fold_in(key, i)
      leaf, index = api.quantize_leaf(path, w, recipe, key=leaf_key)
      float_bytes = math.prod(spec.shape) * np.dtype(spec.dtype).itemsize
      row = {
        "shape": list(spec.shape),
        "float_bytes": float_bytes,
        "bytes": float_bytes,
        "bits_per_weight": 8 * np.dtype(spec.dtype).itemsize,
        "rule": None if index is None else index,
      }
      if index is not None:
        used.add(index)
      if qtensor.is_quantized(leaf):
        row.update(
          bytes=leaf.nbytes,
          bits_per_weight=leaf.bits_per_weight,
          sqnr_db=_sqnr_db(w, leaf),
        )
      rows[path] = row
      writer.add(tuple(path.split("/")), leaf)
      del w, leaf
    summary = _summary(rows)
    writer.extra["conversion"] = {
      "source": str(source.file),
      "processes": jax.process_count(),
      "devices": jax.device_count(),
      **{k: v for k, v in summary.items() if k != "leaves"},
    }
  unused = [
    f"{i}: {r.pattern!r}"
    for i, r in enumerate(recipe.rules)
    if i not in used and r.method != "skip"
  ]
  if unused:
    warnings.warn(
      f"recipe rules matched no parameter: {', '.join(unused)}", stacklevel=2
    )
  summary["peak_rss_bytes"] = peak_rss_bytes()
  return summary


def _summary(rows: dict) -> dict:
  float_bytes = sum(r["float_bytes"] for r in rows.values())
  q_bytes = sum(r["bytes"] for r in rows.values())
  quantized = [r for r in rows.values() if "sqnr_db" in r]
  n_quantized = sum(math.prod(r["shape"]) for r in quantized)
  return {
    "leaves": rows,
    "float_bytes": float_bytes,
    "bytes": q_bytes,
    "quantized_leaves": len(quantized),
    "bits_per_quantized_weight": (
      8 * sum(r["bytes"] for r in quantized) / n_quantized
      if n_quantized
      else None
    ),
    "largest_leaf_bytes": max(r["float_bytes"] for r in rows.values()),
    "peak_rss_bytes": peak_rss_bytes(),
  }


def dequantize_checkpoint(src, out, *, dtype=None, mesh=None) -> dict:
  """Writes the float tree of the quantized checkpoint `src` as a plain
  orbax checkpoint at `out` (readable by qjax.sources.OrbaxSource and any
  orbax user). The float tree is assembled in memory (orbax writes one
  tree); orbax's commit protocol makes the write atomic.

  Returns {leaf path: dtype} of what was written.
  """
  from qjax import sources

  tree, dtypes = {}, {}
  for keys, leaf in checkpoint.iter_leaves(src, mesh=mesh):
    if qtensor.is_quantized(leaf):
      leaf = leaf.dequantize(dtype)
    node = tree
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = leaf
    dtypes["/".join(keys)] = str(leaf.dtype)
  sources.save_float(out, tree)
  return dtypes
