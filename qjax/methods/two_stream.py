"""Methods that read both activation streams (the float model's inputs X and
the quantized model's X~): Error Diffusion and GPFQ
(qjax.quantizers.error_diffusion)."""

import dataclasses
import warnings
from typing import ClassVar

from qjax.methods import base
from qjax.quantizers import error_diffusion as ed


@dataclasses.dataclass(frozen=True)
class ErrorDiffusion(base.Quantizer):
  """Error Diffusion: adjust W against both streams, then round.

  adjust: one of error_diffusion.ADJUSTS: 'lstsq' (our reading of the
    paper, the default), 'rescale', 'bias' (RTN, and the bias absorbs the
    mean output error) or 'none'.
  A rank-deficient G (fewer rows than inputs, dead inputs) is solved with
  the pseudo-inverse and reported as a warning naming the parameter.
  """

  name: ClassVar[str] = "ed"
  needs: ClassVar[frozenset] = frozenset({"two_stream"})
  adjust: str = "lstsq"

  def __post_init__(self):
    base.one_of(self.adjust, ed.ADJUSTS, "adjust", "ErrorDiffusion")

  def check(self, fmt, scaling):
    base.check_input_axis_blocks(scaling, "ErrorDiffusion")

  def quantize(self, w, fmt, scaling, stats):
    qt, info = ed.error_diffusion(
      w, stats.g, stats.c, fmt, scaling, adjust_step=self.adjust
    )
    rank, n = int(info.rank), w.shape[0]
    if 0 <= rank < n:
      warnings.warn(
        f"rank-deficient calibration statistics (pseudo-inverse used): "
        f"rank {rank}/{n}",
        stacklevel=2,
      )
    bias = None
    if self.adjust == "bias" and stats.bias is not None:
      q = qt.dequantize()
      bias = ed.bias_correction(
        stats.bias, w, q, stats.mean_x, stats.mean_xq
      ).astype(stats.bias.dtype)
    return base.Result(qt, info, bias)


@dataclasses.dataclass(frozen=True)
class GPFQ(base.Quantizer):
  """GPFQ with a float and a quantized stream (error_diffusion.gpfq).

  scales: 'weights' (each block's grid from W before the loop, the default)
    or 'feedback' (from its values after feedback when the block starts; our
    reading of the notes' MX rule).
  """

  name: ClassVar[str] = "gpfq"
  needs: ClassVar[frozenset] = frozenset({"two_stream"})
  scales: str = "weights"

  def __post_init__(self):
    base.one_of(self.scales, ed.GPFQ_SCALES, "scales", "GPFQ")

  def check(self, fmt, scaling):
    base.check_input_axis_blocks(scaling, "GPFQ")

  def quantize(self, w, fmt, scaling, stats):
    return ed.gpfq(w, stats.g, stats.c, fmt, scaling, scales=self.scales)
