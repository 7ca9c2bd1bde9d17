"""The kernel layout of a quantized Dense kernel: byte planes, padded to tiles.

A QTensor [K, N] (Flax Dense layout: in, out) packs its codes along N in
groups of 8 (qjax.formats.packing): a group of 8 b-bit codes is b bytes, and
byte c of every group is a "byte plane". `prepare` rewrites those bytes once,
at load time, into what a kernel tile can unpack with shifts and masks alone:

  planes[c]  uint8 [Np / tn, Kp, tn / 8]: byte c of each group, tile-major,
             so a kernel step loads b contiguous [tk, tn / 8] byte tiles
             (fully coalesced) instead of a strided byte gather.
  order      inside each tile of tn output columns, group g's code j is
             column j * (tn / 8) + g; so the 8 codes of a byte plane decode to
             8 contiguous column slices of the output tile, each one a dense
             [tk, tn/8] matrix for the MMA, with no interleave afterwards.
  padding    K up to a multiple of the K step, N up to a multiple of tn, with
             code 0 (a finite value in every format) and scale 0 (the padded
             rows meet zero activations; padded columns are sliced off).

The bytes per weight stay what the QTensor stores (plus the padding); only
their order changes. Scales and zero points keep their stored dtype (an E8M0
scale is still one byte) and are decoded in the kernel.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from qjax import qtensor
from qjax.formats import exmy, integer, packing

# Smallest MMA K and N a Triton dot accepts.
_MIN_DOT = 16


def unsupported_reason(qt: qtensor.QTensor) -> str | None:
  """Why the kernels cannot run `qt`, or None when they can."""
  if not isinstance(qt, qtensor.QTensor):
    return f"{type(qt).__name__} is not a QTensor"
  if len(qt.shape) != 2:
    return f"shape {qt.shape} is not a 2-D [in, out] Dense kernel"
  if not isinstance(qt.fmt, (exmy.ExMy, integer.IntFormat, integer.Codebook)):
    return f"element format {qt.fmt} has no kernel decoder"
  if qt.fmt.bits > 8:
    return f"{qt.fmt} has {qt.fmt.bits} bits; the kernels unpack 1..8"
  sc = qt.scaling
  if sc.mode == "channel" and sc.axes[0] % 2 != 1:
    return "per-channel scales along the input axis (axis 0)"
  if sc.mode == "block":
    if len(sc.axes) != 1 or sc.axes[0] % 2 != 0:
      return f"blocks along axes {sc.axes}; the kernels take blocks along K"
    size = sc.sizes[0]
    if size < _MIN_DOT or size & (size - 1):
      return f"block size {size} along K (kernels need a power of two >= 16)"
  return None


@dataclasses.dataclass(frozen=True)
class PreparedWeight:
  """A QTensor in kernel layout (see the module docstring).

  planes: tuple of b uint8 [Np / tn, Kp, tn / 8]. scale, zero: [S, Np] in
  their stored dtype, S = Kp / k_step when scales change along K (blocks),
  else 1.
  tensor_scale: None or a float32 scalar. shape is the logical (K, N).
  """

  planes: tuple[jax.Array, ...]
  scale: jax.Array
  zero: jax.Array | None
  tensor_scale: jax.Array | None
  fmt: qtensor.Format
  scale_format: str
  shape: tuple[int, int]
  dtype: np.dtype
  k_step: int
  tile_n: int
  scale_per_step: bool

  @property
  def bits(self) -> int:
    return self.fmt.bits

  @property
  def padded_shape(self) -> tuple[int, int]:
    tiles, kp, w = self.planes[0].shape
    return kp, tiles * w * 8

  @property
  def nbytes(self) -> int:
    leaves = (*self.planes, self.scale, self.zero, self.tensor_scale)
    return sum(x.size * x.dtype.itemsize for x in leaves if x is not None)


jax.tree_util.register_dataclass(
  PreparedWeight,
  data_fields=["planes", "scale", "zero", "tensor_scale"],
  meta_fields=[
    "fmt",
    "scale_format",
    "shape",
    "dtype",
    "k_step",
    "tile_n",
    "scale_per_step",
  ],
)


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def prepare(
  qt: qtensor.QTensor,
  *,
  tile_n: int = 256,
  k_step: int = 128,
  k_multiple: int = 1,
) -> PreparedWeight:
  """QTensor [K, N] -> PreparedWeight, the kernels' operand.

  Args:
    qt: a QTensor that `unsupported_reason` accepts.
    tile_n: output columns per kernel tile; a multiple of 128 and a power of
      two (each of its 8 column slices feeds an MMA of width tile_n / 8).
    k_step: K rows per inner step when scales do not change along K (per
      channel or per tensor); block scaling steps one block at a time.
    k_multiple: pad K to a multiple of this too (the TPU kernel steps 128
      rows at a time even when a scale block is shorter).

  Returns:
    The PreparedWeight (one XLA relayout; call once per weight, not per
    matmul).

  Raises:
    ValueError: an unsupported QTensor (the reason is in the message) or bad
      tile sizes.
  """
  reason = unsupported_reason(qt)
  if reason:
    raise ValueError(f"qmatmul kernels cannot take this QTensor: {reason}")
  if tile_n % (8 * _MIN_DOT) or tile_n & (tile_n - 1):
    raise ValueError(f"tile_n must be a power of two >= 128, got {tile_n}")
  if k_step < _MIN_DOT or k_step & (k_step - 1):
    raise ValueError(f"k_step must be a power of two >= 16, got {k_step}")
  sc = qt.scaling
  per_step = sc.mode == "block"
  if per_step:
    k_step = sc.sizes[0]
  return _prepare(qt, tile_n, k_step, per_step, math.lcm(k_step, k_multiple))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _prepare(qt, tile_n, k_step, per_step, k_pad) -> PreparedWeight:
  k, n = qt.shape
  bits = qt.fmt.bits
  kp, np_ = _round_up(k, k_pad), _round_up(n, tile_n)
  codes = packing.unpack(qt.codes, bits, n)
  codes = jnp.pad(codes, ((0, kp - k), (0, np_ - n)))
  w = tile_n // 8
  # Tile column j*w + g moves to position 8g + j (group g, slot j).
  codes = codes.reshape(kp, np_ // tile_n, 8, w).swapaxes(2, 3)
  packed = packing.pack(codes.reshape(kp, np_), bits)
  planes = packed.reshape(kp, np_ // tile_n, w, bits).transpose(3, 1, 0, 2)
  planes = tuple(planes[c] for c in range(bits))

  def columns(a):  # scales / zeros -> [S, Np]
    a = jnp.broadcast_to(a, (a.shape[0], n)) if a.shape[-1] == 1 else a
    rows = kp // k_step if per_step else 1
    return jnp.pad(a, ((0, rows - a.shape[0]), (0, np_ - n)))

  zero = None if qt.zero is None else columns(qt.zero)
  return PreparedWeight(
    planes,
    columns(qt.scale),
    zero,
    qt.tensor_scale,
    qt.fmt,
    qt.scaling.scale_format,
    (k, n),
    np.dtype(qt.dtype),
    k_step,
    tile_n,
    per_step,
  )


@jax.jit
def dequantize(pw: PreparedWeight) -> jax.Array:
  """The float32 [K, N] weight a PreparedWeight stands for (inverse layout).

  Written from the layout description alone, so tests that compare it with
  QTensor.dequantize check `prepare`'s permutation and padding.
  """
  from qjax.kernels import decode  # noqa: PLC0415 (kernels import layout)

  kp, np_ = pw.padded_shape
  w = pw.tile_n // 8
  packed = jnp.stack(pw.planes, axis=-1)  # [Np / tn, Kp, w, b]
  packed = packed.transpose(1, 0, 2, 3).reshape(kp, np_ // 8 * pw.bits)
  codes = packing.unpack(packed, pw.bits, np_)
  # Position 8g + j of a tile holds column j*w + g.
  codes = codes.reshape(kp, np_ // pw.tile_n, w, 8).swapaxes(2, 3)
  values = decode.decode(codes.reshape(kp, np_), pw.fmt)
  rows = pw.k_step if pw.scale_per_step else kp

  def per_element(a):
    return jnp.repeat(a, rows, axis=0, total_repeat_length=kp)

  if pw.zero is not None:
    values = values - per_element(pw.zero.astype(jnp.float32))
  scale = decode.decode_scale(pw.scale, pw.scale_format)
  if pw.tensor_scale is not None:
    scale = scale * pw.tensor_scale
  values = values * per_element(scale)
  k, n = pw.shape
  return values[:k, :n]
