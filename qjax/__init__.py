"""qjax: post-training quantization for JAX, as pure functions on pytrees.

Terms used throughout:
  code     the integer bit pattern of one quantized value.
  packed   codes after dense bit packing (b bits per value, in uint8).
  block    a group of elements sharing one scale (the OCP MX spec's word).
  tile     a kernel tile; unrelated to blocks.
"""

__version__ = "0.1.0"

from qjax import formats  # noqa: E402
from qjax.api import dequantize, plan, quantize, stats  # noqa: E402
from qjax.qtensor import QTensor  # noqa: E402
from qjax.quantizers.gptq import gptq  # noqa: E402
from qjax.quantizers.rtn import rtn  # noqa: E402
from qjax.recipe import Recipe, Rule, rule  # noqa: E402

__all__ = [
  "QTensor",
  "Recipe",
  "Rule",
  "__version__",
  "dequantize",
  "formats",
  "gptq",
  "plan",
  "quantize",
  "rtn",
  "rule",
  "stats",
]
