"""MagR (Zhang et al., NeurIPS 2024): shrink each channel's range before PTQ.

Solves, for a Flax kernel W [in, out] (column j = output channel j),

  (1)  min_W 1/2 tr((W - W0)^T H (W - W0)) + alpha * sum_j ||w_j||_inf

by proximal gradient (2): V = W - eta H (W - W0), W <- prox_{eta alpha
||.||_inf}(V) per column, with the l-inf prox through the Moreau identity (3)
prox_{t||.||inf}(v) = v - t P(v / t), P the projection onto the unit l1
ball, computed by sorting (4) (Duchi et al. 2008), vectorised over columns.

Following the authors' code, H is normalised so that lambda_max(H) = 1, the
step is eta = 1 and alpha is dimensionless (paper: 1e-3 per channel, 1e-4
per group; 200 iterations per channel, 150 per group in the code). Which
statistics MagR sees is the caller's choice: the authors use the Gram
matrix of the last calibration sample only; passing the full H (as qjax's
recipes do, and Brevitas' port does) leaves less null space to exploit.
With `group_size`, the l-inf penalty applies to each run of g consecutive
input rows of a column (the gradient step is unchanged).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from qjax.formats import exmy

_HI = jax.lax.Precision.HIGHEST


class MagRInfo(NamedTuple):
  """objective: [iters + 1] values of (1), normalised H, starting at W0."""

  objective: jax.Array


def project_l1_ball(v: jax.Array) -> jax.Array:
  """Projects each column of v [m, n] onto the unit l1 ball (Eq. 4)."""
  a = jnp.abs(v)
  mu = -jnp.sort(-a, axis=0)  # descending
  cums = jnp.cumsum(mu, axis=0)
  idx = jnp.arange(1, v.shape[0] + 1, dtype=v.dtype)[:, None]
  cond = mu > (cums - 1.0) / idx
  rho = jnp.max(jnp.where(cond, idx, 0.0), axis=0)  # >= 1 when ||v||_1 > 1
  theta = (
    jnp.take_along_axis(cums, (rho - 1).astype(jnp.int32)[None], 0)[0] - 1.0
  ) / jnp.maximum(rho, 1.0)
  inside = jnp.sum(a, axis=0) <= 1.0
  projected = jnp.sign(v) * jnp.maximum(a - theta[None], 0.0)
  return jnp.where(inside[None], v, projected)


def prox_linf(v: jax.Array, t) -> jax.Array:
  """prox of t ||.||_inf on each column of v [m, n] (Moreau, Eq. 3)."""
  t = jnp.maximum(jnp.asarray(t, v.dtype), 1e-30)
  return v - t * project_l1_ball(v / t)


def _grouped(f, w, group_size):
  """Applies a column-wise f to runs of `group_size` rows of each column."""
  if group_size is None:
    return f(w)
  m, n = w.shape
  g = w.reshape(m // group_size, group_size, n).transpose(1, 0, 2)
  g = f(g.reshape(group_size, -1)).reshape(group_size, m // group_size, n)
  return g.transpose(1, 0, 2).reshape(m, n)


def _objective(w, w0, h, alpha, group_size):
  d = w - w0
  fit = 0.5 * jnp.sum(d * jnp.matmul(h, d, precision=_HI))
  if group_size is None:
    penalty = jnp.sum(jnp.max(jnp.abs(w), axis=0))
  else:
    m, n = w.shape
    penalty = jnp.sum(
      jnp.max(jnp.abs(w.reshape(m // group_size, group_size, n)), axis=1)
    )
  return fit + alpha * penalty


@functools.partial(jax.jit, static_argnums=(3, 4))
def _magr(w0, h, alpha, iters, group_size):
  lam = jnp.linalg.eigvalsh(h)[-1]
  hn = h / jnp.maximum(lam, 1e-30)  # eta = 1 on the normalised H

  def step(i, carry):
    w, objective = carry
    v = w - jnp.matmul(hn, w - w0, precision=_HI)
    w = _grouped(lambda x: prox_linf(x, alpha), v, group_size)
    return w, objective.at[i + 1].set(_objective(w, w0, hn, alpha, group_size))

  objective = (
    jnp.zeros(iters + 1).at[0].set(_objective(w0, w0, hn, alpha, group_size))
  )
  w, objective = jax.lax.fori_loop(0, iters, step, (w0, objective))
  return w, MagRInfo(objective)


def magr(
  w: jax.Array,
  h: jax.Array,
  *,
  alpha: float = 1e-3,
  iters: int = 200,
  group_size: int | None = None,
) -> tuple[jax.Array, MagRInfo]:
  """Returns (W' [in, out] float32, MagRInfo).

  Args:
    w: [in, out] kernel (Flax layout).
    h: [in, in] Gram matrix of the layer's inputs (any positive scale).
    alpha: penalty in units of lambda_max(H) (paper: 1e-3 per channel,
      1e-4 per group).
    iters: proximal-gradient iterations (code: 200 per channel, 150 per
      group).
    group_size: l-inf per run of this many input rows; None = per channel.

  Raises:
    ValueError: shapes disagree, H is not finite, or group_size does not
      divide the input width.
  """
  w = exmy.as_float32(w, "w")
  h = jnp.asarray(h, jnp.float32)
  if w.ndim != 2 or h.shape != (w.shape[0], w.shape[0]):
    raise ValueError(
      f"magr needs w [in, out] and h [in, in]; got {w.shape} and {h.shape}"
    )
  if group_size is not None and w.shape[0] % group_size:
    raise ValueError(
      f"group_size {group_size} does not divide the input width {w.shape[0]}"
    )
  if not bool(jnp.all(jnp.isfinite(h))):
    raise ValueError("the Hessian has NaN/Inf values")
  return _magr(w, h, jnp.float32(alpha), int(iters), group_size)
