"""Save and restore quantized trees with orbax.

A checkpoint directory holds
  arrays/     an orbax StandardCheckpointer tree: packed uint8 codes, scales,
              zero points, tensor scales and unquantized leaves.
  qjax.json   the version, the recipe (if given), the tree's paths, each
              QTensor's static metadata and a SHA-256 of every array.
Both are written into `<path>.partial-*` and renamed into place last, so an
interrupted save leaves no directory at `path`. `restore` needs no recipe: it
rebuilds QTensors from qjax.json, and a missing file, a changed array or a
wrong shape is a ValueError naming the leaf, never wrong numbers.
Trees come back as nested dicts keyed by path component.
"""

import hashlib
import json
import os
import pathlib
import shutil
import uuid

import jax
import numpy as np
import orbax.checkpoint as ocp

from qjax import __version__, api, qtensor
from qjax.formats import serialize
from qjax.formats.scaling import Scaling

FORMAT_VERSION = 1
_FIELDS = ("codes", "scale", "zero", "tensor_scale")


def _digest(x) -> str:
  return hashlib.sha256(
    np.ascontiguousarray(np.asarray(x)).tobytes()
  ).hexdigest()


def _array_meta(x) -> dict:
  return {
    "shape": list(np.shape(x)),
    "dtype": str(np.dtype(x.dtype)),
    "sha256": _digest(x),
  }


def save(path, qtree, *, recipe=None) -> None:
  """Writes `qtree` (QTensor and array leaves) to the directory `path`.

  Raises:
    FileExistsError: `path` exists already.
  """
  path = pathlib.Path(path).absolute()
  if path.exists():
    raise FileExistsError(f"{path} exists; remove it or pick another path")
  leaves = jax.tree_util.tree_leaves_with_path(
    qtree, is_leaf=qtensor.is_quantized
  )
  arrays, meta = {}, []
  for i, (p, leaf) in enumerate(leaves):
    if isinstance(leaf, qtensor.CompositeLeaf):
      raise ValueError(
        f"parameter {api.path_str(p)!r}: saving {type(leaf).__name__} "
        "leaves is not supported yet; save qjax.dequantize(tree) or its "
        "QTensor leaves"
      )
    name = f"leaf{i:05d}"
    entry = {"path": [api.path_str([k]) for k in p], "name": name}
    if qtensor.is_qtensor(leaf):
      group = {
        f: getattr(leaf, f) for f in _FIELDS if getattr(leaf, f) is not None
      }
      entry.update(
        kind="qtensor",
        fmt=serialize.format_to_dict(leaf.fmt),
        scaling=leaf.scaling.to_dict(),
        shape=list(leaf.shape),
        dtype=str(np.dtype(leaf.dtype)),
        arrays={f: _array_meta(x) for f, x in group.items()},
      )
      arrays[name] = group
    else:
      entry.update(kind="array", arrays={"value": _array_meta(leaf)})
      arrays[name] = {"value": leaf}
    meta.append(entry)
  tmp = path.with_name(f"{path.name}.partial-{uuid.uuid4().hex[:8]}")
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(tmp / "arrays", arrays)
      checkpointer.wait_until_finished()
    doc = {
      "qjax_version": __version__,
      "format_version": FORMAT_VERSION,
      "recipe": None if recipe is None else repr(recipe),
      "leaves": meta,
    }
    _write_manifest(tmp, doc)
    os.rename(tmp, path)  # the commit point
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _write_manifest(directory: pathlib.Path, doc: dict) -> None:
  (directory / "qjax.json").write_text(json.dumps(doc, indent=1))


def load_metadata(path) -> dict:
  path = pathlib.Path(path)
  meta_file = path / "qjax.json"
  if not meta_file.exists():
    raise ValueError(f"{path} is not a complete qjax checkpoint: no qjax.json")
  try:
    doc = json.loads(meta_file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{meta_file} is corrupt: {e}") from e
  if doc.get("format_version") != FORMAT_VERSION:
    raise ValueError(
      f"{path}: checkpoint format {doc.get('format_version')} is not "
      f"{FORMAT_VERSION} (written by qjax {doc.get('qjax_version')})"
    )
  return doc


def restore(path):
  """Reads a checkpoint written by `save`; returns nested dicts of leaves.

  Raises:
    ValueError: the checkpoint is incomplete, truncated or edited (names the
      leaf and array).
  """
  path = pathlib.Path(path).absolute()
  doc = load_metadata(path)
  target = {
    e["name"]: {
      f: jax.ShapeDtypeStruct(tuple(a["shape"]), np.dtype(a["dtype"]))
      for f, a in e["arrays"].items()
    }
    for e in doc["leaves"]
  }
  try:
    arrays = ocp.StandardCheckpointer().restore(path / "arrays", target)
  except Exception as e:  # orbax raises many types for damaged files
    raise ValueError(
      f"{path}: cannot read the arrays ({type(e).__name__}: {e})"
    ) from e
  tree = {}
  for e in doc["leaves"]:
    where = "/".join(e["path"])
    got = arrays[e["name"]]
    for f, a in e["arrays"].items():
      x = got[f]
      if list(np.shape(x)) != a["shape"] or _digest(x) != a["sha256"]:
        raise ValueError(
          f"{path}: leaf {where!r} array {f!r} does not match "
          "its checksum: the checkpoint is corrupt"
        )
    if e["kind"] == "qtensor":
      leaf = qtensor.QTensor(
        codes=got["codes"],
        scale=got["scale"],
        zero=got.get("zero"),
        tensor_scale=got.get("tensor_scale"),
        fmt=serialize.format_from_dict(e["fmt"]),
        scaling=Scaling.from_dict(e["scaling"]),
        shape=tuple(e["shape"]),
        dtype=np.dtype(e["dtype"]),
      )
      leaf.validate()
    else:
      leaf = got["value"]
    node = tree
    for k in e["path"][:-1]:
      node = node.setdefault(k, {})
    node[e["path"][-1]] = leaf
  return tree
