"""Static activation ranges from calibration data, in two passes.

Pass 1 (every observer) records, per layer input, the largest |x| and the
number of values. Pass 2 runs only for:

  percentile  the p-th percentile of |x| over all N calibration values, with
              NumPy's default (linear) interpolation. It needs the order
              statistics N-1-floor(h) and up, h = (N-1) p / 100, so pass 2
              keeps the k = N - floor(h) largest |x| (a few hundred values
              at p = 99.99), never all of X.
  mse         for each clip ratio r, the squared error of fake-quant with the
              static scale of amax * r, summed over the calibration set
              (float32 per call, float64 across calls); the first ratio with
              the least error wins.

The range is then turned into a stored scale by quantizer.static_scale.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from qjax.activations import quantizer


def amax_and_count(x) -> tuple[float, int]:
  """Pass 1: (max |x|, number of values) of one call."""
  x = jnp.asarray(x)
  return float(jnp.max(jnp.abs(x))), int(x.size)


def keep_count(count: int, percentile: float) -> int:
  """How many of the largest |x| the percentile of `count` values reads."""
  h = (count - 1) * (percentile / 100.0)
  return count - math.floor(h)


def largest(x, k: int) -> np.ndarray:
  """Pass 2 (percentile): the min(k, size) largest |x| of one call."""
  flat = jnp.abs(jnp.asarray(x, jnp.float32)).reshape(-1)
  k = min(k, flat.size)
  return np.asarray(jax.lax.top_k(flat, k)[0])


def merge_largest(kept: np.ndarray | None, new: np.ndarray, k: int):
  """The k largest of two sets of values (descending)."""
  both = new if kept is None else np.concatenate([kept, new])
  return -np.sort(-both)[:k]


def percentile_of(top: np.ndarray, count: int, percentile: float) -> float:
  """NumPy's linear-interpolation percentile of `count` values, given their
  largest keep_count(count, percentile) in descending order `top`."""
  h = (count - 1) * (percentile / 100.0)
  lo = math.floor(h)
  t = h - lo
  a = float(top[count - 1 - lo])
  b = float(top[count - 2 - lo]) if lo + 1 < count else a
  # numpy.lib._function_base_impl._lerp: a + (b - a) t, or from b for t >= .5
  diff = b - a
  return b - diff * (1 - t) if t >= 0.5 else a + diff * t


def clip_errors(x, quant, amax: float) -> np.ndarray:
  """Pass 2 (mse): [R] squared errors of one call, one per clip ratio."""
  x = jnp.asarray(x, jnp.float32)
  ratios = jnp.asarray(quant.mse_ratios, jnp.float32)
  return np.asarray(_clip_errors(x, quant, jnp.float32(amax), ratios))


def _errors(x, quant, amax, ratios):
  def one(r):
    scale = quantizer.static_scale(amax * r, quant)
    y = quantizer.fake_quant(x, quant, scale)
    return jnp.sum(jnp.square(y - x))

  return jax.lax.map(one, ratios)


_clip_errors = jax.jit(_errors, static_argnums=1)


def best_ratio(errors: np.ndarray, ratios) -> float:
  """The first ratio with the least summed error."""
  return float(ratios[int(np.argmin(errors))])
