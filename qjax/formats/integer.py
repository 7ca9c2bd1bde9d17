"""Integer grids and codebooks, with the same interface as ExMy.

IntFormat(bits, signed) is the grid k * 2^step_exponent:
  signed     k in [-2^(b-1), 2^(b-1) - 1], codes are b-bit two's complement;
             `symmetric=True` never emits -2^(b-1) (the grid is +-(2^(b-1)-1)),
             but decodes it (as OCP MXINT8 asks).
  unsigned   k in [0, 2^b - 1] (asymmetric quantization with a zero point).
MXINT8's element is IntFormat(8, symmetric=True, step_exponent=-6): values in
[-2, 2 - 2^-6], 0x80 decodes to -2 (OCP MX v1.0).

Codebook(values) maps each code to a table entry (NF4 is one); encoding picks
the nearest entry, ties to the lower code.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from qjax.formats import rounding as rounding_lib
from qjax.formats.exmy import as_codes, as_float32, code_dtype


@dataclasses.dataclass(frozen=True)
class IntFormat:
  """b-bit integers times 2^step_exponent (static, hashable)."""

  bits: int
  signed: bool = True
  symmetric: bool = False
  step_exponent: int = 0
  rounding: str = "nearest_even"
  name: str | None = dataclasses.field(default=None, compare=False)

  def __post_init__(self):
    if not isinstance(self.bits, int) or not 1 <= self.bits <= 16:
      raise ValueError(f"IntFormat bits must be in 1..16, got {self.bits!r}")
    if self.signed and self.bits < 2:
      raise ValueError("a signed IntFormat needs at least 2 bits")
    if self.symmetric and not self.signed:
      raise ValueError("symmetric=True is for signed formats")
    rounding_lib.check_rounding(self.rounding, key=0)

  @property
  def qmin(self) -> int:
    if not self.signed:
      return 0
    return -(2 ** (self.bits - 1)) + int(self.symmetric)

  @property
  def qmax(self) -> int:
    return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

  @property
  def max(self) -> float:
    return self.qmax * 2.0**self.step_exponent

  @property
  def min(self) -> float:
    return self.qmin * 2.0**self.step_exponent

  def values(self) -> np.ndarray:
    ks = np.arange(self.qmin, self.qmax + 1, dtype=np.float64)
    return (ks * 2.0**self.step_exponent).astype(np.float32)

  def __str__(self) -> str:
    return self.name or self.spec()

  def spec(self) -> str:
    s = f"{'int' if self.signed else 'uint'}{self.bits}"
    if self.symmetric:
      s += "_sym"
    if self.step_exponent:
      s += f"_step{self.step_exponent}"
    return s

  def encode(self, x, *, rounding: str | None = None, key=None) -> jax.Array:
    """Float -> b-bit codes (two's complement when signed), saturating."""
    x = as_float32(x)
    rounding = rounding or self.rounding
    rounding_lib.check_rounding(rounding, key)
    return _int_encode(
      x, self, rounding, key if rounding == "stochastic" else None
    )

  def decode(self, codes) -> jax.Array:
    return _int_decode(as_codes(codes), self)

  def round(self, x, *, rounding: str | None = None, key=None) -> jax.Array:
    return self.decode(self.encode(x, rounding=rounding, key=key))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _int_encode(x, fmt: IntFormat, rounding: str, key) -> jax.Array:
  y = x * jnp.float32(2.0**-fmt.step_exponent)  # exact: a power of two
  y = jnp.clip(y, fmt.qmin, fmt.qmax)  # saturate before rounding: no wrap
  if rounding == "nearest_even":
    k = jnp.round(y)  # ties to even
  elif rounding == "nearest_away":
    k = jnp.sign(y) * jnp.floor(jnp.abs(y) + 0.5)
  elif rounding == "toward_zero":
    k = jnp.trunc(y)
  else:
    u = jax.random.uniform(key, y.shape, jnp.float32)
    k = jnp.floor(y + u)  # P(up) = frac(y): unbiased
  k = jnp.clip(k, fmt.qmin, fmt.qmax).astype(jnp.int32)
  mask = (1 << fmt.bits) - 1
  return (k & mask).astype(code_dtype(fmt.bits))


@functools.partial(jax.jit, static_argnums=(1,))
def _int_decode(codes, fmt: IntFormat) -> jax.Array:
  k = codes.astype(jnp.int32) & ((1 << fmt.bits) - 1)
  if fmt.signed:
    k = jnp.where(k >= 2 ** (fmt.bits - 1), k - 2**fmt.bits, k)
  return k.astype(jnp.float32) * jnp.float32(2.0**fmt.step_exponent)


@dataclasses.dataclass(frozen=True)
class Codebook:
  """A table of 2^bits float32 values; code i means table[i]."""

  table: tuple[float, ...]
  name: str | None = dataclasses.field(default=None, compare=False)

  def __post_init__(self):
    n = len(self.table)
    if n < 2 or n & (n - 1) or n > 2**16:
      raise ValueError(f"a codebook needs 2^b entries (b in 1..16), got {n}")
    t = np.asarray(self.table, np.float64)
    if not np.all(np.isfinite(t)) or np.any(np.diff(t) <= 0):
      raise ValueError(
        "codebook entries must be finite and strictly increasing"
      )
    object.__setattr__(self, "table", tuple(float(np.float32(v)) for v in t))

  @property
  def bits(self) -> int:
    return len(self.table).bit_length() - 1

  @property
  def max(self) -> float:
    return max(abs(self.table[0]), abs(self.table[-1]))

  @property
  def min(self) -> float:
    return self.table[0]

  @property
  def signed(self) -> bool:
    return self.table[0] < 0

  def values(self) -> np.ndarray:
    return np.asarray(self.table, np.float32)

  def __str__(self) -> str:
    return self.name or f"codebook{self.bits}"

  def spec(self) -> str:
    return str(self)

  def encode(self, x, *, rounding: str | None = None, key=None) -> jax.Array:
    """Nearest entry (ties to the lower code); values outside saturate."""
    if rounding not in (None, "nearest_even"):
      raise ValueError("a codebook rounds to the nearest entry only")
    return _codebook_encode(as_float32(x), self)

  def decode(self, codes) -> jax.Array:
    codes = as_codes(codes).astype(jnp.int32)
    return jnp.take(jnp.asarray(self.values()), codes)

  def round(self, x, *, rounding: str | None = None, key=None) -> jax.Array:
    return self.decode(self.encode(x, rounding=rounding))


@functools.partial(jax.jit, static_argnums=(1,))
def _codebook_encode(x, book: Codebook) -> jax.Array:
  t = book.values()
  mids = jnp.asarray((t[1:].astype(np.float64) + t[:-1]) / 2, jnp.float32)
  # Index of the first midpoint >= x: ties (x == midpoint) take the lower.
  code = jnp.searchsorted(mids, x, side="left")
  return code.astype(code_dtype(book.bits))


# NF4 (QLoRA, arXiv:2305.14314): quantiles of N(0,1) normalised to [-1, 1],
# with an exact zero; the 16 values as published.
NF4 = Codebook(
  (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
  ),
  name="nf4",
)
