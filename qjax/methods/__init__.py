"""Methods as typed, composable stages (see qjax.methods.base).

Transforms   MagR, Hadamard, SmoothQuant
Quantizers   RTN, GPTQ, ErrorDiffusion, GPFQ, QAF, FTQ
Refinements  CoordinateDescent, Pipe
"""

from qjax.methods.base import (
  STATISTICS,
  Chain,
  Method,
  Quantizer,
  Refinement,
  Result,
  Stats,
  Transform,
  chain,
)
from qjax.methods.data_free import RTN, Pipe
from qjax.methods.factorized import FTQ, QAF
from qjax.methods.hessian import GPTQ, CoordinateDescent, MagR
from qjax.methods.names import BY_NAME, from_name
from qjax.methods.rotation import Hadamard
from qjax.methods.smoothing import SmoothQuant
from qjax.methods.two_stream import GPFQ, ErrorDiffusion

__all__ = [
  "BY_NAME",
  "FTQ",
  "GPFQ",
  "GPTQ",
  "Hadamard",
  "QAF",
  "RTN",
  "STATISTICS",
  "SmoothQuant",
  "Chain",
  "CoordinateDescent",
  "ErrorDiffusion",
  "MagR",
  "Method",
  "Pipe",
  "Quantizer",
  "Refinement",
  "Result",
  "Stats",
  "Transform",
  "chain",
  "from_name",
]
