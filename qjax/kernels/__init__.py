"""Matmul on packed quantized weights: Pallas kernels and the XLA reference."""

from qjax.kernels.dispatch import (
  IMPLS,
  default_impl,
  prepare,
  prepare_tree,
  qmatmul,
  reference,
)
from qjax.kernels.layout import PreparedWeight

__all__ = [
  "IMPLS",
  "PreparedWeight",
  "default_impl",
  "prepare",
  "prepare_tree",
  "qmatmul",
  "reference",
]
