"""SmoothQuant as a method stage: chain(SmoothQuant(), GPTQ()) quantizes
diag(s) W with GPTQ on the inputs X diag(s)^-1 (H -> D^-1 H D^-1) and
returns a Smoothed leaf (qjax.transforms.smoothquant)."""

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from qjax.methods import base, rotation
from qjax.transforms import rotated, smoothquant


@dataclasses.dataclass(frozen=True)
class SmoothQuant(base.Transform):
  """alpha: migration strength, Eq. (4) (paper: 0.5; 0.75-0.85 for models
  with larger outliers). Needs the calibration statistic max |X_j|."""

  name: ClassVar[str] = "smoothquant"
  needs: ClassVar[frozenset] = frozenset({"input_absmax"})
  alpha: float = 0.5

  def __post_init__(self):
    if not 0.0 <= self.alpha <= 1.0:
      raise ValueError(
        f"SmoothQuant: alpha must be in [0, 1], got {self.alpha}"
      )

  def _scales(self, w, stats):
    rotation.check_channel_kernel(w, "SmoothQuant scales")
    if stats.input_absmax is None:
      raise ValueError("SmoothQuant needs max |X_j| from calibration")
    if stats.input_absmax.ndim != 1:
      raise ValueError(
        "SmoothQuant scales a layer without feature groups; got max |X| of "
        f"shape {stats.input_absmax.shape}"
      )
    matrix = w.reshape(w.shape[-2:])  # a 1x1 conv as its [in, out]
    return smoothquant.smoothing_scales(stats.input_absmax, matrix, self.alpha)

  def transform(self, w, stats):
    s = self._scales(w, stats)
    return (w.astype(jnp.float32) * s[:, None]).astype(w.dtype)

  def transform_stats(self, stats, w):
    s = self._scales(w, stats).astype(
      jnp.float64 if _wide(stats) else jnp.float32
    )

    def square(m):
      return None if m is None else m / s[:, None] / s[None, :]

    return stats._replace(
      hessian=square(stats.hessian),
      last_sample=square(stats.last_sample),
      g=square(stats.g),
      c=square(stats.c),
      mean_x=None if stats.mean_x is None else stats.mean_x / s,
      mean_xq=None if stats.mean_xq is None else stats.mean_xq / s,
      input_absmax=stats.input_absmax / s,
    )

  def wrap(self, result, w, stats):
    s = self._scales(w, stats).astype(jnp.float32)
    leaf = result.leaf
    shape = tuple(leaf.shape)
    ok = hasattr(leaf, "codes") or isinstance(leaf, rotated.Rotated)
    if not ok:
      raise ValueError(
        "SmoothQuant composes with quantizers that return a QTensor, and "
        f"with Hadamard; got {type(leaf).__name__}"
      )
    out = smoothquant.Smoothed(leaf, s, shape, np.dtype(leaf.dtype))
    return result._replace(leaf=out)


def _wide(stats) -> bool:
  h = stats.hessian
  return h is not None and h.dtype == jnp.float64
