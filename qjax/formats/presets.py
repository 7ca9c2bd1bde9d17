"""Named float formats: every float type of ml_dtypes, plus eXmY by name.

Names follow ml_dtypes (`float8_e4m3fn`, `float4_e2m1fn`, ...). Any other
`eXmY` (e.g. `e3m3`, `e1m2`, `e5m1`) is the all-finite format with the default
bias 2^(X-1)-1 and saturation, the convention of ../shared/papers/exmy.md §3
(the eXmY paper's own defaults are unverified).
"""

import dataclasses
import re

from qjax.formats import scaling as scaling_lib
from qjax.formats.exmy import ExMy
from qjax.formats.integer import NF4, Codebook, IntFormat


def _preset(name: str, e: int, m: int, **kw) -> ExMy:
  return ExMy(e, m, name=name, **kw)


PRESETS: dict[str, ExMy] = {
  f.name: f
  for f in (
    _preset("float8_e4m3fn", 4, 3, special="fn"),
    _preset("float8_e4m3", 4, 3, special="ieee"),
    _preset("float8_e5m2", 5, 2, special="ieee"),
    _preset("float8_e3m4", 3, 4, special="ieee"),
    _preset("float8_e4m3fnuz", 4, 3, special="fnuz"),
    _preset("float8_e5m2fnuz", 5, 2, special="fnuz"),
    _preset("float8_e4m3b11fnuz", 4, 3, special="fnuz", bias=11),
    _preset("float6_e2m3fn", 2, 3),
    _preset("float6_e3m2fn", 3, 2),
    _preset("float4_e2m1fn", 2, 1),
    # E8M0: unsigned powers of two, no zero. ml_dtypes rounds ties up, and
    # rounds float32 subnormal inputs up (see qjax.formats.exmy).
    _preset(
      "float8_e8m0fnu",
      8,
      0,
      special="fn",
      signed=False,
      subnormals=False,
      rounding="nearest_away",
      subnormal_inputs_round_up=True,
    ),
    _preset("bfloat16", 8, 7, special="ieee"),
    _preset("float16", 5, 10, special="ieee"),
  )
}

_EXMY = re.compile(r"e(\d)m(\d{1,2})")
_INT = re.compile(r"(u?)int(\d{1,2})")

Format = ExMy | IntFormat | Codebook


def get(name: "str | Format") -> Format:
  """Returns the element format called `name` (a format passes through).

  Names: ml_dtypes float names, any 'eXmY', 'intN' / 'uintN' (N = 2..16;
  uint is for zero-point quantization), 'nf4'.

  Raises:
    ValueError: an unknown name; the message lists the known ones.
  """
  if isinstance(name, (ExMy, IntFormat, Codebook)):
    return name
  if not isinstance(name, str):
    raise TypeError(f"a format name must be a string, got {name!r}")
  if name in PRESETS:
    return PRESETS[name]
  if name == "nf4":
    return NF4
  match = _EXMY.fullmatch(name)
  if match:
    return ExMy(int(match[1]), int(match[2]), name=name)
  match = _INT.fullmatch(name)
  if match and 2 <= int(match[2]) <= 16:
    return IntFormat(int(match[2]), signed=not match[1], name=name)
  from qjax.formats import spec  # the full spec grammar builds on this module

  try:
    parsed = spec.parse(name)
  except ValueError as e:
    raise ValueError(
      f"unknown format {name!r}; known: {', '.join(PRESETS)}, nf4, any "
      "'eXmY' such as 'e3m3', 'intN'/'uintN', a block format "
      f"({', '.join(BLOCK_FORMATS)}), or a spec ({e})"
    ) from None
  if isinstance(parsed, spec.BlockSpec):
    raise ValueError(
      f"{name!r} is a block format: use block_format({name!r}) (or pass it "
      "as a rule's format)"
    )
  return parsed


def _mx_element(name: str) -> ExMy:
  # MX elements saturate (OCP MX v1.0 conversion never overflows to Inf/NaN).
  return dataclasses.replace(PRESETS[name], overflow="saturate")


# name -> (element format, block size, scale format, tensor scale)
BLOCK_FORMATS = {
  "mxfp8_e4m3": (_mx_element("float8_e4m3fn"), 32, "e8m0", False),
  "mxfp8_e5m2": (_mx_element("float8_e5m2"), 32, "e8m0", False),
  "mxfp6_e3m2": (_mx_element("float6_e3m2fn"), 32, "e8m0", False),
  "mxfp6_e2m3": (_mx_element("float6_e2m3fn"), 32, "e8m0", False),
  "mxfp4": (_mx_element("float4_e2m1fn"), 32, "e8m0", False),
  "mxint8": (
    IntFormat(8, symmetric=True, step_exponent=-6, name="mxint8_element"),
    32,
    "e8m0",
    False,
  ),
  "nvfp4": (_mx_element("float4_e2m1fn"), 16, "float8_e4m3fn", True),
}


def block_format(
  name: str, axis: int = 0
) -> tuple[Format, scaling_lib.Scaling]:
  """(element format, scaling) of an OCP MX or NVFP4 preset.

  Args:
    name: one of BLOCK_FORMATS.
    axis: the axis blocks run along; it should be the contraction axis
      (0 for a Flax Dense kernel [in, out]).
  """
  if name not in BLOCK_FORMATS:
    from qjax.formats import spec

    parsed = spec.parse(name, axis=axis) if isinstance(name, str) else None
    if isinstance(parsed, spec.BlockSpec):
      return parsed.element, parsed.scaling
    raise ValueError(
      f"unknown block format {name!r}; known: {', '.join(BLOCK_FORMATS)} "
      "and the specs mxfp8e4, mxfp8e5, mxfp6e3, mxfp6e2, mxint4, bfpN"
    )
  element, size, scale_format, tensor_scale = BLOCK_FORMATS[name]
  return element, scaling_lib.Scaling(
    "block", (axis,), (size,), scale_format, tensor_scale=tensor_scale
  )


def is_block_format(name) -> bool:
  """Whether `name` names a block format (a preset or a block spec)."""
  if not isinstance(name, str):
    return False
  if name in BLOCK_FORMATS:
    return True
  from qjax.formats import spec

  try:
    return isinstance(spec.parse(name), spec.BlockSpec)
  except ValueError:
    return False
