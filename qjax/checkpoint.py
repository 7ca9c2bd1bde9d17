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
from qjax.transforms import residual

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


def save(path, qtree, *, recipe=None) -> None:
  """Writes `qtree` (QTensor, residual Expansion and array leaves) to the
  directory `path`.

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
    name = f"leaf{i:05d}"
    entry = {"path": [api.path_str([k]) for k in p], "name": name}
    if qtensor.is_qtensor(leaf):
      group = _qtensor_arrays(leaf)
      entry.update(kind="qtensor", **_qtensor_meta(leaf))
      entry["arrays"] = {f: _array_meta(x) for f, x in group.items()}
      arrays[name] = group
    elif isinstance(leaf, residual.Expansion):
      group = {}
      for k, (t, keep) in enumerate(zip(leaf.terms, leaf.keep, strict=True)):
        group.update({f"t{k}_{f}": x for f, x in _qtensor_arrays(t).items()})
        if keep is not None:
          group[f"t{k}_keep"] = keep
      entry.update(
        kind="expansion",
        shape=list(leaf.shape),
        dtype=str(np.dtype(leaf.dtype)),
        terms=[_qtensor_meta(t) for t in leaf.terms],
        arrays={f: _array_meta(x) for f, x in group.items()},
      )
      arrays[name] = group
    elif isinstance(leaf, qtensor.CompositeLeaf):
      raise ValueError(
        f"parameter {api.path_str(p)!r}: cannot save a "
        f"{type(leaf).__name__} leaf"
      )
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
      leaf = _qtensor_from(e, got)
    elif e["kind"] == "expansion":
      n = len(e["terms"])
      leaf = residual.Expansion(
        tuple(
          _qtensor_from(t, got, f"t{k}_") for k, t in enumerate(e["terms"])
        ),
        tuple(got.get(f"t{k}_keep") for k in range(n)),
        tuple(e["shape"]),
        np.dtype(e["dtype"]),
      )
      leaf.validate()
    else:
      leaf = got["value"]
    node = tree
    for k in e["path"][:-1]:
      node = node.setdefault(k, {})
    node[e["path"][-1]] = leaf
  return tree
