"""Quantization-aware factorization: a kernel becomes a CPKernel whose
factors lie on the format's grid (qjax.transforms.cp_kernel), one scale per
factor (per-tensor scaling, the authors' grid)."""

import dataclasses
import warnings
from typing import ClassVar

import jax

from qjax.formats.scaling import per_tensor
from qjax.methods import base
from qjax.transforms import cp_kernel
from qjax.transforms import factorize as fz


def _check_per_tensor(scaling, method: str) -> None:
  if scaling.spec() != per_tensor().spec():
    raise ValueError(
      f"{method} puts one scale on each CP factor; scaling must be "
      f"per-tensor, not {scaling.spec()!r}"
    )


def _factorized(w, fmt, method):
  """A CPKernel of w from the method's options: its rate gives the rank,
  its seed the CP-ALS start's key, the rest go to the solver."""
  solver = dataclasses.asdict(method)
  rank = fz.cp_rank(tuple(w.shape), solver.pop("rate"))
  solver["key"] = jax.random.key(solver.pop("seed"))
  leaf, info = cp_kernel.factorize_kernel(w, rank, fmt, method.name, **solver)
  for message in info.pop("warnings", ()):  # e.g. QAF's sweep cap
    warnings.warn(message, stacklevel=3)
  return base.Result(leaf, info)


@dataclasses.dataclass(frozen=True)
class QAF(base.Quantizer):
  """QAF (factorize.cp_quantized): ADMM CP factors on the grid.

  rate: compression rate (the authors' rank formula, factorize.cp_rank).
  sweeps, inner: ALS sweep and ADMM step caps (authors: 5000 and 1000).
  eps, tol: ADMM stopping threshold and the sweeps' relative-error change.
  init_sweeps: float CP-ALS sweeps for the start (authors: 50).
  candidates: clipping values searched per projection (authors: 200).
  seed: the CP-ALS start's jax.random seed.
  """

  name: ClassVar[str] = "qaf"
  default_scaling: ClassVar[str] = "tensor"
  rate: float
  sweeps: int = 100
  inner: int = 300
  eps: float = 1e-8
  tol: float = 1e-5
  init_sweeps: int = 50
  candidates: int = 200
  seed: int = 0

  def check(self, fmt, scaling):
    _check_per_tensor(scaling, "QAF")

  def quantize(self, w, fmt, scaling, stats):
    return _factorized(w, fmt, self)


@dataclasses.dataclass(frozen=True)
class FTQ(base.Quantizer):
  """Factorize-then-quantize (factorize.cp_then_quantize): QAF's float
  CP-ALS start, each factor rounded once; the baseline QAF is measured
  against. Options as QAF's (rate, init_sweeps, candidates, seed)."""

  name: ClassVar[str] = "ftq"
  default_scaling: ClassVar[str] = "tensor"
  rate: float
  init_sweeps: int = 50
  candidates: int = 200
  seed: int = 0

  def check(self, fmt, scaling):
    _check_per_tensor(scaling, "FTQ")

  def quantize(self, w, fmt, scaling, stats):
    return _factorized(w, fmt, self)
