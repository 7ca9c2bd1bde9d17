"""Quantizers: one weight (and optionally its input statistics) -> QTensor.

rtn.rtn   round-to-nearest, with MSE clip search and stochastic rounding.
"""
