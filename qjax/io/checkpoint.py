"""Save and restore quantized trees with orbax.

A checkpoint directory holds
  arrays/partNNNNN/  orbax StandardCheckpointer trees: packed uint8 codes,
              scales, zero points, tensor scales and unquantized leaves,
              split into parts of about `max_part_bytes` so a writer never
              holds more than one part in memory (qjax.convert streams
              through `Writer`).
  qjax.json   the manifest (qjax.io.manifest): the version, the recipe (if
              given), the tree's paths, each leaf's static metadata, each
              array's part, partition spec and a SHA-256 of its global
              value. Zero-size arrays live here only (orbax stores none).
  qjax.sha256 the manifest's own SHA-256.
Everything is written into `<path>.partial` and renamed into place last, so
an interrupted save leaves no directory at `path`. The writer marks the
partial directory as its own (a `WRITER` file: host and pid); a later save
removes a leftover only when it carries that mark and its writer is gone,
and a second writer to the same path while the first runs is an error.
`restore` needs no recipe: it rebuilds leaves from qjax.json, and a missing
file, a changed array or manifest, or a wrong shape is a ValueError naming
the leaf, never wrong numbers.

Multi-process (jax.distributed): every process calls `Writer.add` with the
same global jax.Arrays in the same order; orbax writes each process's shards
and process 0 writes qjax.json and commits. Trees come back as nested dicts
keyed by path component.
"""

import hashlib
import json
import math
import os
import pathlib
import shutil
import socket

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from qjax import qtensor
from qjax.formats import serialize
from qjax.formats.scaling import Scaling
from qjax.io import manifest
from qjax.io.manifest import FORMAT_VERSION, READABLE_VERSIONS
from qjax.paths import path_str
from qjax.version import __version__

__all__ = [
  "FORMAT_VERSION",
  "READABLE_VERSIONS",
  "Writer",
  "iter_leaves",
  "load_metadata",
  "restore",
  "save",
]
DEFAULT_PART_BYTES = 256 << 20
_MARK = "WRITER"
_FIELDS = ("codes", "scale", "zero", "tensor_scale")


def host_value(x) -> np.ndarray:
  """The global value of `x` on this host (gathered across processes when
  `x` is a jax.Array with shards on other processes)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _digest(x) -> str:
  # Hashes the array's own bytes through a uint8 view: tobytes() would copy
  # the whole leaf (a 640 MiB embedding cost 640 MiB more).
  value = np.ascontiguousarray(host_value(x)).reshape(-1)
  return hashlib.sha256(value.view(np.uint8).data).hexdigest()


def _spec(x) -> list | None:
  sharding = getattr(x, "sharding", None)
  if not isinstance(sharding, NamedSharding):
    return None
  return [
    list(a) if isinstance(a, tuple) else a
    for a in tuple(sharding.spec) + (None,) * (np.ndim(x) - len(sharding.spec))
  ]


def _array_meta(x) -> dict:
  return {
    "shape": list(np.shape(x)),
    "dtype": str(np.dtype(x.dtype)),
    "sha256": _digest(x),
    "spec": _spec(x),
  }


def _check_storable(where: str, x) -> None:
  """Refuses, at save time, arrays that would not come back exactly."""
  dtype = np.dtype(x.dtype)
  if dtype.kind not in "biufc" and dtype.name not in (
    "bfloat16",
    "float8_e4m3fn",
    "float8_e5m2",
  ):
    raise ValueError(f"parameter {where!r}: cannot store dtype {dtype}")
  if dtype.itemsize == 8 and not jax.config.jax_enable_x64:
    raise ValueError(
      f"parameter {where!r} is {dtype}: JAX without jax_enable_x64 would "
      "restore it as a 32-bit array, so it would not round trip. Cast it "
      "(e.g. to float32) or enable x64 before saving and restoring"
    )


def _qtensor_arrays(qt) -> dict:
  return {f: getattr(qt, f) for f in _FIELDS if getattr(qt, f) is not None}


def _qtensor_meta(qt) -> dict:
  return {
    "fmt": serialize.format_to_dict(qt.fmt),
    "scaling": qt.scaling.to_dict(),
    "shape": list(qt.shape),
    "dtype": str(np.dtype(qt.dtype)),
  }


def _qtensor_from(meta, got, prefix="") -> qtensor.QTensor:
  leaf = qtensor.QTensor(
    codes=got[prefix + "codes"],
    scale=got[prefix + "scale"],
    zero=got.get(prefix + "zero"),
    tensor_scale=got.get(prefix + "tensor_scale"),
    fmt=serialize.format_from_dict(meta["fmt"]),
    scaling=Scaling.from_dict(meta["scaling"]),
    shape=tuple(meta["shape"]),
    dtype=np.dtype(meta["dtype"]),
  )
  leaf.validate()
  return leaf


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _leaf_entry(p, leaf) -> tuple[dict, dict]:
  """(manifest entry without name/part, {array name: array})."""
  entry = {"path": [path_str([k]) for k in p]}
  if qtensor.is_qtensor(leaf):
    group = _qtensor_arrays(leaf)
    entry.update(kind="qtensor", **_qtensor_meta(leaf))
  elif isinstance(leaf, qtensor.CompositeLeaf):
    # Any registered composite (residual expansion, CP kernel, a user's):
    # QTensor parts store their fields as '<part>_<field>', arrays as-is.
    group, parts = {}, {}
    for name, part in leaf.parts().items():
      if qtensor.is_qtensor(part):
        group.update(
          {f"{name}_{f}": x for f, x in _qtensor_arrays(part).items()}
        )
        parts[name] = _qtensor_meta(part)
      else:
        group[name] = part
        parts[name] = None
    entry.update(kind=leaf.kind, meta=leaf.meta(), parts=parts)
  else:
    group = {"value": leaf}
    entry.update(kind="array")
  for x in group.values():
    _check_storable(path_str(p), x)
  entry["arrays"] = {f: _array_meta(x) for f, x in group.items()}
  # orbax stores no zero-size array; the manifest holds its shape and dtype.
  group = {f: x for f, x in group.items() if math.prod(np.shape(x))}
  return entry, group


class Writer:
  """Writes a checkpoint leaf by leaf; a context manager that commits on
  success and removes its partial directory on any exception.

    with checkpoint.Writer(path, recipe=recipe) as w:
      for p, leaf in leaves:        # p: a jax tree path (tuple of keys)
        w.add(p, leaf)

  Leaves are buffered until about `max_part_bytes` and written as one orbax
  part, so the writer holds at most one part. Multi-process: all processes
  construct the Writer and call `add` identically (collective).

  Raises:
    FileExistsError: `path` exists already.
  """

  def __init__(
    self,
    path,
    *,
    recipe=None,
    extra: dict | None = None,
    max_part_bytes: int = DEFAULT_PART_BYTES,
  ):
    self.path = pathlib.Path(path).absolute()
    if self.path.exists():
      raise FileExistsError(
        f"{self.path} exists; remove it or pick another path"
      )
    # One name all processes agree on without communicating.
    self.tmp = self.path.with_name(self.path.name + ".partial")
    self._owns_tmp = False
    self.recipe = recipe
    self.extra = dict(extra or {})
    self.max_part_bytes = max_part_bytes
    self._entries: list[dict] = []
    self._pending: dict = {}
    self._pending_bytes = 0
    self._parts = 0
    self._checkpointer = None

  def __enter__(self):
    try:
      if jax.process_index() == 0:
        self._claim_tmp()
      _barrier("qjax_writer_start")
      self._checkpointer = ocp.StandardCheckpointer()
    except BaseException:
      self._abort()
      raise
    return self

  def _claim_tmp(self) -> None:
    """Creates the partial directory, replacing only a leftover this writer
    kind made and whose process is gone.

    Raises:
      FileExistsError: the partial directory belongs to a live writer, or
        was not made by a qjax writer.
    """
    if self.tmp.exists():
      owner = _leftover_owner(self.tmp)
      if owner is None:
        raise FileExistsError(
          f"{self.tmp} exists and was not made by a qjax writer; remove it "
          "yourself or pick another path"
        )
      if _alive(owner):
        raise FileExistsError(
          f"{self.tmp} is being written by process {owner['pid']} on "
          f"{owner['host']}; wait for it or pick another path"
        )
      shutil.rmtree(self.tmp)  # an interrupted run's leftover
    self.tmp.parent.mkdir(parents=True, exist_ok=True)
    self.tmp.mkdir()  # raises FileExistsError if another writer just won
    self._owns_tmp = True
    (self.tmp / _MARK).write_text(
      json.dumps({"host": socket.gethostname(), "pid": os.getpid()})
    )
    (self.tmp / "arrays").mkdir()

  def add(self, p, leaf) -> None:
    entry, group = _leaf_entry(p, leaf)
    entry["name"] = f"leaf{len(self._entries):05d}"
    entry["part"] = f"arrays/part{self._parts:05d}"
    self._entries.append(entry)
    if group:
      self._pending[entry["name"]] = group
    self._pending_bytes += sum(x.nbytes for x in group.values())
    if self._pending_bytes >= self.max_part_bytes:
      self._flush()

  def _flush(self) -> None:
    if not self._pending:
      return
    self._checkpointer.save(
      self.tmp / "arrays" / f"part{self._parts:05d}", self._pending
    )
    self._checkpointer.wait_until_finished()
    self._pending, self._pending_bytes = {}, 0
    self._parts += 1

  def commit(self) -> None:
    self._flush()
    self._checkpointer.close()
    _barrier("qjax_writer_arrays_done")
    if jax.process_index() == 0:
      doc = {
        "qjax_version": __version__,
        "format_version": FORMAT_VERSION,
        "recipe": None if self.recipe is None else repr(self.recipe),
        **self.extra,
        "leaves": self._entries,
      }
      manifest.write(self.tmp, doc)
      (self.tmp / _MARK).unlink()
      if self.path.exists():
        raise FileExistsError(
          f"{self.path} appeared while this checkpoint was written (another "
          "writer committed first); this one is not kept"
        )
      os.rename(self.tmp, self.path)  # the commit point
      self._owns_tmp = False
    _barrier("qjax_writer_committed")

  def __exit__(self, kind, value, traceback):
    if kind is None:
      try:
        self.commit()
      except BaseException:
        self._abort()
        raise
      return False
    self._abort()
    return False

  def _abort(self) -> None:
    if self._checkpointer is not None:
      self._checkpointer.close()
    if jax.process_index() == 0 and self._owns_tmp:
      shutil.rmtree(self.tmp, ignore_errors=True)
      self._owns_tmp = False


def _leftover_owner(tmp: pathlib.Path) -> dict | None:
  try:
    owner = json.loads((tmp / _MARK).read_text())
  except (OSError, ValueError):
    return None
  if not isinstance(owner, dict) or not {"host", "pid"} <= set(owner):
    return None
  return owner


def _alive(owner: dict) -> bool:
  """Whether the marked writer may still run: a live pid on this host, or
  any writer on another host (qjax cannot see it)."""
  if owner["host"] != socket.gethostname():
    return True
  try:
    os.kill(int(owner["pid"]), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, ValueError, TypeError, OverflowError):
    return True
  return True


def save(
  path, qtree, *, recipe=None, max_part_bytes: int = DEFAULT_PART_BYTES
) -> None:
  """Writes `qtree` (QTensor, composite and array leaves) to the directory
  `path` (see `Writer`).

  Raises:
    FileExistsError: `path` exists already.
  """
  leaves = jax.tree_util.tree_leaves_with_path(
    qtree, is_leaf=qtensor.is_quantized
  )
  with Writer(path, recipe=recipe, max_part_bytes=max_part_bytes) as w:
    for p, leaf in leaves:
      w.add(p, leaf)


def load_metadata(path) -> dict:
  """The checkpoint's verified manifest (qjax.io.manifest.read)."""
  return manifest.read(path)


def _sharding(a: dict, mesh) -> jax.sharding.Sharding:
  """The saved partition spec on `mesh`, keeping only the axes that exist
  there and divide the dimension; replicated on one local device without a
  mesh."""
  if mesh is None:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  spec = list(a.get("spec") or [])
  spec += [None] * (len(a["shape"]) - len(spec))
  axes = []
  for dim, entry in zip(a["shape"], spec, strict=True):
    names = (
      [] if entry is None else [entry] if isinstance(entry, str) else entry
    )
    size = math.prod(mesh.shape.get(n, 0) for n in names)
    fits = names and all(n in mesh.shape for n in names) and dim % size == 0
    axes.append(
      (names[0] if len(names) == 1 else tuple(names)) if fits else None
    )
  return NamedSharding(mesh, PartitionSpec(*axes))


def _legacy_composite(e: dict) -> dict:
  """A format-2 'expansion' / 'cp' entry in the format-3 form."""
  if e["kind"] == "expansion":
    parts = {}
    for k, t in enumerate(e["terms"]):
      parts[f"t{k}"] = t
      if f"t{k}_keep" in e["arrays"]:
        parts[f"t{k}_keep"] = None
    meta = {"shape": e["shape"], "dtype": e["dtype"], "order": len(e["terms"])}
  else:
    parts = {
      (f"f{k}" if m is not None else f"f{k}_value"): m
      for k, m in enumerate(e["factors"])
    }
    meta = {"shape": e["shape"], "dtype": e["dtype"], "factors": len(parts)}
  return {**e, "meta": meta, "parts": parts}


def _build_leaf(e: dict, got: dict):
  if e["kind"] == "qtensor":
    return _qtensor_from(e, got)
  if e["kind"] == "array":
    return got["value"]
  if "parts" not in e and e["kind"] in ("expansion", "cp"):
    e = _legacy_composite(e)
  cls = qtensor.composite_class(e["kind"])
  parts = {
    name: got[name] if meta is None else _qtensor_from(meta, got, f"{name}_")
    for name, meta in e["parts"].items()
  }
  return cls.from_parts(e["meta"], parts)


def iter_leaves(path, *, mesh=None, shardings=None, verify: bool = True):
  """Yields (path components, leaf) part by part, holding one part at a
  time (what `restore` and qjax.convert's dequantize use).

  Args:
    path: a checkpoint directory written by `save` or `Writer`.
    mesh: restore each array with the partition spec it was saved with,
      restricted to the axes `mesh` has and that divide the dimension
      (others replicated). Default: one local device.
    shardings: callable (leaf path str, array name, shape) -> Sharding,
      overriding `mesh`.
    verify: compare every array with its SHA-256 (gathers sharded arrays
      one at a time).

  Raises:
    ValueError: the checkpoint is incomplete, truncated or edited (names the
      leaf and array).
  """
  path = pathlib.Path(path).absolute()
  doc = load_metadata(path)
  parts: dict[str, list] = {}
  for e in doc["leaves"]:
    parts.setdefault(e.get("part", "arrays"), []).append(e)
  checkpointer = ocp.StandardCheckpointer()
  for part, entries in parts.items():
    target, empty = {}, {}
    for e in entries:
      where = "/".join(e["path"])
      for f, a in e["arrays"].items():
        sharding = (
          shardings(where, f, tuple(a["shape"]))
          if shardings is not None
          else _sharding(a, mesh)
        )
        spec = jax.ShapeDtypeStruct(
          tuple(a["shape"]), np.dtype(a["dtype"]), sharding=sharding
        )
        if math.prod(a["shape"]):
          target.setdefault(e["name"], {})[f] = spec
        else:  # zero-size: nothing on disk
          empty.setdefault(e["name"], {})[f] = jax.device_put(
            np.zeros(spec.shape, spec.dtype), sharding
          )
    arrays = {}
    if target:
      try:
        arrays = checkpointer.restore(path / part, target)
      except Exception as e:  # orbax raises many types for damaged files
        names = ", ".join(repr("/".join(x["path"])) for x in entries[:3])
        raise ValueError(
          f"{path}: cannot read {part} (leaves {names}...): "
          f"{type(e).__name__}: {e}"
        ) from e
    for e in entries:
      where = "/".join(e["path"])
      got = {**arrays.get(e["name"], {}), **empty.get(e["name"], {})}
      for f, a in e["arrays"].items():
        x = got[f]
        if list(np.shape(x)) != a["shape"] or (
          verify and _digest(x) != a["sha256"]
        ):
          raise ValueError(
            f"{path}: leaf {where!r} array {f!r} does not match "
            "its checksum: the checkpoint is corrupt"
          )
      yield e["path"], _build_leaf(e, got)


def restore(path, *, mesh=None, shardings=None, verify: bool = True):
  """Reads a checkpoint written by `save`; returns nested dicts of leaves.

  Args: as `iter_leaves`.

  Raises:
    ValueError: the checkpoint is incomplete, truncated or edited (names the
      leaf and array).
  """
  tree = {}
  for keys, leaf in iter_leaves(
    path, mesh=mesh, shardings=shardings, verify=verify
  ):
    node = tree
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = leaf
  return tree
