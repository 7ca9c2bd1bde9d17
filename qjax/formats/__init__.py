"""Number formats: what a code means, and how codes are stored.

Public surface:
  ExMy                 any sign + exponent + mantissa float (eXmY).
  IntFormat, Codebook  integer grids (intN, uintN, MXINT8's) and tables (NF4).
  get, PRESETS         named formats (ml_dtypes names, 'eXmY', 'intN', 'nf4').
  Scaling              how blocks share scales; per_tensor/channel/block.
  block_format         OCP MX presets, NVFP4 and block specs: (element,
                       scaling).
  parse, to_spec       the spec grammar ('e4m3fn', 'e5m2b16fnuz', 'int4',
                       'mxfp6e3', 'bfp16', ...; see qjax.formats.spec).
  pack, unpack         dense bit packing of b-bit codes into uint8.
  packed_size, planes  sizes and the plane split of the packed layout.
  ROUNDING_MODES       'nearest_even', 'nearest_away', 'toward_zero',
                       'stochastic'.
"""

from qjax.formats.exmy import ExMy
from qjax.formats.integer import NF4, Codebook, IntFormat
from qjax.formats.names import block_format, get, is_block_format
from qjax.formats.packing import pack, packed_size, planes, unpack
from qjax.formats.presets import BLOCK_FORMATS, PRESETS
from qjax.formats.rounding import ROUNDING_MODES
from qjax.formats.scaling import Scaling, per_block, per_channel, per_tensor
from qjax.formats.spec import BlockSpec, parse, to_spec

__all__ = [
  "BLOCK_FORMATS",
  "NF4",
  "Codebook",
  "ExMy",
  "IntFormat",
  "Scaling",
  "BlockSpec",
  "block_format",
  "is_block_format",
  "parse",
  "to_spec",
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
