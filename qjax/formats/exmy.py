"""ExMy: floats with any split of sign, exponent and mantissa bits.

A code is `s | e (X bits) | m (Y bits)`, read as (eXmY, arXiv:2405.13938, §2)

  e > 0:  (-1)^s 2^(e - bias) (1 + m / 2^Y)
  e = 0:  (-1)^s 2^(1 - bias) (m / 2^Y)        (subnormals)

Encoding and decoding are integer operations on the float32 bit pattern, so
they are exact, round to nearest even (or another mode) at any Y, keep
subnormals (XLA:CPU flushes float subnormals; these ops never see one as a
float) and never call ml_dtypes at run time.

Special values (`special=`):
  ieee    the top exponent is Inf (m = 0) or NaN (m != 0), as float8_e5m2.
  fn      finite, NaN only at the all-ones magnitude, as float8_e4m3fn.
  fnuz    finite, no negative zero; NaN is the negative-zero code.
  finite  every code is a number. NaN and Inf have no code; as in ml_dtypes'
          float6/float4, Inf saturates and NaN encodes as the zero of the
          opposite sign. Callers that care check for NaN before encoding.

NaN inputs encode to the canonical quiet NaN of the format (payloads are
not kept). Overflow is judged after rounding: a value whose rounded magnitude
exceeds the largest finite code saturates (`overflow='saturate'`) or becomes
Inf/NaN (`overflow='nonfinite'`; Inf for ieee, NaN for fn/fnuz).

ml_dtypes' float8_e8m0fnu before 0.7.0 rounded every float32 *subnormal*
input above 2^-127 up to 2^-126 (inputs in (2^-127, 1.5 * 2^-127) are
nearer 2^-127); 0.7.0 rounds them to nearest like every other input, and so
does the preset (qjax needs ml_dtypes >= 0.7.0).
`subnormal_inputs_round_up=True` reproduces the older behaviour.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from qjax.formats import rounding as rounding_lib

SPECIALS = ("ieee", "fn", "fnuz", "finite")
OVERFLOWS = ("saturate", "nonfinite")
_U32 = jnp.uint32


def code_dtype(bits: int) -> np.dtype:
  """The smallest unsigned dtype that holds `bits`-bit codes."""
  for dtype in (np.uint8, np.uint16, np.uint32):
    if bits <= np.iinfo(dtype).bits:
      return np.dtype(dtype)
  raise ValueError(f"codes of {bits} bits do not fit in 32 bits")


def as_float32(x, what: str = "x") -> jax.Array:
  """Checks that `x` is bf16/f16/f32 (or a Python float) and widens it."""
  dtype = getattr(x, "dtype", None)
  if dtype is None:
    if isinstance(x, (bool, int)):
      raise TypeError(f"{what} must be floating point, got {type(x).__name__}")
    x = jnp.asarray(x, jnp.float32)
    dtype = x.dtype
  dtype = np.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"{what} must be floating point, got dtype {dtype}")
  if dtype.itemsize > 4:
    raise TypeError(
      f"{what} has dtype {dtype}; quantize from float32 or narrower "
      "(casting float64 to float32 first would round twice, so do it "
      "explicitly if that is what you want)"
    )
  if dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise TypeError(
      f"{what} has dtype {dtype}; expected float32, bfloat16 or float16 "
      "(decode narrower formats to float32 first)"
    )
  return jnp.asarray(x).astype(jnp.float32)


def as_codes(codes) -> jax.Array:
  """Checks that `codes` are unsigned integers (any width)."""
  codes = jnp.asarray(codes)
  if not jnp.issubdtype(codes.dtype, jnp.unsignedinteger):
    raise TypeError(f"codes must be unsigned integers, got {codes.dtype}")
  return codes


@dataclasses.dataclass(frozen=True)
class ExMy:
  """A sign + X-bit exponent + Y-bit mantissa float format (static, hashable).

  Attributes:
    exponent_bits: X in 0..8.
    mantissa_bits: Y in 0..23; X + Y >= 1.
    bias: exponent bias; default 2^(X-1)-1, one more for fnuz, 0 for X=0
      (e0mY is then sign-magnitude m * 2^(1-Y): our reading, the paper's is
      unverified).
    special: 'ieee', 'fn', 'fnuz' or 'finite' (see the module docstring).
    overflow: 'saturate' or 'nonfinite'; default 'saturate' for finite
      formats, 'nonfinite' otherwise (as ml_dtypes).
    signed: False drops the sign bit (E8M0 scales); negative inputs encode
      as NaN.
    subnormals: False reads e = 0 as a normal binade and has no zero (E8M0);
      inputs below the smallest value encode as it, zero encodes as NaN.
    rounding: default rounding mode of `encode`.
    subnormal_inputs_round_up: round float32 subnormal inputs up instead of
      by `rounding` (ml_dtypes' float8_e8m0fnu before 0.7.0 did; see the
      module doc).
    name: display name; not part of equality.
  """

  exponent_bits: int
  mantissa_bits: int
  bias: int | None = None
  special: str = "finite"
  overflow: str | None = None
  signed: bool = True
  subnormals: bool = True
  rounding: str = "nearest_even"
  subnormal_inputs_round_up: bool = False
  name: str | None = dataclasses.field(default=None, compare=False)

  def __post_init__(self):
    x, y = self.exponent_bits, self.mantissa_bits
    if not (isinstance(x, int) and isinstance(y, int)):
      raise TypeError(f"exponent/mantissa bits must be ints, got {x!r}, {y!r}")
    if not (0 <= x <= 8 and 0 <= y <= 23 and x + y >= 1):
      raise ValueError(
        f"ExMy(e={x}, m={y}) is impossible: need 0 <= e <= 8, 0 <= m <= 23 "
        "and e + m >= 1 (float32 must hold every value exactly)"
      )
    if self.special not in SPECIALS:
      raise ValueError(f"special={self.special!r} is not one of {SPECIALS}")
    if self.bias is None:
      bias = 0 if x == 0 else 2 ** (x - 1) - 1 + (self.special == "fnuz")
      object.__setattr__(self, "bias", bias)
    if self.overflow is None:
      default = "saturate" if self.special == "finite" else "nonfinite"
      object.__setattr__(self, "overflow", default)
    if self.overflow not in OVERFLOWS:
      raise ValueError(f"overflow={self.overflow!r} is not one of {OVERFLOWS}")
    if self.special == "finite" and self.overflow != "saturate":
      raise ValueError(
        "a 'finite' format has no Inf/NaN code: overflow must be 'saturate'"
      )
    if self.special == "ieee" and (x < 2 or y < 1):
      raise ValueError("an 'ieee' format needs e >= 2 and m >= 1 for Inf/NaN")
    if self.special == "fnuz" and not self.signed:
      raise ValueError(
        "'fnuz' keeps NaN at the negative-zero code; it needs a sign bit"
      )
    if not self.subnormals and (x == 0 or self.special not in ("fn", "ieee")):
      raise ValueError(
        "subnormals=False needs an exponent (e >= 1) and a NaN "
        "code for zero (special 'fn' or 'ieee')"
      )
    if not self.signed and self.special not in ("fn", "ieee"):
      raise ValueError(
        "an unsigned format encodes negatives as NaN: it needs "
        "special 'fn' or 'ieee'"
      )
    rounding_lib.check_rounding(self.rounding, key=0)
    if self.rounding == "stochastic":
      raise ValueError("stochastic rounding needs a key: pass it to encode()")
    # Every value must be exact in float32: max < 2^128, quantum >= 2^-149.
    try:
      top = self.max
    except OverflowError:  # a bias far below zero: 2^(emax - bias) overflows
      top = math.inf
    if not math.isfinite(top) or top >= 2.0**128:
      raise ValueError(f"{self}: max {top} overflows float32; raise the bias")
    if self._quantum_exponent < -149:
      raise ValueError(
        f"{self}: smallest step 2^{self._quantum_exponent} is below float32's "
        "2^-149; raise bias"
      )

  # Geometry. ---------------------------------------------------------------
  @property
  def bits(self) -> int:
    return int(self.signed) + self.exponent_bits + self.mantissa_bits

  @property
  def _magnitude_bits(self) -> int:
    return self.exponent_bits + self.mantissa_bits

  @property
  def _min_exponent(self) -> int:
    """Unbiased exponent of the lowest binade with an implicit leading 1."""
    return 1 - self.bias if self.subnormals else -self.bias

  @property
  def _quantum_exponent(self) -> int:
    return self._min_exponent - self.mantissa_bits

  @property
  def max_magnitude_code(self) -> int:
    """The largest magnitude code (sign bit clear) that is a finite number."""
    all_ones = 2**self._magnitude_bits - 1
    if self.special == "ieee":
      return all_ones - 2**self.mantissa_bits  # top exponent reserved
    if self.special == "fn":
      return all_ones - 1
    return all_ones

  def _magnitude_value(self, mag: int) -> float:
    y = self.mantissa_bits
    e, m = mag >> y, mag & (2**y - 1)
    if e > 0 or not self.subnormals:
      return 2.0 ** (e - self.bias) * (1 + m / 2**y)
    return m * 2.0 ** (1 - self.bias - y)

  @property
  def max(self) -> float:
    return self._magnitude_value(self.max_magnitude_code)

  @property
  def smallest_normal(self) -> float:
    return 2.0**self._min_exponent

  @property
  def smallest_subnormal(self) -> float:
    """Smallest positive value (the smallest normal when m = 0)."""
    return 2.0**self._quantum_exponent

  @property
  def has_nan(self) -> bool:
    return self.special != "finite"

  @property
  def has_inf(self) -> bool:
    return self.special == "ieee"

  def values(self) -> np.ndarray:
    """Every finite value, sorted, as float32 (-0 and +0 both kept)."""
    return _values(self)

  def __str__(self) -> str:
    return self.name or self.spec()

  def spec(self) -> str:
    """A canonical spelling, e.g. 'e4m3_b7_fn' or 'ue8m0_b127_fn_nosub'."""
    parts = [
      f"{'' if self.signed else 'u'}e{self.exponent_bits}m{self.mantissa_bits}",
      f"b{self.bias}",
      self.special,
    ]
    default_overflow = "saturate" if self.special == "finite" else "nonfinite"
    if self.overflow != default_overflow:
      parts.append(self.overflow)
    if not self.subnormals:
      parts.append("nosub")
    if self.rounding != "nearest_even":
      parts.append(self.rounding)
    if self.subnormal_inputs_round_up:
      parts.append("subup")
    return "_".join(parts)

  # Codec. ------------------------------------------------------------------
  def encode(self, x, *, rounding: str | None = None, key=None) -> jax.Array:
    """Float -> codes.

    Args:
      x: float32/bfloat16/float16 array, any shape.
      rounding: overrides `self.rounding`; 'stochastic' needs `key`.
      key: jax.random key for stochastic rounding.

    Returns:
      Codes of x's shape, in the smallest unsigned dtype of `self.bits`.

    Raises:
      TypeError: non-float input, or float64 (which would round twice).
    """
    x = as_float32(x)
    rounding = rounding or self.rounding
    rounding_lib.check_rounding(rounding, key)
    return _encode(x, self, rounding, key if rounding == "stochastic" else None)

  def decode(self, codes) -> jax.Array:
    """Codes (any unsigned dtype, any shape) -> float32 values."""
    return _decode(as_codes(codes), self)

  def round(self, x, *, rounding: str | None = None, key=None) -> jax.Array:
    """decode(encode(x)): x rounded onto this format, as float32."""
    return self.decode(self.encode(x, rounding=rounding, key=key))


# Bit-level kernels; the format and mode are static, so each compiles once. --
@functools.partial(jax.jit, static_argnums=(1, 2))
def _encode(x: jax.Array, fmt: ExMy, rounding: str, key) -> jax.Array:
  y = fmt.mantissa_bits
  u = jax.lax.bitcast_convert_type(x, _U32)
  sign = u >> 31
  a = u & 0x7FFFFFFF
  is_nan = a > 0x7F800000
  is_inf = a == 0x7F800000
  # Normalise float32 (subnormals too) to sig in [2^23, 2^24) * 2^e_in.
  biased, frac = a >> 23, a & 0x7FFFFF
  input_sub = biased == 0
  lead_shift = jax.lax.clz(frac) - 8  # frac=0 (zero) gives 24: sig stays 0
  sig = jnp.where(input_sub, frac << lead_shift, frac | 0x800000)
  e_in = jnp.where(
    input_sub,
    -126 - lead_shift.astype(jnp.int32),
    biased.astype(jnp.int32) - 127,
  )
  # Below the lowest binade, extra bits go (subnormals); above, exponent is
  # kept in the code. d >= 0 counts binades above the lowest.
  d = e_in - fmt._min_exponent
  below = jnp.clip(-d, 0, 31).astype(_U32)
  shift = jnp.minimum(below + (23 - y), 31).astype(_U32)
  rbits = rounding_lib.random_bits(key, x.shape)
  if y == 0:
    # The code's parity is the exponent's: offset q by the exponent field.
    parity = jnp.maximum(d, 0).astype(_U32) + (0 if fmt.subnormals else 1)
  else:
    parity = 0
  q = rounding_lib.round_shift(sig, shift, rounding, rbits, parity)
  if fmt.subnormal_inputs_round_up:
    up = rounding_lib.round_shift(sig, shift, "toward_zero") + (
      (sig & ((jnp.uint32(1) << shift) - 1)) != 0
    ).astype(_U32)
    q = jnp.where(input_sub, up, q)
  # q in [2^y, 2^(y+1)] carries into the exponent field by plain addition.
  normal_mag = (jnp.maximum(d, 0).astype(_U32) << y) + q
  if fmt.subnormals:
    mag = jnp.where(d >= 0, normal_mag, q)
  else:
    mag = jnp.where(d >= 0, normal_mag - (1 << y), 0)

  max_mag = fmt.max_magnitude_code
  all_ones = (1 << fmt._magnitude_bits) - 1
  big = (mag > max_mag) | is_inf  # overflow is judged after rounding
  if fmt.special == "ieee":
    inf_mag = all_ones - (2**y - 1)
    nan_mag = inf_mag | (1 << (y - 1))  # quiet NaN: mantissa MSB set
  else:
    inf_mag = nan_mag = all_ones
  if fmt.overflow == "saturate":
    mag = jnp.where(big, max_mag, mag)
  elif fmt.special in ("ieee", "fn"):
    mag = jnp.where(big, inf_mag, mag)
  else:  # fnuz: the NaN code is set below, with the sign.
    mag = jnp.where(big, 0, mag)
  fnuz_overflow_nan = fmt.special == "fnuz" and fmt.overflow == "nonfinite"
  nan = (is_nan | big) if fnuz_overflow_nan else is_nan

  if not fmt.signed:
    # Negative numbers (and zero, without subnormals) have no code: NaN.
    bad = is_nan | ((sign == 1) & (a != 0))
    if not fmt.subnormals:
      bad = bad | (a == 0)
    return jnp.where(bad, nan_mag, mag).astype(code_dtype(fmt.bits))
  top = fmt.bits - 1  # position of the sign bit
  if fmt.special == "finite":
    # No NaN code; ml_dtypes' float6/float4 encode NaN as the opposite zero.
    mag = jnp.where(is_nan, 0, mag)
    sign = jnp.where(is_nan, 1 - sign, sign)
  elif fmt.special == "fnuz":
    sign = jnp.where(mag == 0, 0, sign)  # no negative zero
    mag = jnp.where(nan, 0, mag)
    sign = jnp.where(nan, 1, sign)  # NaN is the negative-zero code
  else:
    mag = jnp.where(is_nan, nan_mag, mag)
  if not fmt.subnormals:
    mag = jnp.where(a == 0, nan_mag, mag)
  code = (sign << top) | mag
  return code.astype(code_dtype(fmt.bits))


def _compose_float32(sig: jax.Array, exponent: jax.Array) -> jax.Array:
  """Bits of the exact float32 sig * 2^exponent (sig < 2^24, uint32)."""
  lead = 31 - jax.lax.clz(sig).astype(jnp.int32)  # bit index of the top 1
  biased = lead + exponent + 127
  frac = (sig << (23 - lead).astype(_U32)) & 0x7FFFFF
  normal = (biased.astype(_U32) << 23) | frac
  subnormal = sig << jnp.maximum(exponent + 149, 0).astype(_U32)
  bits = jnp.where(biased >= 1, normal, subnormal)
  return jnp.where(sig == 0, jnp.uint32(0), bits)


@functools.partial(jax.jit, static_argnums=(1,))
def _decode(codes: jax.Array, fmt: ExMy) -> jax.Array:
  y, nb = fmt.mantissa_bits, fmt._magnitude_bits
  c = codes.astype(_U32)
  mag = c & ((1 << nb) - 1)
  sign = (c >> nb) & 1 if fmt.signed else jnp.zeros_like(c)
  e, m = mag >> y, mag & ((1 << y) - 1)
  if fmt.subnormals:
    normal = e > 0
    sig = jnp.where(normal, m | (1 << y), m)
    unit = jnp.where(normal, e.astype(jnp.int32), 1) - fmt.bias - y
  else:
    sig = m | (1 << y)
    unit = e.astype(jnp.int32) - fmt.bias - y
  bits = (sign << 31) | _compose_float32(sig, unit)
  out = jax.lax.bitcast_convert_type(bits, jnp.float32)
  nan = jnp.float32(jnp.nan)
  all_ones = (1 << nb) - 1
  if fmt.special == "ieee":
    top = e == (1 << fmt.exponent_bits) - 1
    out = jnp.where(
      top & (m == 0), jnp.where(sign == 1, -jnp.inf, jnp.inf), out
    )
    out = jnp.where(top & (m != 0), nan, out)
  elif fmt.special == "fn":
    out = jnp.where(mag == all_ones, nan, out)
  elif fmt.special == "fnuz":
    out = jnp.where((sign == 1) & (mag == 0), nan, out)
  return out


@functools.cache
def _values(fmt: ExMy) -> np.ndarray:
  if fmt.bits > 16:
    raise ValueError(f"{fmt} has 2^{fmt.bits} codes; values() stops at 16 bits")
  with jax.ensure_compile_time_eval():
    codes = np.arange(2**fmt.bits, dtype=code_dtype(fmt.bits))
    vals = np.asarray(_decode(jnp.asarray(codes), fmt))
  vals = vals[np.isfinite(vals)]
  order = np.lexsort((~np.signbit(vals), vals))  # -0 before +0
  out = vals[order]
  out.setflags(write=False)
  return out
