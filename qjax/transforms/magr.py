"""MagR (Zhang et al., NeurIPS 2024): shrink each channel's range before PTQ.

Solves, for a Flax kernel W [in, out] (column j = output channel j),

  (1)  min_W 1/2 tr((W - W0)^T H (W - W0)) + alpha * sum_j ||w_j||_inf

by proximal gradient (2): V = W - eta H (W - W0), W <- prox_{eta alpha
||.||_inf}(V) per column, with the l-inf prox through the Moreau identity (3)
prox_{t||.||inf}(v) = v - t P(v / t), P the projection onto the unit l1
ball (4) (Duchi et al. 2008), vectorised over columns.

Following the authors' code, H is normalised so that lambda_max(H) = 1, the
step is eta = 1 and alpha is dimensionless (paper: 1e-3 per channel, 1e-4
per group; 200 iterations per channel, 150 per group in the code). Which
statistics MagR sees is the caller's choice: the authors use the Gram
matrix of the last calibration sample (2048 tokens) only; the full H (as
Brevitas' port does) leaves less null space to exploit. `qjax.quantize`
takes either (rule option magr_statistics).

With `group_size`, the l-inf penalty applies to each run of g consecutive
input rows of a column (the gradient step is unchanged). A width that g
does not divide (SmolLM2's 576 with g = 128) gets a short last group: the
rows are zero-padded to a multiple of g for the prox, which changes
nothing (a zero entry neither enters the l1 projection nor raises a max).

Projection (4) has two exact implementations, `projection=`:
  'sort'  Eq. (4) literally: sort |v| per column, cumulative sums, rho and
          theta. Sorting float32 is slow on XLA:CPU, so the magnitudes are
          sorted as their int32 bit patterns (same order, ~4x faster).
  'pivot' Michelot's (1986) fixed point theta <- (sum_{|v|>theta} |v| - 1)
          / #{|v| > theta}, started from all entries; theta rises
          monotonically to Eq. (4)'s value in a few passes (<= 12 on real
          layers). No sort: ~10x faster than 'sort' on CPU, and the
          default. Both agree to float32 rounding (tests).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from qjax.formats import exmy

_HI = jax.lax.Precision.HIGHEST
PROJECTIONS = ("sort", "pivot")


class MagRInfo(NamedTuple):
  """objective: [iters + 1] values of (1), normalised H, starting at W0."""

  objective: jax.Array


def _sorted_descending(a: jax.Array) -> jax.Array:
  """Sorts a >= 0 along axis 0, largest first, via its int32 bit patterns."""
  bits = jax.lax.bitcast_convert_type(a, jnp.int32)
  return jax.lax.bitcast_convert_type(-jnp.sort(-bits, axis=0), a.dtype)


def _theta_sort(a: jax.Array) -> jax.Array:
  mu = _sorted_descending(a)
  cums = jnp.cumsum(mu, axis=0)
  idx = jnp.arange(1, a.shape[0] + 1, dtype=a.dtype)[:, None]
  # i = 1 always qualifies (mu_1 > mu_1 - 1); forced, as rounding can lose
  # the 1 when mu_1 is huge (a tiny prox threshold t).
  cond = (mu > (cums - 1.0) / idx) | (idx == 1)
  rho = jnp.max(jnp.where(cond, idx, 0.0), axis=0)  # >= 1 when ||v||_1 > 1
  at_rho = jnp.take_along_axis(cums, (rho - 1).astype(jnp.int32)[None], 0)
  return (at_rho[0] - 1.0) / jnp.maximum(rho, 1.0)


def _theta_pivot(a: jax.Array) -> jax.Array:
  def theta_of(active):
    total = jnp.sum(jnp.where(active, a, 0.0), axis=0)
    return (total - 1.0) / jnp.maximum(jnp.sum(active, axis=0), 1)

  top = jnp.max(a, axis=0, keepdims=True)

  def body(state):
    theta, _, k = state
    # The largest entry always stays (exactly, theta < max); rounding could
    # otherwise empty the set and restart the iteration.
    new = theta_of((a > theta[None]) | (a == top))
    return new, jnp.any(new != theta), k + 1

  # Each pass only drops entries, so at most a.shape[0] passes are needed.
  theta, _, _ = jax.lax.while_loop(
    lambda s: s[1] & (s[2] < a.shape[0]),
    body,
    (theta_of(jnp.ones(a.shape, bool)), jnp.bool_(True), 0),
  )
  return theta


def project_l1_ball(v: jax.Array, projection: str = "sort") -> jax.Array:
  """Projects each column of v [m, n] onto the unit l1 ball (Eq. 4)."""
  if projection not in PROJECTIONS:
    raise ValueError(
      f"unknown projection {projection!r}; choices: {', '.join(PROJECTIONS)}"
    )
  a = jnp.abs(v)
  theta = _theta_sort(a) if projection == "sort" else _theta_pivot(a)
  inside = jnp.sum(a, axis=0) <= 1.0
  projected = jnp.sign(v) * jnp.maximum(a - theta[None], 0.0)
  return jnp.where(inside[None], v, projected)


def prox_linf(v: jax.Array, t, projection: str = "sort") -> jax.Array:
  """prox of t ||.||_inf on each column of v [m, n] (Moreau, Eq. 3).

  t = 0 gives v (the prox of the zero function). A column where v / t
  overflows float32 (|v| > 3.4e38 t, so t < 1) is also returned as it is:
  the prox moves a column by at most t in l1 norm, and only its entries
  within t of the largest, whose float32 spacing is far above t, so v is
  the correctly rounded answer (the division gave inf - inf = NaN there).
  """
  t = jnp.asarray(t, v.dtype)
  safe = jnp.where(t > 0, jnp.maximum(t, 1e-30), 1.0)
  scaled = v / safe
  out = v - safe * project_l1_ball(scaled, projection)
  keep = (t <= 0) | ~jnp.all(jnp.isfinite(scaled), axis=0)
  return jnp.where(keep[None], v, out)


def _grouped(f, w, group_size):
  """Applies a column-wise f to runs of `group_size` rows of each column.

  A last run shorter than group_size is zero-padded (see module docstring).
  """
  if group_size is None:
    return f(w)
  m, n = w.shape
  pad = -m % group_size
  g = jnp.pad(w, ((0, pad), (0, 0)))
  k = (m + pad) // group_size
  g = g.reshape(k, group_size, n).transpose(1, 0, 2).reshape(group_size, -1)
  g = f(g).reshape(group_size, k, n).transpose(1, 0, 2)
  return g.reshape(m + pad, n)[:m]


def _penalty(w, group_size):
  """sum over columns (and groups) of the max |w|: the l-inf term of (1)."""
  if group_size is None:
    return jnp.sum(jnp.max(jnp.abs(w), axis=0))
  m, n = w.shape
  pad = -m % group_size
  g = jnp.pad(jnp.abs(w), ((0, pad), (0, 0)))
  return jnp.sum(
    jnp.max(g.reshape((m + pad) // group_size, group_size, n), axis=1)
  )


class _State(NamedTuple):
  w: jax.Array  # current iterate [in, out]
  grad: jax.Array  # Hn (w - w0), reused by the objective and the next step
  objective: jax.Array  # [iters + 1]


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _magr(w0, h, alpha, iters, group_size, projection):
  lam = jnp.linalg.eigvalsh(h)[-1]
  # A hair above lambda_max keeps eta <= 1/L despite eigvalsh's rounding.
  hn = h / jnp.maximum(lam * (1.0 + 1e-6), 1e-30)

  def objective(w, grad):
    return 0.5 * jnp.sum((w - w0) * grad) + alpha * _penalty(w, group_size)

  def step(i, s: _State) -> _State:
    v = s.w - s.grad
    w = _grouped(lambda x: prox_linf(x, alpha, projection), v, group_size)
    grad = jnp.matmul(hn, w - w0, precision=_HI)
    return _State(w, grad, s.objective.at[i + 1].set(objective(w, grad)))

  grad0 = jnp.zeros_like(w0)
  init = _State(w0, grad0, jnp.zeros(iters + 1).at[0].set(objective(w0, grad0)))
  out = jax.lax.fori_loop(0, iters, step, init)
  return out.w, MagRInfo(out.objective)


def magr(
  w: jax.Array,
  h: jax.Array,
  *,
  alpha: float = 1e-3,
  iters: int = 200,
  group_size: int | None = None,
  projection: str = "pivot",
) -> tuple[jax.Array, MagRInfo]:
  """Returns (W' [in, out] float32, MagRInfo).

  Args:
    w: [in, out] kernel (Flax layout).
    h: [in, in] Gram matrix of the layer's inputs (any positive scale).
    alpha: penalty in units of lambda_max(H) (paper: 1e-3 per channel,
      1e-4 per group).
    iters: proximal-gradient iterations (code: 200 per channel, 150 per
      group).
    group_size: l-inf per run of this many input rows (a short last run
      where it does not divide); None = per channel.
    projection: 'pivot' or 'sort', two exact forms of Eq. (4).

  Raises:
    ValueError: shapes disagree, w or H is not finite, or an unknown
      projection.
  """
  w = exmy.as_float32(w, "w")
  h = jnp.asarray(h, jnp.float32)
  if w.ndim != 2 or h.shape != (w.shape[0], w.shape[0]):
    raise ValueError(
      f"magr needs w [in, out] and h [in, in]; got {w.shape} and {h.shape}"
    )
  if projection not in PROJECTIONS:
    raise ValueError(
      f"unknown projection {projection!r}; choices: {', '.join(PROJECTIONS)}"
    )
  if group_size is not None and group_size <= 0:
    raise ValueError(f"group_size must be positive; got {group_size}")
  if not bool(jnp.all(jnp.isfinite(h))):
    raise ValueError(
      "the Hessian has NaN/Inf values: no calibration data reached this layer?"
    )
  if not bool(jnp.any(h != 0)):
    raise ValueError("the Hessian is all zeros: the layer saw no input")
  if not bool(jnp.all(jnp.isfinite(w))):
    raise ValueError("w has NaN/Inf values")
  return _magr(w, h, jnp.float32(alpha), int(iters), group_size, projection)
