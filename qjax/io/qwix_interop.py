"""QTensor <-> qwix QArray (qwix 0.1.8), exact both ways.

A qwix QArray holds unpacked values (qvalue, of the original shape, in a
low-precision dtype or int8 with a synthetic qtype such as 'int3'), a float
scale per tile, an optional zero point, and dequantizes as
(qvalue - zero_point) * scale. A QTensor maps onto one when its blocks tile
the shape (no ragged last block) and its dequantization is one product:

  qjax element          qwix qtype
  int2..int8            jnp.int4 / jnp.int8, else 'int2', 'int3', 'int5',
                        'int6', 'int7' (int8 storage)
  uint4 / uint8 + zero  jnp.int4 / jnp.int8 with qvalue = code - 2^(b-1) and
                        zero_point = zero - 2^(b-1) (qwix's asymmetric
                        integers are signed; the difference is the same)
  float8_e4m3fn, float8_e5m2, float4_e2m1fn (incl. MX elements)
                        the ml_dtypes dtype of that name

Scales go over as float32 (E8M0 and E4M3 scales decode exactly), so
qwix.dequantize gives float32 values equal bit for bit to
QTensor.dequantize(jnp.float32). NVFP4's two-level scale would need the
product of two scales, which rounds: it is refused, as are codebooks (NF4)
and ragged blocks.
"""

import dataclasses

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from qjax import qtensor
from qjax.formats import exmy, integer, packing, presets
from qjax.formats.scaling import Scaling

_FLOATS = ("float8_e4m3fn", "float8_e5m2", "float4_e2m1fn")
_NATIVE_INTS = {4: jnp.int4, 8: jnp.int8}


def _float_name(fmt) -> str | None:
  if not isinstance(fmt, exmy.ExMy):
    return None
  for name in _FLOATS:
    p = presets.PRESETS[name]
    if fmt.bits == p.bits and np.array_equal(fmt.values(), p.values()):
      return name
  return None


def _qtype(fmt, path: str):
  if isinstance(fmt, integer.IntFormat) and fmt.step_exponent == 0:
    if fmt.bits in _NATIVE_INTS:
      return _NATIVE_INTS[fmt.bits]
    if 2 <= fmt.bits <= 7:
      return f"int{fmt.bits}"
  name = _float_name(fmt)
  if name is not None:
    return jnp.dtype(getattr(ml_dtypes, name))
  raise ValueError(
    f"{path}: {fmt} has no qwix qtype (supported: int2..int8, uint4/uint8 "
    "with zero points, float8_e4m3fn, float8_e5m2, float4_e2m1fn)"
  )


def to_qwix(qt: qtensor.QTensor, path: str = "<leaf>"):
  """The qwix QArray holding the same numbers as `qt`.

  Raises:
    ValueError: naming `path`, for a format qwix lacks, a two-level
      (NVFP4) scale, a ragged block, or unsigned integers without zeros.
  """
  import qwix

  s = qt.scaling
  if s.tensor_scale:
    raise ValueError(
      f"{path}: a two-level scale (NVFP4) is two products; qwix's one "
      "scale per tile would round their product"
    )
  block = s.block_shape(qt.shape)
  if any(n % b for n, b in zip(qt.shape, block, strict=True)):
    raise ValueError(f"{path}: ragged blocks {block} of {qt.shape} do not tile")
  fmt = qt.fmt
  qtype = _qtype(fmt, path)
  codes = np.asarray(packing.unpack(qt.codes, fmt.bits, qt.shape[-1]))
  zero = None
  if isinstance(fmt, integer.IntFormat):
    values = np.asarray(fmt.decode(codes)).astype(np.int32)
    if not fmt.signed:
      if qt.zero is None:
        raise ValueError(f"{path}: unsigned {fmt} without zero points")
      half = 1 << (fmt.bits - 1)
      values = values - half
      zero = np.asarray(qt.zero, np.int32) - half
    storage = qtype if not isinstance(qtype, str) else jnp.int8
    qvalue = jnp.asarray(values.astype(np.int8)).astype(storage)
    if zero is not None:  # qwix wants zero points in qvalue's dtype
      zero = jnp.asarray(zero.astype(np.int8)).astype(storage)
  else:
    dtype = np.dtype(qtype)
    qvalue = jnp.asarray(codes.astype(np.uint8).view(dtype))
  scale = np.asarray(qtensor.decode_scale(qt.scale, s), np.float32)
  scale = np.broadcast_to(scale, s.scale_shape(qt.shape))
  return qwix.QArray(
    qvalue,
    jnp.asarray(scale),
    None if zero is None else jnp.broadcast_to(zero, scale.shape),
    qtype,
  )


def _scaling(shape, scale_shape, scale_format: str, zero: bool) -> Scaling:
  tiles = [n // m for n, m in zip(shape, scale_shape, strict=True)]
  pairs = list(enumerate(zip(shape, tiles, strict=True)))
  split = [i for i, (n, t) in pairs if 1 < t < n]
  whole = [i for i, (n, t) in pairs if t == n > 1]
  rank = len(shape)
  if not split and len(whole) == rank - 1 and rank:
    (axis,) = set(range(rank)) - set(whole)
    base = Scaling("channel", (axis - rank,), ())
  elif not split and len(whole) == rank:
    base = Scaling("tensor", (), ())
  elif split and not whole and len(split) <= 2:
    base = Scaling(
      "block", tuple(i - rank for i in split), tuple(tiles[i] for i in split)
    )
  else:
    raise ValueError(
      f"tiles {tuple(tiles)} of {tuple(shape)} are neither per tensor, per "
      "channel nor blocks along at most two axes"
    )
  return dataclasses.replace(base, scale_format=scale_format, zero_point=zero)


def from_qwix(qa, path: str = "<leaf>") -> qtensor.QTensor:
  """The QTensor holding the same numbers as a qwix QArray.

  Raises:
    ValueError: naming `path`, for a qtype qjax lacks (e.g. 'nf4', whose
      table differs) or tiles qjax cannot express.
  """
  shape = tuple(qa.qvalue.shape)
  qtype = qa.qtype
  name = qtype if isinstance(qtype, str) else jnp.dtype(qtype).name
  scale = np.asarray(qa.scale)
  zero = None
  if qa.zero_point is not None:
    zero = np.asarray(qa.zero_point.astype(jnp.float32))
  if name.startswith("int") and name[3:].isdigit():
    bits = int(name[3:])
    values = np.asarray(qa.qvalue).astype(np.int32)
    if zero is not None:
      zero = zero.astype(np.float64)
      half = 1 << (bits - 1)
      if not np.array_equal(zero, np.round(zero)):
        raise ValueError(f"{path}: qwix zero points are not integers")
      fmt = integer.IntFormat(bits, signed=False, name=f"uint{bits}")
      codes = (values + half).astype(np.uint32)
      zero = (np.broadcast_to(zero, scale.shape) + half).astype(np.uint8)
    else:
      fmt = integer.IntFormat(bits, name=f"int{bits}")
      codes = (values & ((1 << bits) - 1)).astype(np.uint32)
  elif name in _FLOATS and zero is None:
    fmt = presets.PRESETS[name]
    codes = np.asarray(qa.qvalue).view(np.uint8).astype(np.uint32)
    if fmt.bits == 4:
      codes &= 0xF
  else:
    raise ValueError(f"{path}: qwix qtype {name!r} has no qjax format")
  scale_format = {"float32": "float32", "float16": "float16"}.get(
    scale.dtype.name, "bfloat16" if scale.dtype.name == "bfloat16" else None
  )
  if scale_format is None:
    raise ValueError(f"{path}: qwix scale dtype {scale.dtype} is not a float")
  try:
    scaling = _scaling(shape, scale.shape, scale_format, zero is not None)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e
  scale_shape = scaling.scale_shape(shape)
  packed = packing.pack(
    jnp.asarray(codes.astype(packing.code_dtype(fmt.bits))), fmt.bits
  )
  qt = qtensor.QTensor(
    packed,
    jnp.asarray(scale.reshape(scale_shape)),
    None if zero is None else jnp.asarray(zero.reshape(scale_shape)),
    None,
    fmt,
    scaling,
    shape,
    np.dtype(scale.dtype),
  )
  qt.validate()
  return qt
