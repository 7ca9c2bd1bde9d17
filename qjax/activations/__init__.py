"""Activation quantization: fake-quant of layer inputs in any qjax format,
static scales from calibration observers, and the rules that say which
layer inputs are quantized, applied by interception (Linen and NNX)."""

from qjax.activations.calibrate import calibrate
from qjax.activations.hooks import NnxTap, Tap, quantized_inputs
from qjax.activations.quantizer import (
  GRANULARITIES,
  OBSERVERS,
  ActQuant,
  act_quant,
  bits_per_value,
  codes_and_grid,
  fake_quant,
  static_scale,
)
from qjax.activations.rules import ActRecipe, ActRule, act_rule, recipe

__all__ = [
  "GRANULARITIES",
  "OBSERVERS",
  "ActQuant",
  "ActRecipe",
  "ActRule",
  "NnxTap",
  "Tap",
  "act_quant",
  "act_rule",
  "calibrate",
  "quantized_inputs",
  "recipe",
  "bits_per_value",
  "codes_and_grid",
  "fake_quant",
  "static_scale",
]
