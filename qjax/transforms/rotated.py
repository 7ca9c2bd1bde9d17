"""A kernel quantized in a Hadamard-rotated basis.

The stored kernel is Q(R^T W) (R = qjax.transforms.hadamard.rotation along
the input axis); `dequantize()` returns R Q(R^T W), the kernel in the
model's own basis, so a tree holding Rotated leaves runs, dequantizes and
counts bytes like any other. A deployment multiplies the rotated input x R
(quantized, when activations are: activation rules with the same `rotate`)
with the stored Q(R^T W).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from qjax import qtensor
from qjax.transforms import hadamard


@qtensor.register_composite
@dataclasses.dataclass(frozen=True)
class Rotated(qtensor.CompositeLeaf):
  """Invariants: inner is a QTensor of shape `shape` [..., in, out] holding
  R^T W; block is 0 (R over all `in` rows) or a divisor of `in`; seed is
  R's sign seed (hadamard.rotation)."""

  inner: qtensor.QTensor
  block: int
  shape: tuple[int, ...]
  dtype: np.dtype
  seed: int | None = 0

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    return self.inner.nbytes

  @property
  def bits_per_weight(self) -> float:
    return self.inner.bits_per_weight

  def dequantize(self, dtype=None) -> jax.Array:
    """R (R^T W)_q along axis -2, float32 math, cast to `dtype`."""
    w = hadamard.rotate_input_axis(
      self.inner.dequantize(jnp.float32),
      self.block,
      inverse=True,
      seed=self.seed,
    )
    return w.astype(dtype or self.dtype)

  def validate(self) -> None:
    self.inner.validate()
    if tuple(self.inner.shape) != tuple(self.shape):
      raise ValueError(
        f"rotated kernel: inner shape {self.inner.shape} != {self.shape}"
      )
    n = self.shape[-2]
    if self.block < 0 or (self.block and n % self.block):
      raise ValueError(f"rotation block {self.block} does not divide {n}")

  kind = "hadamard_rotated"

  def parts(self) -> dict:
    return {"inner": self.inner}

  def meta(self) -> dict:
    return {
      "shape": list(self.shape),
      "dtype": str(np.dtype(self.dtype)),
      "block": int(self.block),
      "seed": self.seed,
    }

  @classmethod
  def from_parts(cls, meta: dict, parts: dict) -> "Rotated":
    leaf = cls(
      parts["inner"],
      int(meta["block"]),
      tuple(meta["shape"]),
      np.dtype(meta["dtype"]),
      None if meta["seed"] is None else int(meta["seed"]),
    )
    leaf.validate()
    return leaf

  def describe(self, activation_bits: int) -> dict:
    macs, bops = qtensor.qtensor_macs_and_bops(self.inner, activation_bits)
    return {
      "format": str(self.inner.fmt),
      "scaling": self.inner.scaling.spec(),
      "macs": macs,
      "bops": bops,
      "rotation": f"hadamard{self.block or ''}",
    }

  def __repr__(self) -> str:
    return f"Rotated(block={self.block}, {self.inner!r})"


jax.tree_util.register_dataclass(
  Rotated,
  data_fields=["inner"],
  meta_fields=["block", "shape", "dtype", "seed"],
)
