"""Hadamard: quantize a Dense kernel in a Hadamard-rotated basis.

A transform stage (qjax.transforms.hadamard): w [in, out] -> R^T w, the
input statistics -> those of x R (H -> R^T H R, G and C likewise, means ->
mean R), and the quantized R^T w is returned as a Rotated leaf, whose
dequantize() is back in the model's basis. So chain(Hadamard(), MagR(),
GPTQ()) runs MagR and GPTQ on the rotated problem, and activation rules
with the same `rotate` quantize x R (qjax.activations).
"""

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from qjax.methods import base
from qjax.transforms import hadamard, rotated

_HI = "highest"


def check_channel_kernel(w, what: str) -> None:
  """A Dense kernel [in, out] or a 1x1 conv kernel [1, 1, in, out]: the
  kernels whose input statistics are over channels (a wider conv's are
  over patches of kh * kw * in), so a per-channel input transform (a
  rotation, a scaling) maps them exactly."""
  if w.ndim == 2 or (w.ndim == 4 and tuple(w.shape[:2]) == (1, 1)):
    return
  raise ValueError(
    f"{what} Dense kernels [in, out] and 1x1 conv kernels [1, 1, in, out]; "
    f"got shape {tuple(w.shape)} (a wider conv's statistics are over "
    "patches, not channels)"
  )


@dataclasses.dataclass(frozen=True)
class Hadamard(base.Transform):
  """block: 0 rotates all input rows with one Hadamard matrix; b > 0 runs
  of b rows (block-diagonal R; b should divide the format's block, e.g. 32
  for MX, so each scale block stays inside one rotation). seed: the random
  signs of R (hadamard.rotation; None: the plain Hadamard matrix); use the
  same block and seed in the activation rule."""

  name: ClassVar[str] = "hadamard"
  block: int = 0
  seed: int | None = 0

  def __post_init__(self):
    if self.block < 0:
      raise ValueError(f"Hadamard: block must be >= 0, got {self.block}")
    if self.block:
      hadamard.hadamard(self.block)  # raises for an order not built here

  def _rotation(self, n):
    return jnp.asarray(hadamard.rotation(n, self.block, self.seed), jnp.float32)

  def transform(self, w, stats):
    check_channel_kernel(w, "Hadamard rotates")
    hadamard.rotation(w.shape[0], self.block)  # raises on a bad size
    w_r = hadamard.rotate_input_axis(w, self.block, seed=self.seed)
    return w_r.astype(w.dtype)

  def transform_stats(self, stats, w):
    del w

    def square(m):
      if m is None:
        return None
      r = self._rotation(m.shape[-1])
      return jnp.einsum("ji,jk,kl->il", r, m, r, precision=_HI)

    def row(v):
      if v is None:
        return None
      r = self._rotation(v.shape[-1])
      return jnp.matmul(v, r, precision=_HI)

    return stats._replace(
      hessian=square(stats.hessian),
      last_sample=square(stats.last_sample),
      g=square(stats.g),
      c=square(stats.c),
      mean_x=row(stats.mean_x),
      mean_xq=row(stats.mean_xq),
      input_absmax=None,  # a max does not rotate
    )

  def wrap(self, result, w, stats):
    del w, stats
    leaf = result.leaf
    if not hasattr(leaf, "codes"):
      raise ValueError(
        "Hadamard composes with quantizers that return a QTensor (RTN, "
        f"GPTQ, ED, GPFQ); got {type(leaf).__name__}"
      )
    out = rotated.Rotated(
      leaf, self.block, tuple(leaf.shape), np.dtype(leaf.dtype), self.seed
    )
    return result._replace(leaf=out)
