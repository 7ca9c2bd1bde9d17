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


def ldexp(x: jax.Array, n: jax.Array) -> jax.Array:
  """x * 2^n, elementwise (x float32, n integer; broadcast together).

  Equals numpy.ldexp on float32 for every x and every n in [-300, 300]
  (tests/formats/power_of_two_test.py checks all exponents).
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
  up = (rest > half) | ((rest == half) & ((kept & 1) == 1))
  tiny = sign | (kept + up.astype(jnp.uint32))
  out = jnp.where(exp >= 1, normal, tiny)
  out = jnp.where(exp >= 255, sign | jnp.uint32(0x7F800000), out)
  out = jnp.where(special, bits, out)
  return jax.lax.bitcast_convert_type(out, jnp.float32)
