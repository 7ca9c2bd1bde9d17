"""Rounding an unsigned integer significand at a bit position.

Every format in qjax ends in the same step: a non-negative significand `sig`
(uint32) must lose its low `shift` bits. Working on magnitudes in uint32 keeps
the step exact (no float arithmetic, so no denormal flushing on XLA:CPU and no
constant folding of magic-number tricks) and makes every mode symmetric in the
sign, which sign-magnitude formats need.
"""

from typing import Literal

import jax
import jax.numpy as jnp

Rounding = Literal["nearest_even", "nearest_away", "toward_zero", "stochastic"]
ROUNDING_MODES = ("nearest_even", "nearest_away", "toward_zero", "stochastic")


def check_rounding(rounding: str, key: jax.Array | None) -> None:
  """Raises ValueError for an unknown mode or a stochastic call without key."""
  if rounding not in ROUNDING_MODES:
    raise ValueError(
      f"rounding={rounding!r} is not one of {', '.join(ROUNDING_MODES)}"
    )
  if rounding == "stochastic" and key is None:
    raise ValueError("rounding='stochastic' needs an explicit jax.random key")


def random_bits(key: jax.Array | None, shape) -> jax.Array | None:
  """uint32 random bits for stochastic rounding, or None without a key."""
  if key is None:
    return None
  return jax.random.bits(key, shape, jnp.uint32)


def round_shift(
  sig: jax.Array,
  shift: jax.Array,
  rounding: str,
  rbits: jax.Array | None = None,
  parity_offset: jax.Array | int = 0,
) -> jax.Array:
  """Returns round(sig / 2**shift) as uint32.

  Args:
    sig: uint32 significands; sig < 2**24 so that sums below cannot wrap.
    shift: uint32 bit counts in [0, 31], broadcastable to `sig`.
    rounding: one of ROUNDING_MODES (ties of `nearest_away` go up in
      magnitude; `stochastic` rounds up with probability equal to the
      discarded fraction).
    rbits: uint32 random bits of sig's shape, for `stochastic`.
    parity_offset: added to the truncated q before the even test of
      `nearest_even`, for formats whose code parity is not q's (with no
      mantissa bits the tie goes to the even exponent).
  """
  one = jnp.uint32(1)
  mask = (one << shift) - one  # shift=0 gives mask 0: nothing is discarded.
  q = sig >> shift
  rem = sig & mask
  if rounding == "toward_zero":
    return q
  if rounding == "stochastic":
    return (sig + (rbits & mask)) >> shift
  half = jnp.where(shift > 0, one << (shift - one), jnp.uint32(0))
  if rounding == "nearest_away":
    up = (rem >= half) & (shift > 0)
  else:  # nearest_even
    odd = ((q + parity_offset) & one) == one
    up = (rem > half) | ((rem == half) & (shift > 0) & odd)
  return q + up.astype(jnp.uint32)
