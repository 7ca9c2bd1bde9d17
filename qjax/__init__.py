"""qjax: post-training quantization for JAX, as pure functions on pytrees.

Terms used throughout:
  code     the integer bit pattern of one quantized value.
  packed   codes after dense bit packing (b bits per value, in uint8).
  block    a group of elements sharing one scale (the OCP MX spec's word).
  tile     a kernel tile; unrelated to blocks.
"""

from qjax import formats

__version__ = "0.1.0"

__all__ = ["formats", "__version__"]
