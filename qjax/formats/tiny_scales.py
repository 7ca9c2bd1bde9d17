"""Float32 scales and values below the normal range, without flushing.

XLA:CPU reads float32 subnormals as zero and flushes subnormal results, so
a block whose values or scale lie below 2^-126 quantized to zeros (and a
subnormal scale dequantized to zeros) where the grid holds nonzero values.
Multiplying by a power of two is exact (power_of_two.ldexp works on the
bits), so such a block is worked at 2^64 times its size, where everything
is normal, and only the stored scale and the dequantized values are moved
back down, each rounded once to the subnormal grid.

  SHIFT            the power of two used (64).
  block_shift      per block: SHIFT where the block's largest magnitude is
                   nonzero and below 2^-62 (so scales and ratios stay normal
                   when shifted), else 0.
  times_scale      values * scale, also where scale or the product is
                   subnormal.
  times_two_level  values * (block * tensor scale), also where the tensor
                   scale is subnormal.
"""

import jax
import jax.numpy as jnp

from qjax.formats import exact_ratio, power_of_two

SHIFT = 64
_TINY_EXPONENT = -62  # 2^-62 * 2^64 = 4: ratios to emax stay normal
# compare_product's exact test needs values of at most this many bits.
_EXACT_VALUE_BITS = 12


def tiny(x: jax.Array) -> jax.Array:
  """Nonzero |x| < 2^-62, on the bits (subnormals count by value)."""
  return power_of_two.below(x, _TINY_EXPONENT) & ~power_of_two.is_zero(x)


def block_shift(amax: jax.Array) -> jax.Array:
  """int32 shifts (SHIFT or 0) for blocks of largest magnitude `amax`."""
  return jnp.where(tiny(amax), SHIFT, 0).astype(jnp.int32)


def times_scale(values: jax.Array, scale: jax.Array, value_bits: int):
  """values * scale in float32, rounded once also where the scale or the
  product is subnormal (shapes broadcast).

  Where the scale is tiny the product is taken at scale * 2^64 and moved
  back down; with values of at most 12 significant bits (`value_bits`:
  element codes minus zero points of most formats) the exact product
  decides a result halfway between two subnormals, so it rounds once.
  Wider values (codebooks) round twice there. Products that are subnormal
  with a normal scale (elements below 2^-64 of the grid's range) still
  flush.
  """
  values = jnp.asarray(values, jnp.float32)
  scale = jnp.asarray(scale, jnp.float32)

  def exact(values, scale):
    shift = block_shift(scale)
    up = power_of_two.ldexp(scale, shift)
    product = values * up
    side = None
    if value_bits <= _EXACT_VALUE_BITS:
      above, equal = exact_ratio.compare_product(
        jnp.abs(product), jnp.abs(values), jnp.broadcast_to(up, product.shape)
      )
      magnitude_side = jnp.where(equal, 0, jnp.where(above, -1, 1))
      side = jnp.where(values < 0, -magnitude_side, magnitude_side)
    return power_of_two.ldexp(product, -shift, side)

  def fast(values, scale):
    return values * scale

  shape = jnp.broadcast_shapes(values.shape, scale.shape)
  values = jnp.broadcast_to(values, shape)
  scale = jnp.broadcast_to(scale, shape)
  return jax.lax.cond(jnp.any(tiny(scale)), exact, fast, values, scale)


def times_two_level(values, block, tensor_scale):
  """values * (block * tensor_scale) as float32 rounds it in the normal
  range (the product of the scales, then the value), also where the tensor
  scale is subnormal: there it is taken at 2^64 and the result moved back
  down. values and block broadcast; tensor_scale is a scalar."""
  shift = block_shift(tensor_scale)

  def exact(values, block):
    up = block * power_of_two.ldexp(tensor_scale, shift)
    return power_of_two.ldexp(values * up, -shift)

  def fast(values, block):
    return values * (block * tensor_scale)

  shape = jnp.broadcast_shapes(jnp.shape(values), jnp.shape(block))
  values = jnp.broadcast_to(jnp.asarray(values, jnp.float32), shape)
  block = jnp.broadcast_to(jnp.asarray(block, jnp.float32), shape)
  return jax.lax.cond(shift != 0, exact, fast, values, block)


def value_bits(fmt, zero_point: bool) -> int:
  """Significant bits of fmt's decoded values (minus a zero point)."""
  mantissa = getattr(fmt, "mantissa_bits", None)
  if mantissa is not None:
    return mantissa + 1
  if hasattr(fmt, "qmax"):  # IntFormat: k - zero spans bits + 1 bits
    return fmt.bits + int(zero_point)
  return 24  # a codebook's float32 entries
