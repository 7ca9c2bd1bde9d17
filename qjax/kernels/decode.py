"""Code -> float32 decoding written for kernel bodies (Triton and Mosaic).

The formats' own decoders (qjax.formats) use `clz`, gathers and unsigned
32-bit lanes, which Pallas backends do not all lower. These use only int32
shifts, masks, compares, selects, an int32 -> float32 bitcast and float32
multiplies, and give the same float32 bits as `fmt.decode` for every code
(tests/kernels/decode_test.py checks all codes of every format).
"""

import jax
import jax.numpy as jnp

from qjax.formats import exmy, integer, presets

_E4M3 = presets.PRESETS["float8_e4m3fn"]


def _decode_exmy(c: jax.Array, fmt: exmy.ExMy) -> jax.Array:
  # Normal codes compose the float32 bits directly (exact everywhere, also
  # where a backend flushes subnormal arithmetic). Codes below float32's
  # normal range (e8m0's 2^-127) shift the significand into a float32
  # subnormal.
  y, nb = fmt.mantissa_bits, fmt._magnitude_bits
  mag = c & ((1 << nb) - 1)
  e, m = mag >> y, mag & ((1 << y) - 1)
  top = (1 << fmt.exponent_bits) - 1
  out_exp = e - fmt.bias + 127
  bits = (out_exp << 23) | (m << (23 - y))
  lowest_normal_e = 1 if fmt.subnormals else 0
  if lowest_normal_e - fmt.bias + 127 < 1:  # float32 subnormals among them
    shift = jnp.clip(e - fmt.bias - y + 149, 0, 31)
    bits = jnp.where(out_exp >= 1, bits, (m | (1 << y)) << shift)
  value = jax.lax.bitcast_convert_type(bits, jnp.float32)
  if fmt.subnormals:
    if fmt.bias >= 127:  # every subnormal is a float32 subnormal
      sub_bits = m << (1 - fmt.bias - y + 149)
      sub = jax.lax.bitcast_convert_type(sub_bits, jnp.float32)
    else:  # exact float32 normals: m * 2^(1 - bias - y)
      sub = m.astype(jnp.float32) * jnp.float32(2.0 ** (1 - fmt.bias - y))
    value = jnp.where(e == 0, sub, value)
  if fmt.signed:
    sign = (c >> nb) & 1
    value = jnp.where(sign == 1, -value, value)
  else:
    sign = None
  nan = jnp.float32(jnp.nan)
  if fmt.special == "ieee":
    is_top = e == top
    inf = (
      jnp.where(sign == 1, -jnp.inf, jnp.inf) if sign is not None else jnp.inf
    )
    value = jnp.where(is_top & (m == 0), jnp.float32(1) * inf, value)
    value = jnp.where(is_top & (m != 0), nan, value)
  elif fmt.special == "fn":
    value = jnp.where(mag == (1 << nb) - 1, nan, value)
  elif fmt.special == "fnuz" and sign is not None:
    value = jnp.where((sign == 1) & (mag == 0), nan, value)
  return value


def _decode_int(c: jax.Array, fmt: integer.IntFormat) -> jax.Array:
  k = c & ((1 << fmt.bits) - 1)
  if fmt.signed:
    k = jnp.where(k >= 2 ** (fmt.bits - 1), k - 2**fmt.bits, k)
  return k.astype(jnp.float32) * jnp.float32(2.0**fmt.step_exponent)


def _decode_codebook(c: jax.Array, book: integer.Codebook) -> jax.Array:
  # A select chain instead of a gather: Triton and Mosaic have no gather of
  # a register tile from a table. 16 selects for NF4.
  value = jnp.full(c.shape, book.table[0], jnp.float32)
  for i, t in enumerate(book.table[1:], start=1):
    value = jnp.where(c == i, jnp.float32(t), value)
  return value


def decode(codes: jax.Array, fmt) -> jax.Array:
  """int32 codes (any shape) -> float32 values, bit-equal to fmt.decode."""
  c = codes.astype(jnp.int32)
  if isinstance(fmt, exmy.ExMy):
    return _decode_exmy(c, fmt)
  if isinstance(fmt, integer.IntFormat):
    return _decode_int(c, fmt)
  if isinstance(fmt, integer.Codebook):
    return _decode_codebook(c, fmt)
  raise TypeError(f"no kernel decoder for {fmt!r}")


def decode_scale(stored: jax.Array, scale_format: str) -> jax.Array:
  """Stored scales -> float32, as qjax.qtensor.decode_scale does."""
  if scale_format == "e8m0":
    c = stored.astype(jnp.int32)
    value = jax.lax.bitcast_convert_type(c << 23, jnp.float32)
    value = jnp.where(c == 0, jnp.float32(2.0**-127), value)
    return jnp.where(c == 255, jnp.float32(jnp.nan), value)
  if scale_format == "float8_e4m3fn":
    return _decode_exmy(stored.astype(jnp.int32), _E4M3)
  return stored.astype(jnp.float32)
