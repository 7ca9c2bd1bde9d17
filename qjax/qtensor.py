"""QTensor: packed codes + scales, a registered pytree.

Invariants (checked by `validate`, never in __post_init__, because JAX
rebuilds pytrees with tracers, ShapeDtypeStructs or None as leaves):
  codes         uint8 [*shape[:-1], packed_size(shape[-1], fmt.bits)]: element
                codes packed along the last axis (qjax.formats.pack).
  scale         [*scaling.scale_shape(shape)] in scaling.scale_dtype():
                float scales, or uint8 E8M0 / E4M3 codes.
  zero          None, or zero points of scale's shape (unsigned ints).
  tensor_scale  None, or a float32 scalar (NVFP4's second level).
  fmt, scaling, shape, dtype are static: equal metadata never recompiles.

dequantize() = (decode(codes) - zero) * scale [* tensor_scale], per block.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from qjax.formats import (
  exmy,
  integer,
  packing,
  power_of_two,
  presets,
  tiny_scales,
)
from qjax.formats.scaling import Scaling

Format = exmy.ExMy | integer.IntFormat | integer.Codebook
_E4M3 = presets.PRESETS["float8_e4m3fn"]
_E8M0 = presets.PRESETS["float8_e8m0fnu"]


def decode_scale(stored: jax.Array, scaling: Scaling) -> jax.Array:
  """Stored scales -> float32 scale values."""
  if scaling.scale_format == "e8m0":
    return _E8M0.decode(stored)
  if scaling.scale_format == "float8_e4m3fn":
    return _E4M3.decode(stored)
  return stored.astype(jnp.float32)


def expand_blocks(s: jax.Array, shape, block_shape) -> jax.Array:
  """[*scale_shape] -> [*shape]: each block's value repeated over it."""
  for axis, (n, b) in enumerate(zip(shape, block_shape, strict=True)):
    if s.shape[axis] > 1:  # axes of one block just broadcast
      s = jnp.repeat(s, b, axis=axis, total_repeat_length=s.shape[axis] * b)
      s = jax.lax.slice_in_dim(s, 0, n, axis=axis)
  return jnp.broadcast_to(s, shape)


@dataclasses.dataclass(frozen=True)
class QTensor:
  """A quantized tensor (see the module docstring for its invariants)."""

  codes: jax.Array
  scale: jax.Array
  zero: jax.Array | None
  tensor_scale: jax.Array | None
  fmt: Format
  scaling: Scaling
  shape: tuple[int, ...]
  dtype: np.dtype

  def dequantize(self, dtype=None) -> jax.Array:
    """The float tensor these codes and scales stand for, [*shape]."""
    return _dequantize(self).astype(dtype or self.dtype)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    """Bytes really stored: packed codes, scales, zero points, tensor scale."""
    leaves = (self.codes, self.scale, self.zero, self.tensor_scale)
    return sum(
      math.prod(x.shape) * np.dtype(x.dtype).itemsize
      for x in leaves
      if x is not None
    )

  @property
  def bits_per_weight(self) -> float:
    return 8 * self.nbytes / self.size if self.size else 0.0

  def validate(self) -> None:
    """Raises ValueError if the leaves break the class invariants."""
    want = (
      *self.shape[:-1],
      packing.packed_size(self.shape[-1], self.fmt.bits),
    )
    if tuple(self.codes.shape) != want or self.codes.dtype != jnp.uint8:
      raise ValueError(
        f"codes are {self.codes.dtype}{list(self.codes.shape)}; expected "
        f"uint8{list(want)} for shape {self.shape} at {self.fmt.bits} bits"
      )
    scale_shape = self.scaling.scale_shape(self.shape)
    if tuple(self.scale.shape) != scale_shape:
      raise ValueError(
        f"scale has shape {tuple(self.scale.shape)}, expected {scale_shape}"
      )
    if np.dtype(self.scale.dtype) != self.scaling.scale_dtype():
      raise ValueError(
        f"scale dtype {self.scale.dtype} != {self.scaling.scale_dtype()}"
      )
    if (self.zero is None) == self.scaling.zero_point:
      raise ValueError("zero points must be present iff scaling.zero_point")
    if self.zero is not None and tuple(self.zero.shape) != scale_shape:
      raise ValueError(f"zero has shape {self.zero.shape}, want {scale_shape}")
    if (self.tensor_scale is None) == self.scaling.tensor_scale:
      raise ValueError("tensor_scale must be present iff scaling.tensor_scale")

  def __repr__(self) -> str:
    return (
      f"QTensor({self.fmt}, {self.scaling.spec()}, shape={self.shape}, "
      f"{self.bits_per_weight:.3f} bits/weight)"
    )


jax.tree_util.register_dataclass(
  QTensor,
  data_fields=["codes", "scale", "zero", "tensor_scale"],
  meta_fields=["fmt", "scaling", "shape", "dtype"],
)


def auto_axes(x: jax.Array) -> jax.Array:
  """Relabels an Explicit-axes NamedSharding as Auto (same devices, no copy).

  Block statistics reshape a sharded axis into (blocks, block) and
  dequantizing repeats a scale over its block; with sharding-in-types
  (Explicit axes) both need an explicit output sharding, while GSPMD (Auto
  axes) propagates it: codes keep the weight's sharding and scales follow
  their blocks.
  """
  s = getattr(x, "sharding", None)
  if not isinstance(s, jax.sharding.NamedSharding):
    return x
  auto = jax.sharding.AxisType.Auto
  if all(t == auto for t in s.mesh.axis_types):
    return x
  mesh = jax.sharding.Mesh(
    s.mesh.devices,
    s.mesh.axis_names,
    axis_types=(auto,) * len(s.mesh.axis_names),
  )
  return jax.device_put(x, jax.sharding.NamedSharding(mesh, s.spec))


def _explicit_sharding(x):
  """x's sharding when it is over Explicit mesh axes, else None (also for a
  tracer: jax.typeof sees its sharding type)."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  explicit = jax.sharding.AxisType.Explicit
  if mesh is None or explicit not in tuple(getattr(mesh, "axis_types", ())):
    return None
  return sharding


def _dequantize(qt: QTensor) -> jax.Array:
  # Codes sharded over Explicit mesh axes (a restore onto such a mesh):
  # unpacking, decoding and repeating scales over blocks run with those
  # axes Auto, and the values come out sharded like the codes.
  sharding = _explicit_sharding(qt.codes)
  if sharding is not None:
    return jax.sharding.auto_axes(_dequantize_auto, out_sharding=sharding)(qt)
  return _dequantize_auto(qt)


# One executable per (format, scaling, shape): run eagerly, each primitive
# of the decode compiled its own per shape (a conversion held ~100 MiB of
# them per new leaf shape).
@jax.jit
def _dequantize_auto(qt: QTensor) -> jax.Array:
  codes = packing.unpack(qt.codes, qt.fmt.bits, qt.shape[-1])
  values = qt.fmt.decode(codes)
  block_shape = qt.scaling.block_shape(qt.shape)
  if qt.zero is not None:
    values = values - expand_blocks(
      qt.zero.astype(jnp.float32), qt.shape, block_shape
    )
  if qt.scaling.scale_format == "e8m0" and qt.tensor_scale is None:
    # 2^e by moving exponent bits: exact where 2^e or the value is
    # subnormal (XLA:CPU flushes those in a multiplication).
    e = qt.scale.astype(jnp.int32) - 127
    return power_of_two.ldexp(values, expand_blocks(e, qt.shape, block_shape))
  # Subnormal scales and products are rounded, not flushed (tiny_scales).
  scale = expand_blocks(
    decode_scale(qt.scale, qt.scaling), qt.shape, block_shape
  )
  if qt.tensor_scale is not None:
    return tiny_scales.times_two_level(values, scale, qt.tensor_scale)
  bits = tiny_scales.value_bits(qt.fmt, qt.zero is not None)
  return tiny_scales.times_scale(values, scale, bits)


def from_parts(parts, fmt, scaling: Scaling, like) -> "QTensor":
  """A QTensor from (packed, stored scale, zero, tensor scale) of a
  quantizer, with the shape and dtype of the weight `like`."""
  packed, stored, zero, tensor_scale = parts
  return QTensor(
    packed,
    stored,
    zero,
    tensor_scale,
    fmt,
    scaling,
    tuple(like.shape),
    np.dtype(like.dtype),
  )


def with_leading_unit_axes(qt: "QTensor", shape) -> "QTensor":
  """`qt` of a matrix [in, out] as the tensor [1, ..., 1, in, out] (a
  pointwise conv kernel quantized as its matrix). The codes and scales are
  the same numbers with unit axes in front, so this holds only when every
  scaling axis counts from the end.

  Raises:
    ValueError: `shape` is not unit axes + qt.shape, or a scaling axis is
      positive (it would name another axis of the larger tensor).
  """
  shape = tuple(shape)
  lead = len(shape) - len(qt.shape)
  if (
    lead < 0
    or shape[lead:] != tuple(qt.shape)
    or any(d != 1 for d in shape[:lead])
  ):
    raise ValueError(f"cannot view {qt.shape} as {shape}: only unit axes")
  if any(a >= 0 for a in qt.scaling.axes):
    raise ValueError(
      f"scaling {qt.scaling.spec()} counts axes from the front; use negative "
      "axes (e.g. -2 for the input axis) to quantize a conv as its matrix"
    )

  def grow(x):
    return None if x is None else x.reshape((1,) * lead + tuple(x.shape))

  out = dataclasses.replace(
    qt,
    codes=grow(qt.codes),
    scale=grow(qt.scale),
    zero=grow(qt.zero),
    shape=shape,
  )
  out.validate()
  return out


def matrix_scaling(scaling: Scaling, shape, split: int) -> Scaling:
  """The scaling of the matrix view [prod(shape[:split]), prod(shape[split:])]
  that stores the same scales as `scaling` on a tensor of `shape`.

  A scale block of the tensor must be a run of whole matrix rows and
  columns: on the input axes (shape[:split]) it covers all of them, or only
  part of the last; on the output axes all or one element each.

  Raises:
    ValueError: the blocks of `scaling` cut across that view (naming the
      shape and the scalings that fit).
  """
  shape = tuple(int(n) for n in shape)
  # a ragged block longer than its axis is one short block: the whole axis
  block = tuple(
    min(b, n) for b, n in zip(scaling.block_shape(shape), shape, strict=True)
  )
  ins, outs = shape[:split], shape[split:]
  b_in, b_out = block[:split], block[split:]
  d, o = math.prod(ins), math.prod(outs)
  if b_out == outs:
    cols = o
  elif all(b == 1 for b in b_out):
    cols = 1
  else:
    cols = None
  if b_in == ins:
    rows = d
  elif all(b == 1 for b in b_in[:-1]):
    rows = b_in[-1]
  else:
    rows = None
  # a short last block along the last input axis stays one block of the
  # matrix only when that axis is all of the matrix rows (a 1x1 conv)
  ragged_cut = (
    rows not in (None, d) and math.prod(ins[:-1]) > 1 and ins[-1] % rows != 0
  )
  if rows is None or cols is None or (cols == o and rows != d) or ragged_cut:
    raise ValueError(
      f"scaling {scaling.spec()} on a kernel {shape} with {split} input "
      "axes does not map onto its matrix view: use one scale per output "
      "(per_channel(-1) for one output axis, per_block(n, axis) over the "
      "input axes otherwise), blocks along the last input axis, or one "
      "scale per tensor"
    )
  if rows == d and cols == o:
    axes, sizes, mode = (), (), "tensor"
  elif rows == d:
    axes, sizes, mode = (-1,), (), "channel"
  else:
    axes, sizes, mode = (-2,), (rows,), "block"
  ragged = scaling.ragged and mode == "block"
  return dataclasses.replace(
    scaling, mode=mode, axes=axes, sizes=sizes, ragged=ragged
  )


def from_matrix(qt: "QTensor", shape, scaling: Scaling) -> "QTensor":
  """`qt` of a matrix view [d, o] (see matrix_scaling) as the tensor of
  `shape` with `scaling`: the same codes and scales, re-packed along the
  tensor's own last axis.

  Raises:
    ValueError: sizes that do not match.
  """
  shape = tuple(int(n) for n in shape)
  if math.prod(shape) != qt.size:
    raise ValueError(f"cannot view {qt.shape} as {shape}")
  codes = qt.codes
  if shape[-1] != qt.shape[-1]:
    codes = packing.unpack(codes, qt.fmt.bits, qt.shape[-1])
    codes = packing.pack(codes.reshape(shape), qt.fmt.bits)
  else:
    codes = codes.reshape((*shape[:-1], codes.shape[-1]))
  scale_shape = scaling.scale_shape(shape)

  def view(x):
    return None if x is None else x.reshape(scale_shape)

  out = dataclasses.replace(
    qt,
    codes=codes,
    scale=view(qt.scale),
    zero=view(qt.zero),
    scaling=scaling,
    shape=shape,
  )
  out.validate()
  return out


def is_qtensor(x) -> bool:
  return isinstance(x, QTensor)


class CompositeLeaf:
  """Base of quantized leaves built from several parts (e.g. a PIPE residual
  Expansion, a CP-factorized kernel).

  A subclass answers dequantize(dtype), nbytes, size and bits_per_weight like
  a QTensor, so trees holding it dequantize and count bytes the same way, and
  the leaf protocol that storage and qjax.stats use without knowing the
  algorithm behind the leaf:
    kind            class attribute: its name in checkpoints (register the
                    class with `register_composite`).
    parts()         {name: QTensor | array}: what a checkpoint stores. A
                    QTensor part p is stored as p_codes, p_scale, ...; an
                    array part's name must not be one of those.
    meta()          JSON-able dict of its static fields (shape, dtype, ...).
    from_parts(meta, parts)   classmethod: the inverse, validated.
    describe(activation_bits) dict for qjax.stats: 'format', 'scaling',
                    'macs', 'bops' per output position, and any extra entries.
  """

  kind: str = ""

  def parts(self) -> dict:
    raise NotImplementedError

  def meta(self) -> dict:
    raise NotImplementedError

  @classmethod
  def from_parts(cls, meta: dict, parts: dict) -> "CompositeLeaf":
    raise NotImplementedError

  def describe(self, activation_bits: int) -> dict:
    raise NotImplementedError


_COMPOSITES: dict[str, type] = {}


def register_composite(cls: type) -> type:
  """Class decorator: lets checkpoints restore leaves of `cls` by cls.kind."""
  if not (isinstance(cls, type) and issubclass(cls, CompositeLeaf)):
    raise TypeError(f"{cls!r} is not a CompositeLeaf subclass")
  if not cls.kind or _COMPOSITES.get(cls.kind, cls) is not cls:
    raise ValueError(
      f"composite kind {cls.kind!r} of {cls.__name__} is empty or taken by "
      f"{_COMPOSITES.get(cls.kind)}"
    )
  _COMPOSITES[cls.kind] = cls
  return cls


def composite_class(kind: str) -> type:
  """The registered CompositeLeaf class named `kind`.

  Raises:
    ValueError: no class of that kind is registered (its module was not
      imported, or the name is not one qjax knows).
  """
  if kind not in _COMPOSITES:
    raise ValueError(
      f"no composite leaf kind {kind!r} is registered (known: "
      f"{', '.join(sorted(_COMPOSITES)) or 'none'}); import the module that "
      "defines it before restoring"
    )
  return _COMPOSITES[kind]


def qtensor_macs_and_bops(qt: "QTensor", activation_bits: int):
  """MACs per output position of a kernel [..., d_out] stored as `qt`
  (prod(shape)) and BOPs = MACs * element bits * activation bits."""
  macs = math.prod(qt.shape)
  return macs, macs * qt.fmt.bits * activation_bits


def dequantize_tree(tree, dtype=None):
  """Replaces every quantized leaf (QTensor or composite) by its float
  tensor in `dtype` (default: each leaf's own dtype)."""
  return jax.tree_util.tree_map(
    lambda x: x.dequantize(dtype) if is_quantized(x) else x,
    tree,
    is_leaf=is_quantized,
  )


def is_quantized(x) -> bool:
  """A QTensor or a composite quantized leaf (see CompositeLeaf)."""
  return isinstance(x, (QTensor, CompositeLeaf))
