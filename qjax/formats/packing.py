"""Dense bit packing of b-bit codes (b = 1..16) into uint8, along the last axis.

n codes of b bits take exactly ceil(n * b / 8) bytes.

Layout. Codes go in groups of 8; a group of 8 b-bit codes fills exactly b
bytes, so group g starts at byte g * b and slicing (or sharding) the last axis
at multiples of 8 codes is a plain byte slice at multiples of b bytes.
Inside a group, b is split high bits first into power-of-two planes
(8-bit planes, then 4, 2, 1: 3 = 2+1, 6 = 4+2, 12 = 8+4). A p-bit plane holds
8/p codes per byte, code j at bits (j mod 8/p)*p, so no code straddles a byte
and unpacking a plane is one shift and mask. The planes follow one another.
The last n mod 8 codes (the tail) are one little-endian bit stream: tail code
j is bits [j*b, (j+1)*b) of the tail bytes, bit i in byte i // 8 at i % 8.

Worked example, b = 3, codes 5 0 7 2 3 6 1 4 (one group, 3 bytes):
  2-bit plane (c >> 1):  2 0 3 1 | 1 3 0 2  -> bytes 0x72 0x8D
  1-bit plane (c & 1):   1 0 1 0 1 0 1 0    -> byte  0x55
  packed: 72 8D 55.  Nine codes add a tail of one code in one more byte.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qjax.formats.exmy import code_dtype

GROUP = 8  # codes per byte-aligned group


def planes(bits: int) -> tuple[int, ...]:
  """Plane widths of a group, high bits first: planes(11) == (8, 2, 1)."""
  _check_bits(bits)
  widths = [8] * (bits // 8)
  for p in (4, 2, 1):
    if bits % 8 & p:
      widths.append(p)
  return tuple(widths)


def packed_size(n: int, bits: int) -> int:
  """Bytes that n codes of `bits` bits take: ceil(n * bits / 8)."""
  _check_bits(bits)
  return -(-n * bits // 8)


def _check_bits(bits: int) -> None:
  if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 16:
    raise ValueError(f"bits must be an int in 1..16, got {bits!r}")


def _check_codes(codes, bits: int) -> None:
  dtype = np.dtype(codes.dtype)
  if not jnp.issubdtype(dtype, jnp.unsignedinteger):
    raise TypeError(f"codes must be an unsigned integer array, got {dtype}")
  if isinstance(codes, jax.core.Tracer) or codes.size == 0:
    return  # under jit the range check is the caller's (see pack's doc)
  top = int(np.max(np.asarray(codes)))
  if top >= 2**bits:
    raise ValueError(
      f"code {top} does not fit in {bits} bits (max {2**bits - 1})"
    )


def pack(codes: jax.Array, bits: int) -> jax.Array:
  """Packs b-bit codes along the last axis.

  Args:
    codes: [..., n] unsigned integers, each < 2**bits.
    bits: b in 1..16.

  Returns:
    [..., ceil(n * b / 8)] uint8, in the layout of the module docstring.

  Raises:
    TypeError: codes are not unsigned integers.
    ValueError: bits out of range, or (when codes are concrete, i.e. outside
      jit) a code does not fit in `bits`. Under jit, high bits of too-large
      codes would be lost, so validate before tracing.
  """
  _check_bits(bits)
  _check_codes(codes, bits)
  return _pack(jnp.asarray(codes), bits)


def unpack(packed: jax.Array, bits: int, n: int) -> jax.Array:
  """Inverse of `pack`: [..., ceil(n*b/8)] uint8 -> [..., n] codes.

  Codes come back in the smallest unsigned dtype of `bits` (uint8 or uint16).
  """
  _check_bits(bits)
  packed = jnp.asarray(packed)
  if packed.dtype != jnp.uint8:
    raise TypeError(f"packed must be uint8, got {packed.dtype}")
  if packed.shape[-1] != packed_size(n, bits):
    raise ValueError(
      f"packed has {packed.shape[-1]} bytes on its last axis; {n} codes of "
      f"{bits} bits take {packed_size(n, bits)}"
    )
  return _unpack(packed, bits, n)


def _work_dtype(bits: int):
  # Narrowest lane that holds a code: less memory traffic than uint32.
  return jnp.uint8 if bits <= 8 else jnp.uint16


@functools.partial(jax.jit, static_argnums=(1,))
def _pack(codes: jax.Array, bits: int) -> jax.Array:
  *lead, n = codes.shape
  full = n // GROUP
  dtype = _work_dtype(bits)
  c = codes.astype(dtype)
  parts = []
  if full and bits < 8:
    group = codes[..., : full * GROUP].reshape(*lead, full, GROUP)
    parts = [_pack_words(group, bits).reshape(*lead, full * bits)]
  elif full:
    group = c[..., : full * GROUP].reshape(*lead, full, GROUP)
    columns = []  # one per output byte of a group; each fuses into one loop
    shift = bits
    for p in planes(bits):
      shift -= p
      per_byte = 8 // p
      for k in range(p):
        byte = None
        for i in range(per_byte):
          piece = (group[..., k * per_byte + i] >> shift) & ((1 << p) - 1)
          piece = piece.astype(jnp.uint8) << (i * p)
          byte = piece if byte is None else byte | piece
        columns.append(byte)
    parts = [jnp.stack(columns, axis=-1).reshape(*lead, full * bits)]
  tail = n - full * GROUP
  if tail:
    parts.append(_pack_stream(c[..., full * GROUP :].astype(jnp.uint32), bits))
  if not parts:
    return jnp.zeros((*lead, 0), jnp.uint8)
  return jnp.concatenate(parts, axis=-1)


# Below 8 bits a group of 8 codes packs into at most 7 bytes. The fast paths
# for that case are shaped for XLA:CPU, as measured with benchmarks/formats.py:
# - Each pass is one reduction over a group's 8 codes, or one elementwise
#   map; the column-by-column form above builds its output by concatenating
#   columns, which XLA:CPU does not vectorise.
# - Optimization barriers keep the passes apart. Fused, XLA:CPU recomputes
#   the reduction for every output byte or code (2-3x slower).
# - Plane shifts are written as iota * p. Given as constant arrays, they stop
#   XLA:CPU from vectorising the loop.
_WORD_BYTES = 4  # up to 4 bytes: one reduction per byte; 5-7: two words


def _plane_words(bits: int):
  """Per plane: (shift in the code, width p, word, bit offset in the word)."""
  offset, shift = 0, bits
  for p in planes(bits):
    shift -= p
    yield shift, p, offset // _WORD_BYTES, 8 * (offset % _WORD_BYTES)
    offset += p


def _or_reduce_last(terms):
  """ORs each [..., 8] array of `terms` over its last axis, in one pass."""
  zero = tuple(jnp.zeros((), t.dtype) for t in terms)
  return jax.lax.reduce(
    tuple(terms),
    zero,
    lambda a, b: tuple(x | y for x, y in zip(a, b, strict=True)),
    (terms[0].ndim - 1,),
  )


def _pack_words(group: jax.Array, bits: int) -> jax.Array:
  """[..., full, 8] codes (bits < 8) -> [..., full, bits] uint8."""
  j = jnp.arange(GROUP, dtype=jnp.uint32)  # code j of a p-bit plane: bit j*p
  if bits <= _WORD_BYTES:
    # One reduction per output byte, each keeping its plane's codes.
    g, j = group.astype(jnp.uint8), j.astype(jnp.uint8)
    terms, shift = [], bits
    for p in planes(bits):
      shift -= p
      per_byte = 8 // p
      v = ((g >> shift) & ((1 << p) - 1)) << ((j % per_byte) * p)
      terms += [jnp.where(j // per_byte == k, v, 0) for k in range(p)]
    byte_columns = jax.lax.optimization_barrier(_or_reduce_last(terms))
    return jnp.stack(byte_columns, axis=-1)
  # Two 32-bit words per group (no plane straddles them: the only 4-byte
  # plane comes first), then their bytes.
  u32 = jnp.uint32
  g = group.astype(u32)
  terms = [None, None]
  for shift, p, word, base in _plane_words(bits):
    t = (((g >> shift) & u32((1 << p) - 1)) << (j * u32(p))) << u32(base)
    terms[word] = t if terms[word] is None else terms[word] | t
  words = _or_reduce_last(terms)
  k = jnp.arange(_WORD_BYTES, dtype=u32)
  pieces = []
  for w, width in enumerate((_WORD_BYTES, bits - _WORD_BYTES)):
    byte = (words[w][..., None] >> (u32(8) * k[:width])) & u32(0xFF)
    pieces.append(byte.astype(jnp.uint8))
  return jnp.concatenate(jax.lax.optimization_barrier(pieces), axis=-1)


def _unpack_words(body: jax.Array, bits: int) -> jax.Array:
  """[..., full, bits] uint8 (bits < 8) -> [..., full, 8] uint8 codes."""
  u32 = jnp.uint32
  words = []
  for w in range(-(-bits // _WORD_BYTES)):
    acc = None
    for k in range(_WORD_BYTES * w, min(_WORD_BYTES * (w + 1), bits)):
      t = body[..., k].astype(u32) << u32(8 * (k % _WORD_BYTES))
      acc = t if acc is None else acc | t
    words.append(acc)
  words = jax.lax.optimization_barrier(words)
  j = jnp.arange(GROUP, dtype=u32)
  code = None
  for shift, p, word, base in _plane_words(bits):
    plane = (words[word] >> u32(base))[..., None] >> (j * u32(p))
    t = (plane & u32((1 << p) - 1)) << u32(shift)
    code = t if code is None else code | t
  return code.astype(jnp.uint8)


def _pack_stream(c: jax.Array, bits: int) -> jax.Array:
  """Little-endian bit stream of the (< 8) tail codes."""
  t = c.shape[-1]
  out = []
  for byte in range(packed_size(t, bits)):
    acc = jnp.zeros(c.shape[:-1], jnp.uint32)
    for j in range(t):
      lo, hi = j * bits, (j + 1) * bits  # bit range of code j
      start, stop = max(lo, 8 * byte), min(hi, 8 * byte + 8)
      if start >= stop:
        continue
      piece = (c[..., j] >> (start - lo)) & ((1 << (stop - start)) - 1)
      acc = acc | (piece << (start - 8 * byte))
    out.append(acc.astype(jnp.uint8))
  return jnp.stack(out, axis=-1)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _unpack(packed: jax.Array, bits: int, n: int) -> jax.Array:
  *lead, _ = packed.shape
  full = n // GROUP
  dtype = code_dtype(bits)
  parts = []
  if full and bits < 8:
    body = packed[..., : full * bits].reshape(*lead, full, bits)
    parts.append(_unpack_words(body, bits).reshape(*lead, full * GROUP))
  elif full:
    body = packed[..., : full * bits].reshape(*lead, full, bits)
    columns = []  # code j of every group, gathered from its planes
    for j in range(GROUP):
      code = None
      start, shift = 0, bits
      for p in planes(bits):
        shift -= p
        per_byte = 8 // p
        byte = body[..., start + j // per_byte]
        piece = (byte >> ((j % per_byte) * p)) & ((1 << p) - 1)
        piece = piece.astype(dtype) << shift
        code = piece if code is None else code | piece
        start += p
      columns.append(code)
    parts.append(jnp.stack(columns, axis=-1).reshape(*lead, full * GROUP))
  tail = n - full * GROUP
  if tail:
    stream = packed[..., full * bits :].astype(jnp.uint32)
    parts.append(_unpack_stream(stream, bits, tail).astype(dtype))
  if not parts:
    return jnp.zeros((*lead, 0), dtype)
  return jnp.concatenate(parts, axis=-1)


def _unpack_stream(b: jax.Array, bits: int, t: int) -> jax.Array:
  out = []
  for j in range(t):
    lo, hi = j * bits, (j + 1) * bits
    acc = jnp.zeros(b.shape[:-1], jnp.uint32)
    for byte in range(lo // 8, (hi - 1) // 8 + 1):
      start, stop = max(lo, 8 * byte), min(hi, 8 * byte + 8)
      piece = (b[..., byte] >> (start - 8 * byte)) & ((1 << (stop - start)) - 1)
      acc = acc | (piece << (start - lo))
    out.append(acc)
  return jnp.stack(out, axis=-1)
