"""Unpacking one kernel tile: byte planes -> 8 decoded column slices.

Shared by the Triton and Mosaic kernels. A tile's b byte planes (int32
[rows, w], see qjax.kernels.layout) hold 8 codes per group; code j is
gathered from its bits in every power-of-two plane (the packing's layout),
then decoded. Slot j is the output columns [j * w, (j + 1) * w) of the tile.
"""

import jax
import jax.numpy as jnp

from qjax.formats import packing
from qjax.kernels import decode

SLOTS = packing.GROUP  # codes per group: 8 column slices per tile


def slot_codes(byte_tiles, j: int, bits: int) -> jax.Array:
  """Code j of every group: int32 [rows, w] from b int32 [rows, w] planes."""
  code = None
  start, shift = 0, bits
  for p in packing.planes(bits):
    shift -= p
    per_byte = 8 // p
    piece = (byte_tiles[start + j // per_byte] >> ((j % per_byte) * p)) & (
      (1 << p) - 1
    )
    if shift:
      piece = piece << shift
    code = piece if code is None else code | piece
    start += p
  return code


def slot_values(byte_tiles, j: int, fmt, zero=None) -> jax.Array:
  """Decoded float32 [rows, w] of slot j, minus its zero point if any."""
  values = decode.decode(slot_codes(byte_tiles, j, fmt.bits), fmt)
  if zero is not None:
    # Through int32: older Mosaic (jax 0.9) has no uint8 -> float32 cast.
    values = values - zero.astype(jnp.int32).astype(jnp.float32)
  return values


def mma_dtype(x_dtype) -> jnp.dtype:
  """The MMA operand dtype: bfloat16/float16 activations keep theirs."""
  if x_dtype in (jnp.bfloat16, jnp.float16):
    return jnp.dtype(x_dtype)
  return jnp.dtype(jnp.float32)


def dot(x: jax.Array, w: jax.Array) -> jax.Array:
  """x @ w with float32 accumulation; float32 operands at full precision."""
  precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
  return jax.lax.dot(
    x,
    w.astype(x.dtype),
    precision=precision,
    preferred_element_type=jnp.float32,
  )


def pad_activations(x: jax.Array, pw, tile_m: int) -> jax.Array:
  """x [M, K] -> [Mp, Kp] zero-padded to tile_m rows and the weight's Kp.

  Raises ValueError when x's K is not the weight's.
  """
  m, k = x.shape
  if k != pw.shape[0]:
    raise ValueError(f"x has K={k}, the weight has K={pw.shape[0]}")
  kp = pw.padded_shape[0]
  mp = -(-m // tile_m) * tile_m
  return jnp.pad(x, ((0, mp - m), (0, kp - k)))


def split_refs(refs, bits: int, has_zero: bool):
  """Kernel refs after x -> (planes, scale_ref, zero_ref or None, rest)."""
  planes, rest = refs[:bits], refs[bits:]
  zero_ref = rest[1] if has_zero else None
  return planes, rest[0], zero_ref, rest[1 + has_zero :]
