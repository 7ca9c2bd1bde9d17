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

_E4M3 = presets.get("float8_e4m3fn")


def _pow2(k: jax.Array, lo: int, hi: int) -> jax.Array:
  """2.0**k for int32 k known to lie in [lo, hi], built from exponent bits.

  A float32 with biased exponent k + 127 and zero fraction is exactly 2^k for
  k in [-126, 127]; wider ranges multiply two such powers (still exact,
  because each factor and the product are powers of two).
  """
  if -126 <= lo and hi <= 127:
    return jax.lax.bitcast_convert_type((k + 127) << 23, jnp.float32)
  half = k // 2  # half and k - half both lie in [lo // 2, hi // 2 + 1]
  return _pow2(half, lo // 2, hi // 2 + 1) * _pow2(
    k - half, lo // 2, hi // 2 + 1
  )


def _decode_exmy(c: jax.Array, fmt: exmy.ExMy) -> jax.Array:
  y, nb = fmt.mantissa_bits, fmt._magnitude_bits
  mag = c & ((1 << nb) - 1)
  e, m = mag >> y, mag & ((1 << y) - 1)
  top = (1 << fmt.exponent_bits) - 1
  if fmt.subnormals:
    normal = e > 0
    sig = jnp.where(normal, m | (1 << y), m)
    unit = jnp.where(normal, e, 1) - fmt.bias - y
    lo = 1 - fmt.bias - y
  else:
    sig = m | (1 << y)
    unit = e - fmt.bias - y
    lo = -fmt.bias - y
  value = sig.astype(jnp.float32) * _pow2(unit, lo, top - fmt.bias - y)
  if fmt.signed:
    sign = (c >> nb) & 1
    value = jnp.where(sign == 1, -value, value)
  else:
    sign = None
  nan = jnp.float32(jnp.nan)
  if fmt.special == "ieee":
    is_top = e == top
    value = jnp.where(is_top & (m == 0), value * jnp.float32(jnp.inf), value)
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
