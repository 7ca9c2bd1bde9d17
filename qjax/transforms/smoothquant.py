"""SmoothQuant (Xiao et al., 2023): move activation outliers into the
weights with a per-input-channel scale s, exactly: X W = (X diag(s)^-1)
(diag(s) W).

Eq. (4): s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), with max|W_j| over
the output channels of input row j. alpha = 0.5 is the paper's default (0.75
to 0.85 for models with larger outliers). Both maxima are clamped below at
1e-5, as the authors' code does, so a dead channel gets a finite scale.

`Smoothed` is the quantized diag(s) W with s: dequantize() returns
diag(s)^-1 Q(diag(s) W), the kernel in the model's own basis, and activation
rules quantize x / s for it (qjax.activations).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from qjax import qtensor
from qjax.transforms import rotated

_FLOOR = 1e-5


def smoothing_scales(x_absmax, w, alpha: float = 0.5) -> jax.Array:
  """Eq. (4). x_absmax: [in] max |X_j|; w: [in, out] kernel -> s [in]."""
  a = jnp.maximum(jnp.asarray(x_absmax, jnp.float32), _FLOOR)
  m = jnp.maximum(
    jnp.max(jnp.abs(jnp.asarray(w, jnp.float32)), axis=-1), _FLOOR
  )
  return a**alpha / m ** (1.0 - alpha)


@qtensor.register_composite
@dataclasses.dataclass(frozen=True)
class Smoothed(qtensor.CompositeLeaf):
  """Invariants: inner (a QTensor or another composite, e.g. Rotated) has
  shape `shape` [in, out] and holds Q(diag(s) W); s [in] is positive."""

  inner: object
  s: jax.Array
  shape: tuple[int, ...]
  dtype: np.dtype

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    return self.inner.nbytes + 4 * self.s.shape[0]

  @property
  def bits_per_weight(self) -> float:
    return 8 * self.nbytes / self.size if self.size else 0.0

  def dequantize(self, dtype=None) -> jax.Array:
    w = self.inner.dequantize(jnp.float32) / self.s.astype(jnp.float32)[:, None]
    return w.astype(dtype or self.dtype)

  def validate(self) -> None:
    if hasattr(self.inner, "validate"):
      self.inner.validate()
    if tuple(self.inner.shape) != tuple(self.shape) or len(self.shape) < 2:
      raise ValueError(
        f"smoothed kernel: inner {self.inner.shape} != {self.shape}"
      )
    if self.s.shape != (self.shape[-2],):
      raise ValueError(
        f"smoothing scales {self.s.shape} for a kernel {self.shape}"
      )

  kind = "smoothquant"

  # A Rotated inner is stored as its QTensor plus its rotation in meta, so
  # every part is a QTensor or an array (what checkpoints store).
  def parts(self) -> dict:
    inner = getattr(self.inner, "inner", self.inner)
    return {"inner": inner, "s": self.s}

  def meta(self) -> dict:
    rotation = None
    if isinstance(self.inner, rotated.Rotated):
      rotation = {"block": self.inner.block, "seed": self.inner.seed}
    return {
      "shape": list(self.shape),
      "dtype": str(np.dtype(self.dtype)),
      "rotation": rotation,
    }

  @classmethod
  def from_parts(cls, meta: dict, parts: dict) -> "Smoothed":
    inner = parts["inner"]
    shape, dtype = tuple(meta["shape"]), np.dtype(meta["dtype"])
    r = meta.get("rotation")
    if r is not None:
      seed = None if r["seed"] is None else int(r["seed"])
      inner = rotated.Rotated(inner, int(r["block"]), shape, dtype, seed)
    leaf = cls(inner, parts["s"], shape, dtype)
    leaf.validate()
    return leaf

  def describe(self, activation_bits: int) -> dict:
    inner = self.inner
    if hasattr(inner, "describe"):
      out = dict(inner.describe(activation_bits))
    else:
      macs, bops = qtensor.qtensor_macs_and_bops(inner, activation_bits)
      out = {
        "format": str(inner.fmt),
        "scaling": inner.scaling.spec(),
        "macs": macs,
        "bops": bops,
      }
    out["smoothing"] = "smoothquant"
    return out

  def __repr__(self) -> str:
    return f"Smoothed({self.inner!r})"


jax.tree_util.register_dataclass(
  Smoothed, data_fields=["inner", "s"], meta_fields=["shape", "dtype"]
)
