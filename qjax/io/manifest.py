"""qjax.json, a checkpoint's manifest, and the checks that keep it honest.

The manifest names every leaf, its kind and static metadata, and every
array's part, shape, dtype, partition spec and SHA-256. Its own SHA-256 goes
into qjax.sha256 beside it, so an edited or damaged manifest is an error,
not wrong numbers (a format's bias or bit split, a scale format or a dtype
changed by hand would otherwise decode the same bytes into other values).
`read` also checks every field it will use: part names stay inside the
checkpoint, names and paths are unique, shapes are shapes, dtypes are
dtypes.
"""

import hashlib
import json
import os
import pathlib
import re
import warnings

import numpy as np

MANIFEST = "qjax.json"
DIGEST = "qjax.sha256"
# 3: composite leaves through the leaf protocol, the manifest's SHA-256 in
# qjax.sha256, zero-size arrays kept in the manifest; 2: arrays in parts
# with partition specs; 1: one arrays/ tree. All are read; 1 and 2 carry no
# manifest checksum.
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
_PART = re.compile(r"arrays(/part\d{5})?")
_NAME = re.compile(r"leaf\d{5}")
_ARRAY = re.compile(r"[A-Za-z0-9_]+")


def write(directory: pathlib.Path, doc: dict) -> None:
  """Writes qjax.json and its SHA-256 (each atomically: temp, rename)."""
  text = json.dumps(doc, indent=1).encode()
  for name, data in (
    (MANIFEST, text),
    (DIGEST, (hashlib.sha256(text).hexdigest() + "\n").encode()),
  ):
    tmp = directory / (name + ".tmp")
    tmp.write_bytes(data)
    os.rename(tmp, directory / name)


def read(path) -> dict:
  """The manifest of the checkpoint at `path`, verified.

  Raises:
    ValueError: no manifest (an incomplete checkpoint), a manifest whose
      SHA-256 does not match qjax.sha256, unreadable JSON, an unknown format
      version, or a field that is malformed or points outside the
      checkpoint.
  """
  path = pathlib.Path(path)
  meta_file = path / MANIFEST
  if not meta_file.is_file():
    raise ValueError(f"{path} is not a complete qjax checkpoint: no {MANIFEST}")
  data = meta_file.read_bytes()
  digest_file = path / DIGEST
  if digest_file.is_file():
    want = digest_file.read_text().strip()
    if hashlib.sha256(data).hexdigest() != want:
      raise ValueError(
        f"{meta_file} does not match its SHA-256 in {DIGEST}: the manifest "
        "was edited or damaged"
      )
  try:
    doc = json.loads(data)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{meta_file} is corrupt: {e}") from e
  if not isinstance(doc, dict):
    raise ValueError(f"{meta_file} is corrupt: not a JSON object")
  version = doc.get("format_version")
  if version not in READABLE_VERSIONS:
    raise ValueError(
      f"{path}: checkpoint format {version!r} is not one of "
      f"{READABLE_VERSIONS} (written by qjax {doc.get('qjax_version')})"
    )
  if version >= 3 and not digest_file.is_file():
    raise ValueError(
      f"{path} is not a complete qjax checkpoint: no {DIGEST} (format "
      f"{version} records the manifest's SHA-256 there)"
    )
  if not digest_file.is_file():
    warnings.warn(
      f"{path}: format {version} has no manifest checksum; its metadata "
      "is not verified (array checksums still are)",
      stacklevel=3,
    )
  validate(doc, path)
  return doc


def _fail(path, where: str, why: str):
  raise ValueError(f"{path}: manifest {where} {why}: the checkpoint is corrupt")


def _check_shape(path, where, shape) -> None:
  if not isinstance(shape, list) or not all(
    isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
  ):
    _fail(path, where, f"has a malformed shape {shape!r}")


def _check_dtype(path, where, dtype) -> None:
  try:
    np.dtype(dtype)
  except TypeError:
    _fail(path, where, f"has an unknown dtype {dtype!r}")


def validate(doc: dict, path) -> None:
  """Raises ValueError for any malformed field `restore` would use."""
  leaves = doc.get("leaves")
  if not isinstance(leaves, list):
    _fail(path, "'leaves'", "is not a list")
  names, paths = set(), set()
  for i, e in enumerate(leaves):
    where = f"leaf {i}"
    if not isinstance(e, dict):
      _fail(path, where, "is not an object")
    keys = e.get("path")
    if (
      not isinstance(keys, list)
      or not keys
      or not all(isinstance(k, str) and k for k in keys)
    ):
      _fail(path, where, f"has a malformed path {keys!r}")
    where = f"leaf {'/'.join(keys)!r}"
    if tuple(keys) in paths:
      _fail(path, where, "appears twice")
    paths.add(tuple(keys))
    name = e.get("name")
    if doc["format_version"] >= 2 and (
      not isinstance(name, str) or not _NAME.fullmatch(name) or name in names
    ):
      _fail(path, where, f"has a malformed or repeated name {name!r}")
    names.add(name)
    part = e.get("part", "arrays")
    if not isinstance(part, str) or not _PART.fullmatch(part):
      _fail(path, where, f"names a part outside the checkpoint: {part!r}")
    kind = e.get("kind")
    if not isinstance(kind, str) or not kind:
      _fail(path, where, f"has a malformed kind {kind!r}")
    arrays = e.get("arrays")
    if not isinstance(arrays, dict):
      _fail(path, where, "has no arrays")
    for field, a in arrays.items():
      if not _ARRAY.fullmatch(field) or not isinstance(a, dict):
        _fail(path, where, f"has a malformed array {field!r}")
      _check_shape(path, f"{where} array {field!r}", a.get("shape"))
      _check_dtype(path, f"{where} array {field!r}", a.get("dtype"))
      if not isinstance(a.get("sha256"), str):
        _fail(path, f"{where} array {field!r}", "has no SHA-256")
    if kind == "qtensor":
      _check_shape(path, where, e.get("shape"))
      _check_dtype(path, where, e.get("dtype"))
  prefixes = {p[:k] for p in paths for k in range(1, len(p))}
  for p in sorted(paths & prefixes):
    _fail(path, f"leaf {'/'.join(p)!r}", "is both a leaf and a subtree")
