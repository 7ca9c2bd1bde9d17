"""x / (c * b) rounded onto a float grid exactly, in float32 arithmetic.

NVFP4's two-level scale divides twice: a block scale is
e4m3(amax_b / (6 * s_t)) and an element is e2m1(w / (s_b * s_t)). In float32
each division (and the product s_b * s_t) rounds once before the grid rounds
again, so a value that lies on or next to a midpoint of the grid can round
the wrong way. Weights stored in bfloat16 have 8-bit significands and make
exact midpoints common: on SmolLM2, 3,397 of 6.6M block scales differed from
the correctly rounded ones.

`nearest_magnitude_code` takes the float32 estimate's code (at most one step
off) and settles it by comparing x with the exact products c * mid * b at the
two neighbouring midpoints: b is split into two halves of 12 significant
bits, so each partial product of a short c * mid with a half is exact, and
x - hi is exact where it matters (Sterbenz). Ties go to the even code.

Limits: x, c * mid * b and their differences must be float32 normals
(XLA:CPU flushes subnormals); NVFP4 weights above ~1e-30 satisfy this.
"""

import math

import jax
import jax.numpy as jnp

from qjax.formats import exmy

# c * mid must fit 12 significant bits so that its products with the
# 12-bit halves of b fit float32's 24.
_HALF_BITS = 12


def significant_bits(value: float) -> int:
  """Significant bits of a finite float (0 for zero)."""
  if value == 0:
    return 0
  n = int(abs(math.frexp(value)[0]) * 2**53)
  n >>= (n & -n).bit_length() - 1  # drop trailing zeros
  return n.bit_length()


def _split(b: jax.Array):
  bits = jax.lax.bitcast_convert_type(b, jnp.uint32)
  hi = jax.lax.bitcast_convert_type(bits & jnp.uint32(0xFFFFF000), jnp.float32)
  return hi, b - hi  # both halves have at most 12 significant bits


def compare_product(x: jax.Array, a: jax.Array, b: jax.Array):
  """(x > a * b, x == a * b) exactly, for x, a, b >= 0 float32 with `a` of
  at most 12 significant bits (shapes broadcast)."""
  hi, lo = _split(b)
  p_hi, p_lo = a * hi, a * lo  # exact
  # Within a factor 2 of p_hi, x - p_hi is exact; farther away, |x - p_hi|
  # exceeds p_lo (< 2^-11 p_hi) and the comparison is decided anyway.
  d = x - p_hi
  return d > p_lo, d == p_lo


def fits(c_bits: int, fmt: exmy.ExMy) -> bool:
  """Whether a c of `c_bits` significant bits times a midpoint of `fmt`
  fits the 12 bits the exact comparison needs (E4M3 block scales with E2M1
  to E5M6-wide elements do; wider ones keep float32 division)."""
  return c_bits + fmt.mantissa_bits + 2 <= _HALF_BITS


def nearest_magnitude_code(
  x: jax.Array, c, c_bits: int, b: jax.Array, fmt: exmy.ExMy, code
) -> jax.Array:
  """The magnitude code of `fmt` nearest to x / (c * b), ties to even.

  Args:
    x: [...] float32 >= 0, the numerators.
    c: float32 >= 0 (broadcast to x) of at most `c_bits` significant bits:
      the element format's max (6 for NVFP4's block scale) or a decoded
      block scale (4 bits for E4M3); `fits(c_bits, fmt)` must hold.
    b: float32 > 0 (broadcast to x), any value: the tensor scale.
    fmt: the target grid (sign-magnitude; finite codes 0..max_magnitude_code).
    code: [...] the float32 estimate's magnitude code, at most one step off.

  Returns:
    [...] corrected magnitude codes, saturating at fmt.max_magnitude_code.
  """
  if not fits(c_bits, fmt):
    raise ValueError(
      f"exact rounding onto {fmt}: a {c_bits}-bit c times a midpoint "
      f"needs {c_bits + fmt.mantissa_bits + 2} > {_HALF_BITS} bits"
    )
  top = fmt.max_magnitude_code
  code = code.astype(jnp.int32)
  as_codes = lambda k: k.astype(exmy.code_dtype(fmt.bits))  # noqa: E731
  value = fmt.decode(as_codes(code))
  up = fmt.decode(as_codes(jnp.minimum(code + 1, top)))
  down = fmt.decode(as_codes(jnp.maximum(code - 1, 0)))
  c = jnp.asarray(c, jnp.float32)
  # Sums of two neighbouring grid values and halving are exact.
  above, at_up = compare_product(x, c * ((value + up) * 0.5), b)
  over, at_down = compare_product(x, c * ((down + value) * 0.5), b)
  odd = (code & 1) == 1
  go_up = (code < top) & (above | (at_up & odd))
  go_down = (code > 0) & ((~over & ~at_down) | (at_down & odd))
  return code + go_up.astype(jnp.int32) - go_down.astype(jnp.int32)


def round_ratio(x: jax.Array, c, c_bits: int, b, fmt: exmy.ExMy) -> jax.Array:
  """codes of fmt (with sign) of x / (c * b), correctly rounded to nearest
  even; saturating. x: [...] float32 any sign; c, b > 0 broadcast to x;
  c_bits as in nearest_magnitude_code."""
  estimate = fmt.encode(x / (c * b))
  sign_bit = (1 << (fmt.bits - 1)) if fmt.signed else 0
  magnitude = estimate.astype(jnp.int32) & ~sign_bit
  sign = estimate.astype(jnp.int32) & sign_bit
  exact = nearest_magnitude_code(jnp.abs(x), c, c_bits, b, fmt, magnitude)
  return (sign | exact).astype(estimate.dtype)
