"""Matmul on packed quantized weights: Pallas kernels and the XLA reference."""

from qjax.kernels.layout import PreparedWeight
from qjax.kernels.qmatmul import (
  IMPLS,
  default_impl,
  prepare,
  prepare_tree,
  qmatmul,
  reference,
)

__all__ = [
  "IMPLS",
  "PreparedWeight",
  "default_impl",
  "prepare",
  "prepare_tree",
  "qmatmul",
  "reference",
]
