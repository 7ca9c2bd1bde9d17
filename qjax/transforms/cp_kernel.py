"""CPKernel: a conv or Dense kernel stored as its CP factors (a quantized
leaf), and `factorize_kernel`, which writes one with QAF, factorize-then-
quantize or float CP (../shared/papers/qaf.md).

For factors A [Cout, R], B [Cin, R] and, for a k×k conv, C [kh*kw, R], the
kernel is [[A, B, C]] (qjax.transforms.factorize.kernel_from_factors);
qjax.linen.factorized runs it as the authors' sequence of small layers.
"""

import dataclasses
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from qjax import formats, qtensor
from qjax.transforms import factorize as fz

METHODS = ("qaf", "ftq", "cp")


@qtensor.register_composite
@dataclasses.dataclass(frozen=True)
class CPKernel(qtensor.CompositeLeaf):
  """A kernel stored as CP factors (QTensors, or float arrays for plain CP).

  Invariants: factors are A [m0, R], B [m1, R] and, for a k×k conv,
  C [kh*kw, R], with (m0, m1[, kh*kw]) = factorize.tensor_modes(shape);
  shape and dtype (static) are the original kernel's.
  """

  factors: tuple
  shape: tuple[int, ...]
  dtype: np.dtype

  @property
  def rank(self) -> int:
    return int(self.factors[0].shape[1])

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    """Bytes stored: each factor's codes and scales (float factors count
    their own dtype)."""
    return sum(
      f.nbytes if qtensor.is_qtensor(f) else f.size * f.dtype.itemsize
      for f in self.factors
    )

  @property
  def bits_per_weight(self) -> float:
    """Stored bits per weight of the original kernel."""
    return 8 * self.nbytes / self.size

  def float_factors(self) -> list:
    return [
      f.dequantize(jnp.float32) if qtensor.is_qtensor(f) else f
      for f in self.factors
    ]

  def dequantize(self, dtype=None) -> jax.Array:
    """The dense kernel [[A, B, C]] in Flax layout."""
    w = fz.kernel_from_factors(self.float_factors(), self.shape)
    return w.astype(dtype or self.dtype)

  def macs_and_bops(self, activation_bits: int) -> tuple[int, int]:
    """MACs per output position of the factorized sequence at stride 1
    (B: Cin*R, depthwise: kh*kw*R, A: R*Cout), and BOPs. A strided conv
    runs B at its input resolution; qjax.linen.factorized.macs counts that."""
    macs = bops = 0
    for f in self.factors:
      m = math.prod(f.shape)
      bits = f.fmt.bits if qtensor.is_qtensor(f) else 8 * f.dtype.itemsize
      macs += m
      bops += m * bits * activation_bits
    return macs, bops

  def validate(self) -> None:
    modes = fz.tensor_modes(self.shape)
    if len(self.factors) != len(modes):
      raise ValueError(f"{len(self.factors)} factors for modes {modes}")
    for m, f in zip(modes, self.factors, strict=True):
      if tuple(f.shape) != (m, self.rank):
        raise ValueError(f"factor shape {f.shape}, want {(m, self.rank)}")

  # The leaf protocol (qtensor.CompositeLeaf): checkpoints and qjax.stats.
  kind = "cp"

  def parts(self) -> dict:
    return {
      (f"f{k}" if qtensor.is_qtensor(f) else f"f{k}_value"): f
      for k, f in enumerate(self.factors)
    }

  def meta(self) -> dict:
    return {
      "shape": list(self.shape),
      "dtype": str(np.dtype(self.dtype)),
      "factors": len(self.factors),
    }

  @classmethod
  def from_parts(cls, meta: dict, parts: dict) -> "CPKernel":
    factors = tuple(
      parts[f"f{k}"] if f"f{k}" in parts else parts[f"f{k}_value"]
      for k in range(int(meta["factors"]))
    )
    leaf = cls(factors, tuple(meta["shape"]), np.dtype(meta["dtype"]))
    leaf.validate()
    return leaf

  def describe(self, activation_bits: int) -> dict:
    first = self.factors[0]
    quantized = qtensor.is_qtensor(first)
    macs, bops = self.macs_and_bops(activation_bits)
    return {
      "format": str(first.fmt) if quantized else str(first.dtype),
      "scaling": first.scaling.spec() if quantized else None,
      "macs": macs,
      "bops": bops,
      "rank": self.rank,
    }

  def __repr__(self) -> str:
    return (
      f"CPKernel(shape={self.shape}, rank={self.rank}, "
      f"{self.bits_per_weight:.3f} bits/weight)"
    )


jax.tree_util.register_dataclass(
  CPKernel, data_fields=["factors"], meta_fields=["shape", "dtype"]
)


def is_cp(x) -> bool:
  return isinstance(x, CPKernel)


# Keywords each one-shot method accepts; QAF takes factorize.cp_quantized's.
ONE_SHOT_KEYWORDS = {
  "ftq": ("init_sweeps", "candidates", "key"),
  "cp": ("init_sweeps", "key"),
}


def factorize_kernel(w, rank: int, fmt, method: str = "qaf", **solver):
  """One kernel -> (CPKernel of `rank`, info).

  Args:
    w: a Flax kernel, conv [kh, kw, Cin, Cout] or Dense [in, out].
    rank: the CP rank (factorize.cp_rank gives it from a compression rate).
    fmt: the factors' element format or its name (None for 'cp').
    method: 'qaf' (factorize.cp_quantized), 'ftq' (the float CP-ALS start,
      each factor rounded once: factorize.cp_then_quantize) or 'cp' (the
      float start itself, float32 factors).
    **solver: keywords of cp_quantized for 'qaf'; ONE_SHOT_KEYWORDS for the
      others. Any other keyword is an error, not silently ignored.

  Returns:
    (CPKernel, info): info holds QAF's 'sweeps', 'sweep_cap_hit' and the
    solver's 'warnings' (messages, e.g. the sweep cap), empty otherwise.
  """
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; choices: {METHODS}")
  w = jnp.asarray(w)
  fmt = None if fmt is None else formats.get(fmt)
  shape, dtype = tuple(w.shape), np.dtype(w.dtype)
  if method == "qaf":
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      out = fz.cp_quantized(w, rank, fmt, **solver)
    messages = [str(c.message) for c in caught]
    info = {
      "sweeps": int(out.info.sweeps),
      "sweep_cap_hit": any("sweep cap" in m for m in messages),
      "warnings": messages,
    }
    return CPKernel(tuple(out.factors), shape, dtype), info
  accepted = ONE_SHOT_KEYWORDS[method]
  unknown = sorted(set(solver) - set(accepted))
  if unknown:  # e.g. QAF's `sweeps`, which a one-shot method would ignore
    raise ValueError(
      f"method {method!r} takes {', '.join(accepted)}; got {unknown}"
    )
  if method == "ftq":
    return CPKernel(
      tuple(fz.cp_then_quantize(w, rank, fmt, **solver)), shape, dtype
    ), {}
  _, start, amax = fz.normalized_start(w, rank, **solver)
  factors = (start[0] * amax, *start[1:])
  return CPKernel(factors, shape, dtype), {}
