"""Named formats: every float type of ml_dtypes, and the block presets.

Names follow ml_dtypes (`float8_e4m3fn`, `float4_e2m1fn`, ...). The OCP MX
and NVFP4 block presets are here too. Looking a name up (with the spec
grammar and any `eXmY`) is qjax.formats.names.
"""

import dataclasses

from qjax.formats.exmy import ExMy
from qjax.formats.integer import IntFormat


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
    # E8M0: unsigned powers of two, no zero. ml_dtypes rounds ties up;
    # since 0.7.0 float32 subnormal inputs round to nearest like the others
    # (see qjax.formats.exmy).
    _preset(
      "float8_e8m0fnu",
      8,
      0,
      special="fn",
      signed=False,
      subnormals=False,
      rounding="nearest_away",
    ),
    _preset("bfloat16", 8, 7, special="ieee"),
    _preset("float16", 5, 10, special="ieee"),
  )
}


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
