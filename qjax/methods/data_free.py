"""Data-free methods: RTN (a quantizer) and PIPE's residual expansion (a
refinement that expands what the quantizer left)."""

import dataclasses
from typing import ClassVar

from qjax.formats.rounding import ROUNDING_MODES
from qjax.methods import base
from qjax.quantizers import rtn as rtn_lib
from qjax.transforms import residual


@dataclasses.dataclass(frozen=True)
class RTN(base.Quantizer):
  """Round-to-nearest from the weight's own block statistics
  (qjax.quantizers.rtn.rtn).

  clip_ratios: ratios r of each block's amax to try (MSE clip search);
    empty = none.
  rounding: one of formats.ROUNDING_MODES; 'stochastic' uses the key that
    qjax.quantize(key=) folds per leaf.
  shrink: grid step multiplier beta <= 1 (MagR's shrunk grid).
  """

  name: ClassVar[str] = "rtn"
  clip_ratios: tuple[float, ...] = ()
  rounding: str = "nearest_even"
  shrink: float = 1.0

  def __post_init__(self):
    base.as_tuple(self, "clip_ratios")
    base.one_of(self.rounding, ROUNDING_MODES, "rounding", "RTN")

  def quantize(self, w, fmt, scaling, stats):
    key = None
    if self.rounding == "stochastic":
      if stats.key is None:
        raise ValueError("stochastic rounding needs quantize(key=)")
      key = stats.key
    return rtn_lib.rtn(
      w,
      fmt,
      scaling,
      clip_ratios=self.clip_ratios,
      rounding=self.rounding,
      key=key,
      shrink=self.shrink,
    )


@dataclasses.dataclass(frozen=True)
class Pipe(base.Refinement):
  """PIPE / REx residual expansion (qjax.transforms.residual.expand) of the
  weight the quantizer saw, with the quantizer's leaf as the first order.

  order: K >= 1 terms in all (the quantizer's counts as the first).
  keep: fraction of output channels each order k >= 2 keeps (group
    sparsity; 1 = dense), one number or one per order.
  rank_by: 'residual' or 'weight' (our reading; see residual's docstring).
  """

  name: ClassVar[str] = "pipe"
  order: int
  keep: float | tuple[float, ...] = 1.0
  rank_by: str = "residual"

  def __post_init__(self):
    if isinstance(self.keep, list):
      base.as_tuple(self, "keep")
    if isinstance(self.order, bool) or int(self.order) != self.order:
      raise ValueError(f"Pipe: order must be an integer; got {self.order!r}")
    if self.order < 1:
      raise ValueError(f"Pipe: order must be >= 1; got {self.order}")
    residual.keeps_per_order(self.keep, int(self.order))
    base.one_of(self.rank_by, residual.RANK_BY, "rank_by", "Pipe")

  def check(self, fmt, scaling):
    residual.check_grid(fmt, scaling)

  def refine(self, result, *, original, weight, fmt, scaling, stats):
    if result.bias is not None:
      raise ValueError("Pipe cannot follow a quantizer that moves the bias")
    return residual.expand(
      weight,
      fmt,
      scaling,
      order=int(self.order),
      keep=self.keep,
      rank_by=self.rank_by,
      first=result.leaf,
    )
