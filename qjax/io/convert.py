"""Checkpoint conversion: a float source in, a quantized checkpoint out,
streamed leaf by leaf and sharded across devices and processes.

  summary = convert(sources.open_source(path), recipe, out)
  dequantize_checkpoint(out, float_out)      # the inverse, for other tools

Each leaf is read as a global jax.Array sharded over a 1-D mesh of every
device (each process reads only its own shards), quantized where it lives
(qjax.dispatch.quantize_leaf, the function every qjax.quantize driver
applies), and
handed to checkpoint.Writer, which flushes a part to orbax every
`max_part_bytes`. Host memory therefore holds one float leaf, its quantized
form and one unwritten part, not the model. Under jax.distributed every
process runs the same calls in the same order (they are collective), and the
result equals a single-process conversion bit for bit: quantization is
elementwise per block, so sharding does not change a value.

Calibrated recipes (GPTQ, MagR) go through `convert_calibrated`: GPTQ's
sequential mode reads one block at a time from the source
(qjax.calibration.quantize_sequential over a lazy mapping) and hands each
quantized block to the writer, so host memory holds the leaves outside the
blocks, one block and the calibration activations. It runs in one process.
ED/GPFQ (two activation streams) are not streamed: use qjax.quantize(calib=)
and checkpoint.save.
"""

import collections.abc
import ctypes
import math
import resource
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from qjax import calibration, dispatch, qtensor
from qjax.io import checkpoint
from qjax.paths import path_str
from qjax.recipe import Recipe


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


def _return_freed_memory() -> None:
  """Hands memory freed by the last leaf back to the OS (glibc only).

  glibc keeps freed heap pages in its arenas; after a large leaf and its
  orbax write, those pages stayed resident and every later leaf added to
  them (measured on SmolLM2, 30 blocks: 325 MiB above the JAX baseline
  without this, 263 MiB with it)."""
  if _LIBC is not None:
    _LIBC.malloc_trim(0)


def _load_libc():
  try:
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc_trim  # noqa: B018 (absent outside glibc)
    return libc
  except (OSError, AttributeError):
    return None


_LIBC = _load_libc()


def peak_rss_bytes() -> int:
  """This process's peak resident memory so far (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@jax.jit
def _sqnr_terms(w, q):
  # Dequantized inside one jitted function: eagerly, every primitive of the
  # decode compiled its own executable per leaf shape, which held ~100 MiB
  # of host memory per new shape during conversion.
  w = w.astype(jnp.float32)
  approx = q.dequantize(jnp.float32)
  return jnp.sum(w * w), jnp.sum((w - approx) ** 2)


def _sqnr_db(w, q) -> float:
  signal, noise = (float(x) for x in _sqnr_terms(w, q))
  return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def _refuse(recipe: Recipe, statistics, what: str) -> None:
  needs = sorted(
    {r.method_name for r in recipe.rules if r.needs & set(statistics)}
  )
  if needs:
    raise ValueError(f"recipe methods {needs} {what}")


def _row(spec, w, leaf, index) -> dict:
  float_bytes = math.prod(spec.shape) * np.dtype(spec.dtype).itemsize
  row = {
    "shape": list(spec.shape),
    "float_bytes": float_bytes,
    "bytes": float_bytes,
    "bits_per_weight": 8 * np.dtype(spec.dtype).itemsize,
    "rule": index,
  }
  if qtensor.is_quantized(leaf):
    row.update(
      bytes=leaf.nbytes,
      bits_per_weight=leaf.bits_per_weight,
      sqnr_db=_sqnr_db(w, leaf),
    )
  return row


def _plan(source, recipe, allow_unquantized, max_part_bytes):
  """(the source's specs, the part size), after checking, before anything
  is written, that the recipe quantizes some leaf."""
  specs = source.specs()
  if not allow_unquantized:
    leaves = (
      (path, len(s.shape), math.prod(s.shape)) for path, s in specs.items()
    )
    dispatch.require_a_match(recipe, leaves, f"convert {source.file}")
  if max_part_bytes is None:
    max_part_bytes = min(_largest_leaf(specs), _PART_CAP)
  return specs, max_part_bytes


def plan_report(source, recipe: Recipe, sample: int = 3) -> str:
  """What a conversion will do, before it starts: per fate (a rule, or a
  reason to leave the leaf as it is) the number of leaves, their float
  bytes and a few of their paths."""
  fates = {}
  for path, s in source.specs().items():
    index, reason = recipe.match(path, len(s.shape), math.prod(s.shape))
    nbytes = math.prod(s.shape) * np.dtype(s.dtype).itemsize
    count, total, paths = fates.get(reason, (0, 0, []))
    fates[reason] = (count + 1, total + nbytes, paths + [path])
  lines = [f"plan for {source.file}:"]
  for reason, (count, total, paths) in sorted(
    fates.items(), key=lambda kv: -kv[1][1]
  ):
    shown = ", ".join(paths[:sample]) + (", ..." if count > sample else "")
    lines.append(
      f"  {count:5d} leaves {total / 2**20:10.1f} MiB  {reason}: {shown}"
    )
  return "\n".join(lines)


# The default part size is at most this: pending quantized leaves are held
# until their part is flushed, and on a model whose largest leaf is small
# (SmolLM2's is 108 MiB) a part that large was a third of the peak.
_PART_CAP = 32 << 20


def _largest_leaf(specs) -> int:
  return max(
    math.prod(s.shape) * np.dtype(s.dtype).itemsize for s in specs.values()
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
  allow_unquantized: bool = False,
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
      default the largest float leaf's bytes or 32 MiB, whichever is
      smaller, so the buffer never holds more than about two leaves.
    progress: a progress bar (on process 0).
    allow_unquantized: write the checkpoint even when no leaf matches a
      quantizing rule (otherwise an error before anything is written).

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
  _refuse(
    recipe,
    ("hessian", "last_sample", "two_stream"),
    "need calibration activations; convert streams data-free recipes (rtn, "
    "pipe, skip): use convert_calibrated for gptq/magr",
  )
  mesh = default_mesh() if mesh is None else mesh
  devices = mesh.shape["x"]
  specs, max_part_bytes = _plan(
    source, recipe, allow_unquantized, max_part_bytes
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
      leaf, index = dispatch.quantize_leaf(path, w, recipe, key=leaf_key)
      if index is not None:
        used.add(index)
      rows[path] = _row(spec, w, leaf, index)
      writer.add(tuple(path.split("/")), leaf)
      del w, leaf
      _return_freed_memory()
    summary = _record(writer, source, rows)
  unused = recipe.unused(used)
  if unused:
    warnings.warn(
      f"recipe rules matched no parameter: {', '.join(unused)}", stacklevel=2
    )
  summary["peak_rss_bytes"] = peak_rss_bytes()
  return summary


def _record(writer, source, rows) -> dict:
  summary = _summary(rows)
  writer.extra["conversion"] = {
    "source": str(source.file),
    "processes": jax.process_count(),
    "devices": jax.device_count(),
    **{k: v for k, v in summary.items() if k != "leaves"},
  }
  return summary


class LazyParams(collections.abc.Mapping):
  """A source's leaves as a Mapping of top-level names: `params[name]` reads
  that subtree from disk (single device) each time it is accessed."""

  def __init__(self, source):
    self.source = source
    self._tops = list(dict.fromkeys(p.split("/")[0] for p in source.specs()))

  def __iter__(self):
    return iter(self._tops)

  def __len__(self):
    return len(self._tops)

  def __getitem__(self, name):
    if name not in self._tops:
      raise KeyError(name)
    tree = {}
    for path in self.source.specs():
      keys = path.split("/")
      if keys[0] != name:
        continue
      if len(keys) == 1:
        return self.source.read(path)
      node = tree
      for k in keys[1:-1]:
        node = node.setdefault(k, {})
      node[keys[-1]] = self.source.read(path)
    return tree


def convert_calibrated(
  source,
  recipe: Recipe,
  out,
  block_model,
  batches,
  *,
  key: jax.Array | None = None,
  max_part_bytes: int | None = None,
  progress: bool = True,
  allow_unquantized: bool = False,
  resume=None,
) -> dict:
  """`convert` for calibrated recipes (gptq, magr+rtn, magr+gptq), block by
  block: equal to qjax.quantize(params, recipe, calib=(block_model,
  batches)) leaf for leaf, reading one block of the source at a time.

  Args:
    block_model: qjax.calibration.BlockModel of the source's model (e.g.
      qjax.models.smollm2.block_model).
    batches: calibration batches for it.
    resume: a qjax.io.resume.BlockLog. A killed conversion leaves no
      checkpoint at `out` (it is written under a temporary name) but the
      log of its finished blocks; run again with the same log, it writes
      those blocks from the log (one at a time) and calibrates only the
      rest, and the checkpoint equals an uninterrupted conversion's leaf
      for leaf. The caller deletes the log when it is no longer wanted.
    Others: as `convert`.

  Raises:
    ValueError: under several processes (GPTQ's Hessians are per layer on
      one host), or an ED/GPFQ recipe.
  """
  if jax.process_count() > 1:
    raise ValueError(
      "calibrated conversion runs in one process; data-free recipes "
      "(convert) run under jax.distributed"
    )
  _refuse(
    recipe,
    ("two_stream",),
    "need both activation streams and are not streamed: use "
    "qjax.quantize(params, recipe, calib=...) and qjax.checkpoint.save",
  )
  specs, max_part_bytes = _plan(
    source, recipe, allow_unquantized, max_part_bytes
  )
  rows = {}
  with checkpoint.Writer(
    out, recipe=recipe, max_part_bytes=max_part_bytes
  ) as writer:

    def emit(name, tree, float_tree):
      leaves = jax.tree_util.tree_leaves_with_path(
        {name: tree}, is_leaf=qtensor.is_quantized
      )
      floats = jax.tree_util.tree_leaves({name: float_tree})
      for (p, leaf), w in zip(leaves, floats, strict=True):
        path = path_str(p)
        index, _ = recipe.match(path, len(specs[path].shape))
        rows[path] = _row(specs[path], w, leaf, index)
        writer.add(p, leaf)
      _return_freed_memory()

    calibration.quantize_sequential(
      LazyParams(source),
      recipe,
      block_model,
      batches,
      key=key,
      progress=progress,
      emit=emit,
      resume=resume,
    )
    summary = _record(writer, source, rows)
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
  from qjax.io import sources

  # Global arrays on every device, so that orbax's collective save works
  # the same under one process or several.
  mesh = default_mesh() if mesh is None else mesh
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
