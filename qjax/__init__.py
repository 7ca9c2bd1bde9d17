"""qjax: post-training quantization for JAX, as pure functions on pytrees.

Terms used throughout:
  code     the integer bit pattern of one quantized value.
  packed   codes after dense bit packing (b bits per value, in uint8).
  block    a group of elements sharing one scale (the OCP MX spec's word).
  tile     a kernel tile; unrelated to blocks.
  method   a typed stage (transform, quantizer or refinement) that a rule
           runs on a weight; stages compose with `chain`.
"""

from qjax import activations, formats
from qjax.api import dequantize, plan, quantize, sqnr_db, stats
from qjax.inference import apply
from qjax.methods import (
  FTQ,
  GPFQ,
  GPTQ,
  QAF,
  RTN,
  STATISTICS,
  Chain,
  CoordinateDescent,
  ErrorDiffusion,
  Hadamard,
  MagR,
  Method,
  Pipe,
  Quantizer,
  Refinement,
  Result,
  SmoothQuant,
  Stats,
  Transform,
  chain,
)
from qjax.qtensor import CompositeLeaf, QTensor, register_composite
from qjax.quantizers.gptq import gptq
from qjax.quantizers.rtn import rtn
from qjax.recipe import Recipe, Rule, rule
from qjax.version import __version__

__all__ = [
  "FTQ",
  "GPFQ",
  "GPTQ",
  "Hadamard",
  "QAF",
  "RTN",
  "STATISTICS",
  "Chain",
  "CompositeLeaf",
  "CoordinateDescent",
  "ErrorDiffusion",
  "MagR",
  "Method",
  "Pipe",
  "QTensor",
  "Quantizer",
  "Recipe",
  "Refinement",
  "Result",
  "Rule",
  "SmoothQuant",
  "Stats",
  "Transform",
  "__version__",
  "activations",
  "apply",
  "chain",
  "dequantize",
  "formats",
  "gptq",
  "plan",
  "quantize",
  "register_composite",
  "rtn",
  "rule",
  "sqnr_db",
  "stats",
]
