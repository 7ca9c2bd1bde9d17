"""Format specs: one compact string grammar for qjax formats (TensorCast
style), parsed into format objects and printed back canonically.

Element formats:
  eXmY[bZ][fn|fnuz|ieee|finite]  a float with X exponent and Y mantissa bits,
                  bias Z (default 2^(X-1) - 1) and a special-value policy
                  (`e4m3fn`, `e5m2ieee`, `e5m2b16fnuz`, `e2m1`). No suffix
                  means `finite`, as everywhere in qjax (qjax.formats.get);
                  TensorCast reads a bare eXmY as `ieee`, so write its
                  `e5m2` as `e5m2ieee` here.
  e8m0            the unsigned power-of-two scale format (float8_e8m0fnu).
  intK / uintK    K = 2..16; uint grids need a zero point.
  nf4             the NormalFloat-4 codebook.
  An element spec may end in a rounding mode: `@even` (the default, never
  printed), `@away` or `@zero` (`e4m3fn@away`). Stochastic rounding needs a
  key, so it is an option of the quantizer (`rtn(..., rounding='stochastic',
  key=...)`), not part of a format.
Block formats (an element format, a block size and an E8M0 or E4M3 scale;
E8M0-scaled ones take `@midmax` for TensorCast's scale rule, `mxfp4@midmax`,
instead of the OCP floor rule):
  mxfp8e4 mxfp8e5 mxfp6e3 mxfp6e2 mxfp4 mxint8 mxint4   OCP MX, blocks of 32
  nvfp4           e2m1 in blocks of 16, e4m3 block scale, float32 tensor scale
  bfpN            N >= 10: int(N - 8) mantissas sharing an E8M0 exponent per
                  block of 8 (TensorCast's bfp16 = int8 + e8m0 per 8)
MX and BFP integer elements are fixed point with one integer bit: an int K
element counts in steps of 2^-(K-2) and is clamped symmetrically (mxint8's
element is OCP MX INT8). qjax's own names (`float8_e4m3fn`, `mxfp6_e3m2`,
...) parse too and print as their canonical spec.
"""

import dataclasses
import re
from typing import NamedTuple

from qjax.formats import presets
from qjax.formats import scaling as scaling_lib
from qjax.formats.exmy import ExMy
from qjax.formats.integer import NF4, Codebook, IntFormat

ROUNDING = {
  "even": "nearest_even",
  "away": "nearest_away",
  "zero": "toward_zero",
}
_ROUNDING_NAME = {v: k for k, v in ROUNDING.items()}
_FLOAT = re.compile(r"e(\d)m(\d{1,2})(?:b(-?\d+))?(fnuz|fn|ieee|finite)?")
_INT = re.compile(r"(u?)int(\d{1,2})")
_BFP = re.compile(r"bfp(\d{1,2})")
_MX = {  # spec -> (qjax block preset, element spec)
  "mxfp8e4": "mxfp8_e4m3",
  "mxfp8e5": "mxfp8_e5m2",
  "mxfp6e3": "mxfp6_e3m2",
  "mxfp6e2": "mxfp6_e2m3",
  "mxfp4": "mxfp4",
  "mxint8": "mxint8",
  "nvfp4": "nvfp4",
}
VALID_FORMS = (
  "eXmY[bZ][fn|fnuz|ieee|finite] (e.g. e4m3fn, e5m2b16fnuz, e5m2ieee), "
  "e8m0, intK, uintK (K = 2..16), nf4, with an optional @even|@away|@zero "
  "rounding suffix; block formats mxfp8e4, mxfp8e5, mxfp6e3, "
  "mxfp6e2, mxfp4, mxint8, mxint4, nvfp4, bfpN (N = 10..24), with an "
  "optional @midmax scale rule"
)


class BlockSpec(NamedTuple):
  """A block format: element format and how its blocks share scales."""

  element: ExMy | IntFormat
  scaling: scaling_lib.Scaling


def _error(spec: str, part: str, why: str) -> ValueError:
  return ValueError(
    f"bad format spec {spec!r}: {part!r} {why}. Valid forms: {VALID_FORMS}"
  )


def _fixed_point(bits: int) -> IntFormat:
  """A K-bit MX/BFP integer element: steps of 2^-(K-2), symmetric clamp."""
  return IntFormat(bits, symmetric=True, step_exponent=-(bits - 2))


def _block(element, size: int, scale_format="e8m0", tensor_scale=False):
  return BlockSpec(
    element,
    scaling_lib.Scaling(
      "block", (0,), (size,), scale_format, tensor_scale=tensor_scale
    ),
  )


def parse(
  spec: str, *, axis: int = 0
) -> ExMy | IntFormat | Codebook | BlockSpec:
  """A spec string -> an element format, or a BlockSpec for block formats.

  Args:
    spec: see the module docstring.
    axis: the axis a block format's blocks run along (0: the input axis of a
      Flax Dense kernel [in, out]).

  Raises:
    ValueError: an unknown or malformed spec; the message names the part
      that is wrong and lists the valid forms.
  """
  if not isinstance(spec, str):
    raise TypeError(f"a format spec must be a string, got {spec!r}")
  text = spec.strip().lower()
  base, _, rounding = text.partition("@")
  block = _parse_block(spec, base)
  if block is not None:
    element, scaling = block
    if rounding and (rounding != "midmax" or scaling.scale_format != "e8m0"):
      raise _error(
        spec,
        "@" + rounding,
        "is not a scale rule of this block format "
        "(E8M0-scaled formats take @midmax)",
      )
    scaling = dataclasses.replace(
      scaling, axes=(axis,), scale_rule=rounding or "floor"
    )
    return BlockSpec(element, scaling)
  if rounding == "stochastic":
    raise _error(
      spec,
      "@stochastic",
      "needs a key: pass rounding='stochastic' and a "
      "key to the quantizer instead",
    )
  if rounding and rounding not in ROUNDING:
    raise _error(spec, "@" + rounding, "is not a rounding mode")
  fmt = _parse_element(spec, base)
  if rounding:
    if isinstance(fmt, Codebook):
      raise _error(spec, "@" + rounding, "does not apply to a codebook")
    fmt = dataclasses.replace(fmt, rounding=ROUNDING[rounding])
  return fmt


def _parse_block(spec, text):
  if text in _MX or text in presets.BLOCK_FORMATS:
    name = _MX.get(text, text)
    element, size, scale_format, tensor = presets.BLOCK_FORMATS[name]
    return _block(element, size, scale_format, tensor)
  if text in ("mxfp4e2",):
    return _parse_block(spec, "mxfp4")
  if text == "mxint4":
    return _block(_fixed_point(4), 32)
  match = _BFP.fullmatch(text)
  if match:
    bits = int(match[1]) - 8
    if not 2 <= bits <= 16:
      raise _error(spec, text, "needs N - 8 mantissa bits in 2..16")
    return _block(_fixed_point(bits), 8)
  return None


def _parse_element(spec, text):
  if text in presets.PRESETS:
    return presets.PRESETS[text]
  if text == "nf4":
    return NF4
  if text == "e8m0":
    return presets.PRESETS["float8_e8m0fnu"]
  match = _INT.fullmatch(text)
  if match:
    bits = int(match[2])
    if not 2 <= bits <= 16:
      raise _error(spec, text, "needs K in 2..16")
    return IntFormat(bits, signed=not match[1])
  match = _FLOAT.fullmatch(text)
  if match:
    e, m = int(match[1]), int(match[2])
    if not 1 <= e <= 8 or m > 23:
      raise _error(spec, text, "needs 1..8 exponent and 0..23 mantissa bits")
    if m == 0:
      raise _error(spec, text, "has no mantissa; only e8m0 is supported")
    special = match[4] or "finite"
    # TensorCast's default bias, also for fnuz (ExMy's own fnuz default
    # follows ml_dtypes, one higher: write b16 for float8_e5m2fnuz).
    bias = 2 ** (e - 1) - 1 if match[3] is None else int(match[3])
    try:
      return ExMy(e, m, bias=bias, special=special)
    except ValueError as err:
      raise _error(spec, text, f"is not a valid float ({err})") from err
  match = re.fullmatch(r"e\d+m\d+(?:b-?\d+)?(.+)", text)
  if match:
    raise _error(spec, match[1], "is not a suffix (fn, fnuz, ieee, finite)")
  if text.startswith(("mx", "nv", "bfp")):
    raise _error(spec, text, "is not a known block format")
  raise _error(spec, text, "is not a known format")


def to_spec(fmt) -> str:
  """The canonical spec of an element format or BlockSpec (parse's inverse).

  Raises:
    ValueError: a format the grammar cannot express (e.g. a custom codebook,
      or an eXmY with non-default overflow or subnormal handling).
  """
  if isinstance(fmt, BlockSpec) or (isinstance(fmt, tuple) and len(fmt) == 2):
    return _block_spec(*fmt)
  if fmt == NF4:
    return "nf4"
  if isinstance(fmt, IntFormat):
    if fmt.symmetric or fmt.step_exponent:
      raise ValueError(f"{fmt} is a block element; name its block format")
    base = f"{'' if fmt.signed else 'u'}int{fmt.bits}"
    return base + _rounding_suffix(fmt)
  if isinstance(fmt, ExMy):
    if fmt == presets.PRESETS["float8_e8m0fnu"]:
      return "e8m0"
    canonical = ExMy(
      fmt.exponent_bits,
      fmt.mantissa_bits,
      bias=fmt.bias,
      special=fmt.special,
      rounding=fmt.rounding,
    )
    if canonical != fmt:
      raise ValueError(
        f"{fmt} has non-default overflow/sign/subnormal settings that a "
        "spec cannot express"
      )
    default_bias = 2 ** (fmt.exponent_bits - 1) - 1
    bias = "" if fmt.bias == default_bias else f"b{fmt.bias}"
    special = "" if fmt.special == "finite" else fmt.special
    base = f"e{fmt.exponent_bits}m{fmt.mantissa_bits}{bias}{special}"
    return base + _rounding_suffix(fmt)
  raise ValueError(f"no spec for {fmt!r}")


def _rounding_suffix(fmt) -> str:
  mode = _ROUNDING_NAME[fmt.rounding]
  return "" if mode == "even" else f"@{mode}"


def _block_spec(element, scaling) -> str:
  rule = "" if scaling.scale_rule == "floor" else f"@{scaling.scale_rule}"
  return _block_name(element, scaling) + rule


def _block_name(element, scaling) -> str:
  size = scaling.sizes[0] if scaling.sizes else None
  for spec in (*_MX, "mxint4"):
    el, sc = _parse_block(spec, spec)
    if el == element and (sc.sizes, sc.scale_format, sc.tensor_scale) == (
      scaling.sizes,
      scaling.scale_format,
      scaling.tensor_scale,
    ):
      return spec
  if (
    isinstance(element, IntFormat)
    and element == _fixed_point(element.bits)
    and size == 8
    and scaling.scale_format == "e8m0"
  ):
    return f"bfp{element.bits + 8}"
  raise ValueError(f"no spec for the block format {element} / {scaling}")
