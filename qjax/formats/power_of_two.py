"""x * 2^n for float32 x, correctly rounded, in integer arithmetic.

XLA:CPU flushes float32 subnormals to zero in arithmetic (inputs and
results), so x / 2^127 of an E8M0 block scale, or a decoded value times a
scale of 2^-127 (itself subnormal), comes out 0 where the format holds a
nonzero value. `ldexp` moves the exponent field instead: subnormal inputs
are read exactly, subnormal results are rounded to nearest even from the
bits shifted out, overflow gives +-inf, and zeros, infinities and NaNs pass
through.
"""

import jax
import jax.numpy as jnp

_SIGN = jnp.uint32(0x80000000)
_MANTISSA = jnp.uint32(0x7FFFFF)
_IMPLICIT = 0x800000


def ldexp(x: jax.Array, n: jax.Array, side=None) -> jax.Array:
  """x * 2^n, elementwise (x float32, n integer; broadcast together).

  Equals numpy.ldexp on float32 for every x and every n in [-300, 300]
  (tests/formats/power_of_two_test.py checks all exponents).

  side: optional int (broadcast), for an x that is a value v rounded to
  float32: the sign of v - x. A subnormal result that lands exactly halfway
  between two subnormals then rounds towards v instead of to even, so the
  result is v rounded once, not twice (|v - x| is below half an ulp of x).
  """
  x = jnp.asarray(x, jnp.float32)
  n = jnp.clip(jnp.asarray(n, jnp.int32), -300, 300)
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  sign = bits & _SIGN
  field = ((bits >> 23) & 0xFF).astype(jnp.int32)
  mantissa = (bits & _MANTISSA).astype(jnp.int32)
  special = (field == 255) | ((field == 0) & (mantissa == 0))
  # The significand with its leading one at bit 23, and the exponent that
  # goes with it (a subnormal is normalised first).
  sig = jnp.where(field == 0, mantissa, mantissa | _IMPLICIT)
  lead = jax.lax.clz(sig.astype(jnp.uint32)).astype(jnp.int32) - 8
  sig = jnp.where(field == 0, sig << jnp.maximum(lead, 0), sig)
  exp = jnp.where(field == 0, 1 - lead, field) + n
  normal = (sign | (exp.astype(jnp.uint32) << 23)) | (
    sig.astype(jnp.uint32) & _MANTISSA
  )
  # Below the normal range: shift right by 1 - exp and round to nearest
  # even; a carry into bit 23 makes the smallest normal, as it should.
  shift = jnp.clip(1 - exp, 1, 31).astype(jnp.uint32)
  usig = sig.astype(jnp.uint32)
  kept = usig >> shift
  rest = usig & ((jnp.uint32(1) << shift) - 1)
  half = jnp.uint32(1) << (shift - 1)
  odd = (kept & 1) == 1
  if side is not None:
    side = jnp.asarray(side)
    odd = jnp.where(side > 0, True, jnp.where(side < 0, False, odd))
  up = (rest > half) | ((rest == half) & odd)
  tiny = sign | (kept + up.astype(jnp.uint32))
  out = jnp.where(exp >= 1, normal, tiny)
  out = jnp.where(exp >= 255, sign | jnp.uint32(0x7F800000), out)
  out = jnp.where(special, bits, out)
  return jax.lax.bitcast_convert_type(out, jnp.float32)


def magnitude_bits(x: jax.Array) -> jax.Array:
  """The bits of |x| as uint32: they order like the values for every
  non-negative float32, subnormals included (XLA:CPU's float compare reads
  a subnormal as 0)."""
  bits = jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.uint32)
  return bits & jnp.uint32(0x7FFFFFFF)


def below(x: jax.Array, exponent: int) -> jax.Array:
  """|x| < 2^exponent on the bits; False for NaN. exponent: a normal
  float32 exponent (-126..127)."""
  return magnitude_bits(x) < jnp.uint32((exponent + 127) << 23)


def is_zero(x: jax.Array) -> jax.Array:
  """x == +-0 on the bits (a subnormal is not zero here)."""
  return magnitude_bits(x) == 0
