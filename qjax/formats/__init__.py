"""Number formats: what a code means, and how codes are stored.

Public surface:
  ExMy                 any sign + exponent + mantissa float (eXmY).
  IntFormat, Codebook  integer grids (intN, uintN, MXINT8's) and tables (NF4).
  get, PRESETS         named formats (ml_dtypes names, 'eXmY', 'intN', 'nf4').
  Scaling              how blocks share scales; per_tensor/channel/block.
  block_format         OCP MX presets and NVFP4: (element, scaling).
  pack, unpack         dense bit packing of b-bit codes into uint8.
  packed_size, planes  sizes and the plane split of the packed layout.
  ROUNDING_MODES       'nearest_even', 'nearest_away', 'toward_zero',
                       'stochastic'.
"""

from qjax.formats.exmy import ExMy
from qjax.formats.integer import NF4, Codebook, IntFormat
from qjax.formats.packing import pack, packed_size, planes, unpack
from qjax.formats.presets import BLOCK_FORMATS, PRESETS, block_format, get
from qjax.formats.rounding import ROUNDING_MODES
from qjax.formats.scaling import Scaling, per_block, per_channel, per_tensor

__all__ = [
  "BLOCK_FORMATS",
  "NF4",
  "Codebook",
  "ExMy",
  "IntFormat",
  "Scaling",
  "block_format",
  "per_block",
  "per_channel",
  "per_tensor",
  "PRESETS",
  "ROUNDING_MODES",
  "get",
  "pack",
  "packed_size",
  "planes",
  "unpack",
]
