"""Calibration: statistics of a Flax model's linear layers, and the drivers
that walk a model block by block while quantizing it.

  discover              the blocks of any Linen or NNX model.
  BlockModel            how to run a model block by block, by hand.
  dense_hessians        H = (2/n) X^T X per Dense / pointwise conv layer.
  quantize_sequential   GPTQ's sequential mode (statistics from the inputs
                        the already-quantized blocks produce).
  quantize_two_stream   the float and the quantized stream side by side
                        (Error Diffusion, GPFQ).

qjax.quantize(params, recipe, calib=(block_model, batches)) picks the driver
from the statistics the recipe's methods need.
"""

from qjax.calibration.blocks import BlockModel
from qjax.calibration.capture import dense_hessians, linear_order
from qjax.calibration.discover import discover
from qjax.calibration.sequential import quantize_sequential
from qjax.calibration.two_stream import quantize_two_stream
from qjax.linear_layers import is_linear

__all__ = [
  "BlockModel",
  "dense_hessians",
  "discover",
  "is_linear",
  "linear_order",
  "quantize_sequential",
  "quantize_two_stream",
]
