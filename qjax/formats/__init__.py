"""Number formats: what a code means, and how codes are stored.

Public surface:
  ExMy                 any sign + exponent + mantissa float (eXmY).
  get, PRESETS         named formats (ml_dtypes names, or 'eXmY').
  pack, unpack         dense bit packing of b-bit codes into uint8.
  packed_size, planes  sizes and the plane split of the packed layout.
  ROUNDING_MODES       'nearest_even', 'nearest_away', 'toward_zero',
                       'stochastic'.
"""

from qjax.formats.exmy import ExMy
from qjax.formats.packing import pack, packed_size, planes, unpack
from qjax.formats.presets import PRESETS, get
from qjax.formats.rounding import ROUNDING_MODES

__all__ = [
  "ExMy",
  "PRESETS",
  "ROUNDING_MODES",
  "get",
  "pack",
  "packed_size",
  "planes",
  "unpack",
]
