"""Rounding float64 values onto a format's grid, for solvers that carry
float64 (GPTQ's reproducible mode).

Why float64 at all: a solver whose decisions feed back into later ones
(GPTQ's error feedback) amplifies any last-bit difference between two
machines into different codes. LAPACK's Cholesky and threaded BLAS sum in an
order that depends on the core count and the instruction set, so float32
GPTQ gave 9.60 on one core and 9.85 on two (SmolLM2, same packages). In
float64 the machines still differ, but by ~1e-14 relative, and a decision
flips only where a value lies that close to a grid midpoint.

That only holds if the decision is taken on the float64 value: rounding it
to float32 first would flip wherever two machines' values straddle a float32
midpoint, about once in 1e7 decisions at that spread, and a 135M-parameter
model takes 1e8 of them. `nearest_code` therefore takes the float32 estimate's
code and settles it against the grid's midpoints in float64, where
midpoint * scale is exact for every grid of up to 16 bits with a float32
scale (a few significant bits times 24).

`float64_allowed()` lets a function ask for float64 explicitly while every
default dtype stays 32-bit (jax_explicit_x64_dtypes = allow), so code shared
with the float32 path keeps its dtypes. Inside it, Python and NumPy scalars
still enter as float32 (jnp.float64(0.1) is float32's 0.1 widened): build
float64 values from arrays (astype, or a NumPy array with dtype=float64).
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np

from qjax.formats import exmy, power_of_two, tiny_scales

# Grids wider than this keep the float32 estimate (their tables get large).
_MAX_TABLE_BITS = 16
_NEAREST = ("nearest_even", "nearest_away")


@contextlib.contextmanager
def float64_allowed():
  """A context in which explicit float64 arrays are float64, defaults are
  not; falls back to jax.enable_x64 where JAX lacks the finer switch."""
  try:
    from jax._src import config as jax_config  # noqa: PLC0415

    switch = jax_config.explicit_x64_dtypes("allow")
  except (ImportError, AttributeError, ValueError, TypeError):
    switch = jax.enable_x64(True)
  with switch:
    yield


def widen(x) -> jax.Array:
  """float32 -> float64 exactly, subnormals included (XLA:CPU's convert
  reads them as 0): a tiny x is moved up by 2^64 in float32 bits, widened,
  and moved back down in float64, where it is normal. Call it inside
  float64_allowed()."""
  x = jnp.asarray(x, jnp.float32)
  tiny = tiny_scales.tiny(x)
  up = power_of_two.ldexp(x, jnp.where(tiny, tiny_scales.SHIFT, 0))
  up = up.astype(jnp.float64)
  # 2^-64 is exact in the float32 that a Python scalar enters as.
  return jnp.where(tiny, up * 2.0**-tiny_scales.SHIFT, up)


@functools.lru_cache(maxsize=64)
def grid_values(fmt) -> np.ndarray | None:
  """The finite values of fmt's codes, sorted, without repeats (float64);
  None for grids of more than 16 bits."""
  if fmt.bits > _MAX_TABLE_BITS:
    return None
  with jax.ensure_compile_time_eval():
    codes = jnp.arange(2**fmt.bits, dtype=jnp.uint32)
    values = np.asarray(fmt.decode(codes.astype(exmy.code_dtype(fmt.bits))))
  values = values[np.isfinite(values)].astype(np.float64)
  return np.unique(values)


def refines(fmt, rounding=None) -> bool:
  """Whether nearest_code can settle fmt's decisions in float64."""
  mode = rounding or getattr(fmt, "rounding", "nearest_even")
  return mode in _NEAREST and grid_values(fmt) is not None


def nearest_code(x, codes, fmt, scale, zero=None) -> jax.Array:
  """The code of the grid value nearest x / scale + zero, decided in
  float64.

  Args:
    x: [...] float64 values.
    codes: [...] fmt's codes for float32(x) (rtn.encode_scaled), at most one
      grid step off; kept where x is a float32 value (so that float64 and
      float32 callers agree exactly there), where x lies exactly on a
      midpoint, and where scale is 0.
    fmt: a saturating element format with a nearest rounding (`refines`).
    scale: float64 [...] > 0, broadcast to x: the value of one grid unit
      (the product block * tensor scale for a two-level scale, exact in
      float64).
    zero: the zero point (broadcast to x) or None.

  Returns:
    [...] codes, dtype of `codes`.
  """
  table = jnp.asarray(grid_values(fmt), jnp.float64)
  last = table.shape[0] - 1
  value = fmt.decode(codes).astype(jnp.float64)
  rank = jnp.clip(jnp.searchsorted(table, value), 0, last)
  below = table[jnp.maximum(rank - 1, 0)]
  above = table[jnp.minimum(rank + 1, last)]
  z = 0.0 if zero is None else jnp.asarray(zero).astype(jnp.float64)
  s = jnp.asarray(scale).astype(jnp.float64)
  # (v + neighbour) / 2 is exact in float64; so is its product with s.
  up = (rank < last) & (x > ((value + above) * 0.5 - z) * s)
  down = (rank > 0) & (x < ((below + value) * 0.5 - z) * s)
  settle = (s > 0) & (x != x.astype(jnp.float32).astype(jnp.float64))
  target = jnp.where(up, above, jnp.where(down, below, value))
  # A zero keeps x's sign, as the float32 encoder gives it.
  target = jnp.where(target == 0, jnp.copysign(0.0, x), target)
  moved = fmt.encode(target.astype(jnp.float32)).astype(codes.dtype)
  return jnp.where(settle & (up | down), moved, codes)
