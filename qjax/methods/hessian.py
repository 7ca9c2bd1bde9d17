"""Methods that read the layer's input Hessian H = (2/n) X^T X: GPTQ (a
quantizer), MagR (a transform before it) and coordinate descent (a
refinement after it), as the GPTQ and MagR papers combine them."""

import dataclasses
from typing import ClassVar

from qjax import qtensor
from qjax.methods import base
from qjax.quantizers import coordinate_descent
from qjax.quantizers import gptq as gptq_lib
from qjax.transforms import magr as magr_lib


@dataclasses.dataclass(frozen=True)
class GPTQ(base.Quantizer):
  """OPTQ/GPTQ (qjax.quantizers.gptq.gptq) on a Dense kernel [in, out].

  block_size: rows per lazy batch update (paper: 128).
  damp: relative diagonal damping (paper: 0.01).
  act_order: visit rows by descending diag(H).
  clip_ratios: MSE clip search for the grid, as RTN's.
  shrink: grid step multiplier beta (MagR's shrunk grid).
  precision: 'float64' (reproducible across machines) or 'float32' (the
    paper's arithmetic, faster); see qjax.quantizers.gptq.gptq.
  """

  name: ClassVar[str] = "gptq"
  needs: ClassVar[frozenset] = frozenset({"hessian"})
  block_size: int = 128
  damp: float = 0.01
  act_order: bool = False
  clip_ratios: tuple[float, ...] = ()
  shrink: float = 1.0
  precision: str = "float64"

  def __post_init__(self):
    base.as_tuple(self, "clip_ratios")
    if self.block_size < 1:
      raise ValueError(f"GPTQ: block_size must be >= 1; got {self.block_size}")
    base.one_of(self.precision, gptq_lib.PRECISIONS, "precision", "GPTQ")

  def check(self, fmt, scaling):
    base.check_input_axis_blocks(scaling, "GPTQ")

  def quantize(self, w, fmt, scaling, stats):
    qt, info = gptq_lib.gptq(
      w,
      stats.hessian,
      fmt,
      scaling,
      block_size=self.block_size,
      damp=self.damp,
      act_order=self.act_order,
      clip_ratios=self.clip_ratios,
      shrink=self.shrink,
      precision=self.precision,
    )
    return base.Result(qt, info)


@dataclasses.dataclass(frozen=True)
class MagR(base.Transform):
  """MagR's l-inf proximal solver (qjax.transforms.magr.magr): shrinks each
  channel's (or group's) range while keeping X W.

  alpha: penalty in units of lambda_max(H) (paper: 1e-3 per channel, 1e-4
    per group).
  iters: proximal-gradient iterations (authors' code: 200 / 150).
  group_size: l-inf per run of this many input rows; None = per channel.
  projection: 'pivot' or 'sort', two exact forms of Eq. (4).
  statistics: 'hessian' (all calibration rows) or 'last_sample' (the last
    2048-token sample, the authors' code).
  """

  name: ClassVar[str] = "magr"
  alpha: float = 1e-3
  iters: int = 200
  group_size: int | None = None
  projection: str = "pivot"
  statistics: str = "hessian"

  def __post_init__(self):
    base.one_of(self.projection, magr_lib.PROJECTIONS, "projection", "MagR")
    base.one_of(
      self.statistics, ("hessian", "last_sample"), "statistics", "MagR"
    )
    if self.group_size is not None and self.group_size <= 0:
      raise ValueError(
        f"MagR: group_size must be positive; got {self.group_size}"
      )

  @property
  def needs(self) -> frozenset:
    return frozenset({self.statistics})

  def transform(self, w, stats):
    x_stats = getattr(stats, self.statistics)
    out = magr_lib.magr(
      w,
      x_stats,
      alpha=self.alpha,
      iters=self.iters,
      group_size=self.group_size,
      projection=self.projection,
    )[0]
    return out.astype(w.dtype)


@dataclasses.dataclass(frozen=True)
class CoordinateDescent(base.Refinement):
  """Coordinate descent on the quantizer's fixed grid towards the original
  weight (qjax.quantizers.coordinate_descent.refine; MagR's code after
  GPTQ).

  sweeps: Gauss-Seidel passes (authors: 1 at 3-4 bits, 30 at 2 bits); 0
    leaves the codes as they are.
  damp: relative diagonal damping of S (authors: 0.75).
  block_size: rows kept current at a time (speed only).
  """

  name: ClassVar[str] = "cd"
  needs: ClassVar[frozenset] = frozenset({"hessian"})
  sweeps: int = 1
  damp: float = 0.75
  block_size: int = 128

  def __post_init__(self):
    if self.sweeps < 0:
      raise ValueError(
        f"CoordinateDescent: sweeps must be >= 0; got {self.sweeps}"
      )

  def check(self, fmt, scaling):
    base.check_input_axis_blocks(scaling, "CoordinateDescent")

  def refine(self, result, *, original, weight, fmt, scaling, stats):
    if not qtensor.is_qtensor(result.leaf):
      raise ValueError(
        "CoordinateDescent refines a QTensor, not a "
        f"{type(result.leaf).__name__}"
      )
    if self.sweeps == 0:
      return result
    # The authors' refinement aims at the original weights, not MagR's.
    qt, info = coordinate_descent.refine(
      original,
      result.leaf,
      stats.hessian,
      sweeps=self.sweeps,
      damp=self.damp,
      block_size=self.block_size,
    )
    return base.Result(qt, info, result.bias)
