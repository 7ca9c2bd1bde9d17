"""Named float formats: every float type of ml_dtypes, plus eXmY by name.

Names follow ml_dtypes (`float8_e4m3fn`, `float4_e2m1fn`, ...). Any other
`eXmY` (e.g. `e3m3`, `e1m2`, `e5m1`) is the all-finite format with the default
bias 2^(X-1)-1 and saturation, the convention of ../shared/papers/exmy.md §3
(the eXmY paper's own defaults are unverified).
"""

import re

from qjax.formats.exmy import ExMy


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
    # E8M0: unsigned powers of two, no zero; ml_dtypes rounds ties up.
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

_EXMY = re.compile(r"e(\d)m(\d{1,2})")


def get(name: "str | ExMy") -> ExMy:
  """Returns the float format called `name` (an ExMy passes through).

  Raises:
    ValueError: an unknown name; the message lists the known ones.
  """
  if isinstance(name, ExMy):
    return name
  if name in PRESETS:
    return PRESETS[name]
  match = _EXMY.fullmatch(name)
  if match:
    return ExMy(int(match[1]), int(match[2]), name=name)
  raise ValueError(
    f"unknown float format {name!r}; known: {', '.join(PRESETS)}, or any "
    "'eXmY' such as 'e3m3' (all-finite, default bias)"
  )
