"""GGUF (llama.cpp) export of quantized trees, and exact import of GGUF's
block-quantized tensors into QTensors (no float detour).

A qjax leaf and a GGML type hold the same numbers exactly when:

  GGML type  block  element               qjax leaf
  Q4_0       32     d * (q - 8), q 4-bit  int4, float16 scales per group
  Q5_0       32     d * (q - 16), 5-bit   int5, float16 scales per group
  Q8_0       32     d * q, int8           int8, float16 scales per group
  Q6_K       16     d * sc * (q - 32)     int6, float32 scales d * sc (d is
                    (256-element super-   float16, sc int8, so the product is
                    blocks, one d)        exact in float32); import only
  F32/F16/BF16      unquantized           arrays of that dtype

where a qjax group of g inputs (g a multiple of 32, or one group per output
channel; a ragged last group too, if `in` is a multiple of 32) is g / 32
GGUF blocks repeating its scale. So `export` writes those
leaves as those types and raises for any other (e.g. uint4 with zero points:
Q4_1 keeps the offset -z * d in float16, which rounds it); `load` imports
Q4_0/Q5_0/Q8_0/Q6_K tensors as QTensors whose dequantize() equals
gguf.quants.dequantize bit for bit. Q4_K, Q5_K and Q2_K subtract a float
minimum per sub-block, which a qjax zero point (an integer) cannot hold:
with inexact='dequantize' (default) they come back as float32 arrays and are
listed in the report, with inexact='raise' they are an error.

GGUF stores a matrix [out, in] (rows along `in`, numpy shape); `names` maps
each Flax path to (tensor name, transpose) as qjax.models.smollm2.gguf_names
does; transpose=True leaves are Dense kernels [in, out] (blocks along -2),
the others keep GGUF's orientation (blocks along -1, e.g. an embedding).
"""

import dataclasses
import os
import pathlib

import jax.numpy as jnp
import numpy as np

from qjax import qtensor
from qjax.formats import integer
from qjax.io import linear_codes as lc_lib

_BLOCK = 32
_SUPER = 256
# GGML type -> (element bits, offset added to the signed value when stored)
_LEGACY = {"Q4_0": (4, 8), "Q5_0": (5, 16), "Q8_0": (8, 0)}
_FLOATS = {"F32": np.float32, "F16": np.float16}


def ggml_type_of(leaf, path: str) -> str:
  """The GGML type `export` writes a leaf as.

  Raises:
    ValueError: naming `path`, when no GGML type holds the leaf exactly.
  """
  if not qtensor.is_qtensor(leaf):
    dtype = np.dtype(leaf.dtype)
    for name, t in _FLOATS.items():
      if dtype == t:
        return name
    if dtype.name == "bfloat16":
      return "BF16"
    raise ValueError(f"{path}: GGUF has no type for dtype {dtype}")
  fmt, s = leaf.fmt, leaf.scaling
  if (
    isinstance(fmt, integer.IntFormat)
    and fmt.signed
    and fmt.step_exponent == 0
    and s.scale_format == "float16"
    and not (s.zero_point or s.tensor_scale)
  ):
    for name, (bits, _) in _LEGACY.items():
      if fmt.bits == bits:
        return name
  raise ValueError(
    f"{path}: {fmt} with scaling {s.spec()} has no exact GGML type; "
    "supported: int4 / int5 / int8 with float16 scales in groups of a "
    "multiple of 32 inputs (Q4_0 / Q5_0 / Q8_0)"
  )


def _signed(codes: np.ndarray, bits: int) -> np.ndarray:
  c = codes.astype(np.int32)
  return np.where(c >= 1 << (bits - 1), c - (1 << bits), c)


def _legacy_blocks(lc: lc_lib.LinearCodes, kind: str) -> np.ndarray:
  """[out, in] codes and float16 scales -> GGML blocks, uint8 [out, bytes]."""
  bits, offset = _LEGACY[kind]
  n_out, n_in = lc.codes.shape
  q = _signed(lc.codes, bits).reshape(n_out, n_in // _BLOCK, _BLOCK)
  d = np.repeat(lc.scale.astype(np.float16), lc.group // _BLOCK, axis=1)
  d = d[:, : n_in // _BLOCK].reshape(n_out, -1, 1).view(np.uint8)
  if kind == "Q8_0":
    body = q.astype(np.int8).view(np.uint8)
  else:
    u = (q + offset).astype(np.uint32)
    lo = u & 0xF
    nibbles = (lo[..., :16] | (lo[..., 16:] << 4)).astype(np.uint8)
    if kind == "Q5_0":
      high = (u >> 4) & 1
      qh = np.bitwise_or.reduce(high << np.arange(32, dtype=np.uint32), -1)
      qh = qh.astype("<u4")[..., None].view(np.uint8)
      body = np.concatenate([qh, nibbles], axis=-1)
    else:
      body = nibbles
  return np.concatenate([d, body], axis=-1).reshape(n_out, -1)


def _check_groups(lc: lc_lib.LinearCodes, path: str) -> None:
  if lc.group % _BLOCK or lc.in_features % _BLOCK:
    raise ValueError(
      f"{path}: groups of {lc.group} of {lc.in_features} inputs are not "
      f"whole GGML blocks of {_BLOCK}"
    )


def export(
  qtree, file, *, names, arch: str = "llama", metadata_from=None
) -> pathlib.Path:
  """Writes `qtree` as a GGUF file.

  Args:
    qtree: QTensors of Dense kernels [in, out] (transpose=True in `names`)
      and float arrays.
    file: the .gguf path; written as `<file>.partial` and renamed.
    names: Flax path -> (GGUF tensor name, transpose).
    arch: general.architecture.
    metadata_from: a GGUF file whose key-value metadata (hyperparameters,
      tokenizer) is copied, so the export is a complete llama.cpp model.

  Raises:
    ValueError: naming the leaf, for a leaf no GGML type holds exactly
      (ggml_type_of), groups that are not whole blocks, or a path `names`
      lacks.
  """
  import gguf

  file = pathlib.Path(file)
  leaves = lc_lib.tree_leaves(qtree)
  tmp = file.with_name(file.name + ".partial")
  writer = gguf.GGUFWriter(str(tmp), arch)
  try:
    if metadata_from is not None:
      _copy_metadata(gguf.GGUFReader(str(metadata_from)), writer)
    for p, leaf in leaves:
      if p not in names:
        raise ValueError(f"{p}: no GGUF tensor name for this leaf in `names`")
      name, transpose = names[p]
      kind = ggml_type_of(leaf, p)
      if not qtensor.is_qtensor(leaf):
        x = np.asarray(leaf)
        x = np.ascontiguousarray(x.T if transpose else x)
        if kind == "BF16":
          writer.add_tensor(
            name, x.view(np.uint8), raw_dtype=gguf.GGMLQuantizationType.BF16
          )
        else:
          writer.add_tensor(name, x)
        continue
      lc = lc_lib.linear_codes(leaf, p, transpose)
      _check_groups(lc, p)
      blocks = _legacy_blocks(lc, kind)
      writer.add_tensor(name, blocks, raw_dtype=gguf.GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, file)
  finally:
    tmp.unlink(missing_ok=True)
  return file


def _copy_metadata(reader, writer) -> None:
  import gguf

  skip = ("GGUF.", "general.architecture")
  for field in reader.fields.values():
    if field.name.startswith(skip):
      continue
    vtype = field.types[0]
    sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
    writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)


@dataclasses.dataclass
class ImportReport:
  """Which leaves came in exactly (QTensor or float array) and which were
  dequantized (GGML types no qjax format holds)."""

  exact: dict[str, str] = dataclasses.field(default_factory=dict)
  dequantized: dict[str, str] = dataclasses.field(default_factory=dict)


def _legacy_codes(data: np.ndarray, kind: str, n_in: int):
  """GGML blocks uint8 [out, bytes] -> (two's complement codes [out, in],
  float16 d [out, in / 32])."""
  bits, offset = _LEGACY[kind]
  n_out = data.shape[0]
  b = data.reshape(n_out, n_in // _BLOCK, -1)
  d = b[..., :2].copy().view(np.float16)[..., 0]
  if kind == "Q8_0":
    q = b[..., 2:].view(np.int8).astype(np.int32)
  else:
    qs = b[..., 2:] if kind == "Q4_0" else b[..., 6:]
    lo = np.concatenate([qs & 0xF, qs >> 4], axis=-1).astype(np.int32)
    if kind == "Q5_0":
      qh = b[..., 2:6].copy().view("<u4").astype(np.uint32)
      high = (qh >> np.arange(32, dtype=np.uint32)) & 1
      lo = lo | (high.astype(np.int32) << 4)
    q = lo - offset
  codes = (q & ((1 << bits) - 1)).astype(np.uint32)
  return codes.reshape(n_out, n_in), d


def _q6k_codes(data: np.ndarray, n_in: int):
  """Q6_K super-blocks (ql[128], qh[64], scales[16] int8, d f16: 210 bytes
  per 256 elements) -> (int6 two's complement codes [out, in], float32
  scales d * sc [out, in / 16])."""
  n_out = data.shape[0]
  b = data.reshape(n_out, n_in // _SUPER, 210)
  ql, qh = b[..., :128], b[..., 128:192]
  sc = b[..., 192:208].view(np.int8).astype(np.float32)
  d = b[..., 208:210].copy().view(np.float16).astype(np.float32)
  e = np.arange(128)
  # Element e of each 128-element half: low 4 bits from byte e % 64
  # (nibble e // 64), high 2 bits from byte e % 32 (bits 2 * (e // 32)).
  q = np.empty((*b.shape[:2], 2, 128), np.int32)
  for h in range(2):
    lo = (ql[..., h * 64 + e % 64] >> (4 * (e // 64))) & 0xF
    hi = (qh[..., h * 32 + e % 32] >> (2 * (e // 32))) & 0x3
    q[..., h, :] = lo.astype(np.int32) | (hi.astype(np.int32) << 4)
  codes = ((q - 32) & 0x3F).astype(np.uint32).reshape(n_out, n_in)
  scale = (d * sc).reshape(n_out, -1)  # exact: 11 x 8 significant bits
  return codes, scale


def _qtensor(codes, scale, fmt, scale_format, group, transpose):
  lc = lc_lib.LinearCodes(
    codes, scale, None, None, group, fmt, scale_format, np.dtype(np.float32)
  )
  return lc_lib.from_linear_codes(lc, transpose)


def load(file, names, *, inexact: str = "dequantize"):
  """Reads a GGUF file into a Flax tree, block-quantized tensors as
  QTensors where a qjax format holds them exactly.

  Args:
    file: a .gguf file.
    names: Flax path -> (tensor name, transpose).
    inexact: 'dequantize' (float32 array, listed in the report) or 'raise',
      for GGML types no qjax format holds (Q4_K, Q5_K, Q2_K, IQ*, ...).

  Returns:
    (tree as nested dicts, ImportReport).

  Raises:
    ValueError: a missing tensor, a damaged file, or with inexact='raise'
      a type qjax cannot hold, naming the tensor.
  """
  import gguf
  from gguf.quants import dequantize

  if inexact not in ("dequantize", "raise"):
    raise ValueError(
      f"inexact must be 'dequantize' or 'raise', not {inexact!r}"
    )
  try:
    reader = gguf.GGUFReader(str(file))
  except Exception as e:  # gguf raises many types for damaged files
    raise ValueError(f"{file}: not a readable GGUF file ({e})") from e
  tensors = {t.name: t for t in reader.tensors}
  report, flat = ImportReport(), {}
  for path, (name, transpose) in names.items():
    if name not in tensors:
      raise ValueError(f"{file}: no tensor {name!r} (for {path})")
    t = tensors[name]
    kind = t.tensor_type.name
    n_in = int(t.shape[0])
    data = np.asarray(t.data)
    if kind in _LEGACY:
      codes, d = _legacy_codes(data.reshape(-1, data.shape[-1]), kind, n_in)
      fmt = integer.IntFormat(_LEGACY[kind][0], name=f"int{_LEGACY[kind][0]}")
      leaf = _qtensor(codes, d, fmt, "float16", _BLOCK, transpose)
    elif kind == "Q6_K":
      codes, s = _q6k_codes(data.reshape(-1, data.shape[-1]), n_in)
      fmt = integer.IntFormat(6, name="int6")
      leaf = _qtensor(codes, s, fmt, "float32", 16, transpose)
    elif kind in ("F32", "F16", "BF16"):
      x = np.asarray(dequantize(data, t.tensor_type))
      x = x.astype(np.float32) if kind == "BF16" else x
      leaf = jnp.asarray(x.T if transpose else x)
    else:
      if inexact == "raise":
        raise ValueError(
          f"{file}: tensor {name!r} ({path}) is {kind}, whose float "
          "sub-block minima no qjax format holds exactly"
        )
      x = np.asarray(dequantize(data, t.tensor_type), np.float32)
      leaf = jnp.asarray(x.T if transpose else x)
      report.dequantized[path] = kind
      flat[path] = leaf
      continue
    report.exact[path] = kind
    flat[path] = leaf
  return lc_lib.nest(flat), report
