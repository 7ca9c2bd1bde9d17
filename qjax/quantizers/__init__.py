"""Quantizers: one weight (and optionally its input statistics) -> QTensor."""

from qjax.quantizers.rtn import rtn

__all__ = ["rtn"]
