"""Flax Linen glue above the methods: quantized inference (`apply`), CP
layers (`factorized`) and PIPE's parallel ensemble (`ensemble`)."""

from qjax.linen.apply import MODES, apply, greedy_generate

__all__ = ["MODES", "apply", "greedy_generate"]
