"""Format names -> format objects: ml_dtypes names, any 'eXmY', 'intN',
'nf4', block presets and the spec grammar (qjax.formats.spec).

Any `eXmY` (e.g. `e3m3`, `e1m2`, `e5m1`) that is not an ml_dtypes name is
the all-finite format with the default bias 2^(X-1)-1 and saturation, the
convention of ../shared/papers/exmy.md §3 (the eXmY paper's own defaults are
unverified).
"""

import re

from qjax.formats import scaling as scaling_lib
from qjax.formats import spec
from qjax.formats.exmy import ExMy
from qjax.formats.integer import NF4, Codebook, IntFormat
from qjax.formats.presets import BLOCK_FORMATS, PRESETS

_EXMY = re.compile(r"e(\d)m(\d{1,2})")
_INT = re.compile(r"(u?)int(\d{1,2})")

Format = ExMy | IntFormat | Codebook


def get(name: "str | Format") -> Format:
  """Returns the element format called `name` (a format passes through).

  Names: ml_dtypes float names, any 'eXmY', 'intN' / 'uintN' (N = 2..16;
  uint is for zero-point quantization), 'nf4', or an element spec.

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
  try:
    return isinstance(spec.parse(name), spec.BlockSpec)
  except ValueError:
    return False
