"""Round-to-nearest (RTN): one weight -> QTensor from its own statistics.

Scales come from each block's absolute max (or min/max with a zero point),
divided by the element format's max, stored in the scaling's scale format:
  float32/bf16/f16  s = amax / max_elem, rounded to that dtype.
  e8m0              OCP MX v1.0: s = 2^(floor(log2 amax) - emax_elem), with
                    emax_elem = floor(log2 max_elem); elements saturate.
                    scale_rule='midmax' (TensorCast) doubles s when amax / s
                    exceeds (max_elem + 2^(emax_elem+1)) / 2.
  float8_e4m3fn     s = e4m3(clip(amax / max_elem, 2^-9, 448)); with a tensor
                    scale (NVFP4), s_t = amax_tensor / (max_elem * 448) and the
                    block scale is e4m3(amax_b / max_elem / s_t).
With `clip_ratios`, each block also tries amax * r for every r and keeps the
ratio with the smallest squared error (MSE clip search).
"""

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from qjax import qtensor
from qjax.formats import (
  exact_ratio,
  exmy,
  integer,
  packing,
  power_of_two,
  presets,
  tiny_scales,
)
from qjax.formats.scaling import Scaling

_E4M3 = presets.PRESETS["float8_e4m3fn"]
_E4M3_TINY = _E4M3.smallest_subnormal
_E4M3_BITS = _E4M3.mantissa_bits + 1  # significant bits of a scale


def _saturating(fmt):
  """Elements inside a scaled tensor saturate; they never become Inf/NaN."""
  if isinstance(fmt, exmy.ExMy) and fmt.overflow != "saturate":
    return dataclasses.replace(fmt, overflow="saturate")
  return fmt


def block_reduce(x: jax.Array, block_shape, reducer) -> jax.Array:
  """Reduces each block of x: [*shape] -> [*ceil(shape / block_shape)].

  A ragged last block is padded by repeating its last element, which leaves
  max, min and amax unchanged (use it for those reductions only).
  """
  pads = [(0, -n % b) for n, b in zip(x.shape, block_shape, strict=True)]
  if any(p for _, p in pads):
    x = jnp.pad(x, pads, mode="edge")
  split = []
  for n, b in zip(x.shape, block_shape, strict=True):
    split += [n // b, b]
  return reducer(x.reshape(split), axis=tuple(range(1, len(split), 2)))


def _sum_blocks(x, block_shape):
  pads = [(0, -n % b) for n, b in zip(x.shape, block_shape, strict=True)]
  return block_reduce(jnp.pad(x, pads), block_shape, jnp.sum)


def divide(a: jax.Array, b) -> jax.Array:
  """a / b correctly rounded, also when b is a scalar.

  XLA rewrites division by a broadcast scalar into a multiplication by its
  rounded reciprocal (off by an ulp about half the time); dividing by a full
  array behind an optimization barrier keeps IEEE division.
  """
  b = jnp.broadcast_to(jnp.asarray(b, a.dtype), a.shape)
  return a / jax.lax.optimization_barrier(b)


def element_max(fmt) -> float:
  return float(fmt.max)


def _scales(stat, fmt, scaling: Scaling, tensor_scale):
  """Block statistic (amax) -> (stored scale, float32 scale value)."""
  emax = element_max(fmt)
  if scaling.scale_format == "e8m0":
    emax_elem = math.floor(math.log2(emax))
    biased = jax.lax.bitcast_convert_type(stat, jnp.uint32) >> 23
    e = biased.astype(jnp.int32) - 127 - emax_elem
    if scaling.scale_rule == "midmax":
      # amax / 2^e lies in [2^emax_elem, 2^(emax_elem+1)); above the middle
      # of [max_elem, 2^(emax_elem+1)] a larger scale clips less.
      mid = (emax + 2.0 ** (emax_elem + 1)) / 2
      e = e + (jnp.ldexp(stat, -e) > mid).astype(jnp.int32)
    e = jnp.clip(e, -127, 127)
    stored = (e + 127).astype(jnp.uint8)
  elif scaling.scale_format == "float8_e4m3fn":
    s = divide(stat, emax)
    if tensor_scale is not None:
      s = divide(s, tensor_scale)
    stored = _E4M3.encode(jnp.clip(s, _E4M3_TINY, _E4M3.max))
    emax_bits = exact_ratio.significant_bits(emax)
    if tensor_scale is not None and exact_ratio.fits(emax_bits, _E4M3):
      # Two divisions rounded in float32 before e4m3 rounds: settle the
      # code against the exact amax_b / (max_elem * s_t).
      code = exact_ratio.nearest_magnitude_code(
        stat, emax, emax_bits, tensor_scale, _E4M3, stored
      )
      stored = jnp.maximum(code, 1).astype(stored.dtype)  # clip at 2^-9
  else:
    s = divide(stat, emax).astype(scaling.scale_dtype())
    stored = jnp.where(s == 0, jnp.ones_like(s), s)  # all-zero block
  value = qtensor.decode_scale(stored, scaling)
  if tensor_scale is not None:
    value = value * tensor_scale
  return stored, value


def encode_scaled(
  x, fmt, scale, zero=None, two_level=None, rounding=None, key=None, shift=None
) -> jax.Array:
  """Codes of x on a fixed grid: fmt.encode(x / scale + zero, rounding, key)
  (rounding None: the format's own).

  With `shift` (Grid.shift_full: per-element powers of two, nonzero where
  the scale is subnormal), x and the scale (or the tensor scale) are both
  multiplied by 2^shift first, exactly, so the ratio is the same and
  XLA:CPU's flushing of subnormals does not zero it.

  With `two_level` = (block, tensor_scale) (NVFP4: E4M3 blocks, no zero
  point, an ExMy element of up to 6 mantissa bits) and nearest-even
  rounding, x / (block * tensor_scale) is rounded once (exact_ratio), not
  after float32 rounded the product and the quotient. GPTQ, GPFQ and RTN
  quantize each value through this. All arrays broadcast to x.
  """
  if shift is not None:
    x, scale, two_level = _shift_up(x, scale, two_level, shift)
  if (
    two_level is not None
    and zero is None
    and isinstance(fmt, exmy.ExMy)
    and exact_ratio.fits(_E4M3_BITS, fmt)
    and (rounding or fmt.rounding) == "nearest_even"
  ):
    block, tensor_scale = two_level
    return exact_ratio.round_ratio(x, block, _E4M3_BITS, tensor_scale, fmt)
  y = jnp.where(scale > 0, x / scale, 0.0)
  if zero is not None:
    y = y + zero
  return fmt.encode(y, rounding=rounding, key=key)


def _shift_up(x, scale, two_level, shift):
  """(x, scale, two_level) times 2^shift, skipped when no shift is set."""

  def up(x, scale, tensor_scale):
    return (
      power_of_two.ldexp(x, shift),
      power_of_two.ldexp(scale, shift),
      None if tensor_scale is None else power_of_two.ldexp(tensor_scale, shift),
    )

  def keep(x, scale, tensor_scale):
    return x, scale, tensor_scale

  shape = jnp.broadcast_shapes(jnp.shape(x), jnp.shape(scale), shift.shape)
  x = jnp.broadcast_to(jnp.asarray(x, jnp.float32), shape)
  scale = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), shape)
  tensor_scale = None
  if two_level is not None:
    tensor_scale = jnp.broadcast_to(
      jnp.asarray(two_level[1], jnp.float32), shape
    )
  x, scale, tensor_scale = jax.lax.cond(
    jnp.any(shift != 0), up, keep, x, scale, tensor_scale
  )
  if two_level is not None:
    two_level = (two_level[0], tensor_scale)
  return x, scale, two_level


def _encode_with(
  x,
  fmt,
  scale_full,
  zero_full,
  rounding,
  key,
  exponent=None,
  two_level=None,
  shift=None,
):
  if exponent is None:
    return encode_scaled(
      x, fmt, scale_full, zero_full, two_level, rounding, key, shift
    )
  # A power-of-two scale: x / 2^e by moving exponent bits, exact also where
  # 2^e or the result is subnormal (XLA:CPU flushes those).
  y = power_of_two.ldexp(x, -exponent)
  if zero_full is not None:
    y = y + zero_full
  return fmt.encode(y, rounding=rounding, key=key)


class Grid(NamedTuple):
  """A fixed quantization grid for a tensor x of shape [*shape].

  stored/zero/tensor_scale are what a QTensor keeps; scale_full and
  zero_full are the per-element scale and zero point ([*shape]; zero_full is
  None without zero points), so that x ~ (code - zero_full) * scale_full.
  """

  stored: jax.Array
  zero: jax.Array | None
  tensor_scale: jax.Array | None
  scale_full: jax.Array
  zero_full: jax.Array | None
  # E8M0 scales without a tensor scale: the scale's exponent e per element
  # (scale = 2^e), for exact power-of-two arithmetic; else None.
  exponent_full: jax.Array | None = None
  # With a tensor scale s_t (NVFP4): the decoded block scale per element,
  # so that x / (block * s_t) rounds once (exact_ratio); else None.
  block_full: jax.Array | None = None
  # Float32 and two-level scales: per element, the power of two (0 or
  # tiny_scales.SHIFT) by which x and the scale are multiplied before they
  # are divided (nonzero where the scale is subnormal); else None.
  shift_full: jax.Array | None = None

  @property
  def two_level(self):
    if self.block_full is None:
      return None
    return self.block_full, self.tensor_scale


def block_scales(
  x,
  fmt,
  scaling: Scaling,
  clip_ratios=(),
  shrink: float = 1.0,
  tensor_scale=None,
) -> Grid:
  """The RTN grid of x: block scales (and zero points) from its statistics.

  `shrink` (MagR's beta) multiplies the step after the range is measured:
  with a zero point the grid keeps its bottom at min(x) and clips the top,
  as the MagR authors' quantizer does; symmetric grids clip both ends.
  `tensor_scale` (NVFP4's second level): given, it is used as it is instead
  of being measured from x (GPFQ's blocks measure it once, from W).

  Float32 and bfloat16 scales of blocks whose largest magnitude is below
  2^-62 (and a tensor scale of a tensor that small) are found at 2^64 times
  the block (tiny_scales), then moved back: the stored scale is that
  block's scale rounded once more onto the subnormal grid, and Grid.shift_full
  tells encode_scaled to divide at the same 2^64, so the codes are x / the
  stored scale rounded once.
  """
  shift = _tiny_shift(x, scaling, tensor_scale)
  if shift is None:
    return _block_scales(x, fmt, scaling, clip_ratios, shrink, tensor_scale)
  block, full = shift
  shifted = jnp.any(full != 0)
  up = jax.lax.cond(
    shifted, lambda: power_of_two.ldexp(x, full), lambda: jnp.asarray(x)
  )
  tensor_up = tensor_scale
  if tensor_scale is not None:
    tensor_up = power_of_two.ldexp(tensor_scale, block)
  grid = _block_scales(up, fmt, scaling, clip_ratios, shrink, tensor_up)
  stored, tensor = grid.stored, tensor_scale
  if scaling.tensor_scale:
    if tensor is None:  # measured here: moved back down
      tensor = power_of_two.ldexp(grid.tensor_scale, -block)
  else:  # float32 or bfloat16 (which holds every float32 exponent)
    down = power_of_two.ldexp(stored.astype(jnp.float32), -block)
    stored = down.astype(stored.dtype)
  if scaling.tensor_scale:
    scale_full = jax.lax.cond(
      shifted,
      lambda: power_of_two.ldexp(grid.scale_full, -full),
      lambda: grid.scale_full,
    )
  else:  # the stored scale itself, expanded
    scale_full = qtensor.expand_blocks(
      stored, x.shape, scaling.block_shape(x.shape)
    )
  return grid._replace(
    stored=stored, tensor_scale=tensor, scale_full=scale_full, shift_full=full
  )


def _tiny_shift(x, scaling: Scaling, tensor_scale):
  """(block or tensor shift, per-element shift) for float32 and bfloat16
  scales and tensor scales (tiny_scales.block_shift), or None where scales
  cannot be float32 subnormals (E8M0 is exact already; an E4M3 block scale
  is >= 2^-9; float16 cannot go below 2^-24)."""
  shape = x.shape
  if scaling.tensor_scale:
    if tensor_scale is not None:
      shift = tiny_scales.block_shift(tensor_scale)
    else:
      amax = power_of_two.magnitude_bits(x).max()
      shift = tiny_scales.block_shift(
        jax.lax.bitcast_convert_type(amax, jnp.float32)
      )
    return shift, jnp.broadcast_to(shift, shape)
  if scaling.scale_format not in ("float32", "bfloat16"):
    return None  # float16 scales underflow long before 2^-126
  block_shape = scaling.block_shape(shape)
  amax = block_reduce(power_of_two.magnitude_bits(x), block_shape, jnp.max)
  shift = tiny_scales.block_shift(
    jax.lax.bitcast_convert_type(amax, jnp.float32)
  )
  return shift, qtensor.expand_blocks(shift, shape, block_shape)


def _block_scales(x, fmt, scaling, clip_ratios, shrink, tensor_scale) -> Grid:
  """block_scales for blocks in the normal range."""
  shape = x.shape
  block_shape = scaling.block_shape(shape)
  expand = functools.partial(
    qtensor.expand_blocks, shape=shape, block_shape=block_shape
  )

  def exponent_of(stored):
    if scaling.scale_format != "e8m0" or scaling.tensor_scale:
      return None
    return expand(stored.astype(jnp.int32) - 127)

  def block_of(stored):
    if tensor_scale is None:
      return None
    return expand(qtensor.decode_scale(stored, scaling))

  if scaling.tensor_scale and tensor_scale is None:
    amax_t = jnp.max(jnp.abs(x))
    tensor_scale = divide(amax_t, element_max(fmt) * _E4M3.max)
    tensor_scale = jnp.where(tensor_scale > 0, tensor_scale, 1.0)
  if scaling.zero_point:
    lo = block_reduce(x, block_shape, jnp.min)
    hi = block_reduce(x, block_shape, jnp.max)
  else:
    amax = block_reduce(jnp.abs(x), block_shape, jnp.max)

  def candidate(r):
    if scaling.zero_point:
      lo_r, hi_r = jnp.minimum(lo * r, 0.0), jnp.maximum(hi * r, 0.0)
      # The range [lo, hi] spans qmax steps: s = (hi - lo) / qmax.
      stored, value = _scales(
        shrink * (hi_r - lo_r), fmt, scaling, tensor_scale
      )
      zero = jnp.clip(jnp.round(-lo_r / value), 0, fmt.qmax)
      zero = zero.astype(exmy.code_dtype(fmt.bits))
      return Grid(
        stored,
        zero,
        tensor_scale,
        expand(value),
        expand(zero.astype(jnp.float32)),
      )
    stored, value = _scales(shrink * amax * r, fmt, scaling, tensor_scale)
    return Grid(
      stored,
      None,
      tensor_scale,
      expand(value),
      None,
      exponent_of(stored),
      block_of(stored),
    )

  if not clip_ratios:
    return candidate(1.0)
  errors, grids = [], []
  for r in clip_ratios:
    grid = candidate(r)
    codes = _encode_with(
      x,
      fmt,
      grid.scale_full,
      grid.zero_full,
      "nearest_even",
      None,
      grid.exponent_full,
      grid.two_level,
    )
    err = jnp.square(dequantize_with(codes, fmt, grid) - x)
    errors.append(_sum_blocks(err, block_shape))
    grids.append(grid)
  best = jnp.argmin(jnp.stack(errors), axis=0)  # first minimum: larger r
  stored = jnp.choose(best, [g.stored for g in grids], mode="clip")
  zero = None
  if scaling.zero_point:
    zero = jnp.choose(best, [g.zero for g in grids], mode="clip")
  value = qtensor.decode_scale(stored, scaling)
  if tensor_scale is not None:
    value = value * tensor_scale
  zero_full = None if zero is None else expand(zero.astype(jnp.float32))
  exponent = None if zero is not None else exponent_of(stored)
  block = None if zero is not None else block_of(stored)
  return Grid(
    stored, zero, tensor_scale, expand(value), zero_full, exponent, block
  )


def encode_grid(x, fmt, grid: Grid, rounding=None, key=None) -> jax.Array:
  """Codes of x on `grid` (from block_scales, or built around a given
  scale): every exactness rule of encode_scaled applies. x: [*shape]."""
  return _encode_with(
    x,
    fmt,
    grid.scale_full,
    grid.zero_full,
    rounding,
    key,
    grid.exponent_full,
    grid.two_level,
    grid.shift_full,
  )


def dequantize_with(codes, fmt, grid: Grid) -> jax.Array:
  """(decode(codes) - zero_full) * scale_full, elementwise (subnormal
  scales and products rounded, not flushed)."""
  values = fmt.decode(codes)
  if grid.zero_full is not None:
    values = values - grid.zero_full
  if grid.exponent_full is not None:
    return power_of_two.ldexp(values, grid.exponent_full)
  if grid.shift_full is not None:
    bits = tiny_scales.value_bits(fmt, grid.zero_full is not None)
    return tiny_scales.times_scale(values, grid.scale_full, bits)
  return values * grid.scale_full


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _rtn(x, fmt, scaling: Scaling, clip_ratios, rounding, key, shrink):
  grid = block_scales(x, fmt, scaling, clip_ratios, shrink)
  rkey = key if rounding == "stochastic" else None
  codes = encode_grid(x, fmt, grid, rounding, rkey)
  packed = packing.pack(codes, fmt.bits)
  return packed, grid.stored, grid.zero, grid.tensor_scale


def rtn(
  w: jax.Array,
  fmt,
  scaling: Scaling,
  *,
  clip_ratios: tuple[float, ...] = (),
  rounding: str = "nearest_even",
  key: jax.Array | None = None,
  shrink: float = 1.0,
) -> qtensor.QTensor:
  """Round-to-nearest quantization of one weight.

  Args:
    w: [...] float weight (rank >= 1); codes are packed along its last axis.
    fmt: element format (ExMy, IntFormat, Codebook). Unsigned IntFormat needs
      `scaling.zero_point`; signed formats need it off.
    scaling: how scales are shared and stored.
    clip_ratios: ratios r to try per block (amax * r); empty = no search.
    rounding: element rounding mode; 'stochastic' needs `key`.
    key: jax.random key for stochastic rounding.
    shrink: step multiplier beta <= 1 (MagR's shrunk grid; see
      block_scales).

  Returns:
    A QTensor with w's shape and dtype.

  Raises:
    ValueError: a scalar weight, a block size that does not divide its axis,
      or a format/zero-point mismatch.
  """
  w = jnp.asarray(w)
  if w.ndim < 1:
    raise ValueError("rtn quantizes tensors of rank >= 1, got a scalar")
  if w.size == 0:
    raise ValueError(
      f"rtn got a zero-size tensor {tuple(w.shape)}: nothing to quantize"
    )
  unsigned = isinstance(fmt, integer.IntFormat) and not fmt.signed
  if unsigned != scaling.zero_point:
    raise ValueError(
      f"{fmt} with zero_point={scaling.zero_point}: unsigned integer "
      "elements need a zero point, and only they can have one"
    )
  if rounding == "stochastic" and key is None:
    raise ValueError("rounding='stochastic' needs an explicit jax.random key")
  scaling.block_shape(w.shape)  # raises on a block that does not divide
  x = qtensor.auto_axes(exmy.as_float32(w, "w"))
  parts = _rtn(
    x,
    _saturating(fmt),
    scaling,
    tuple(clip_ratios),
    rounding,
    key,
    float(shrink),
  )
  return qtensor.from_parts(parts, fmt, scaling, w)
