"""Error Diffusion (Khodamoradi, Denolf, Dellinger, arXiv:2410.11203) for one
layer, given the statistics of two activation streams.

What is the paper's and what is ours. The paper (we could read its abstract
and first page only; see ../shared/papers/error_diffusion.md) says ED has no
hyperparameters, needs neither backpropagation nor Hessian information,
treats the model as a composite function f_L o ... o f_1 and diffuses each
layer's quantization error into what follows, for block-scaled formats.
Its update equations are not available to us. The default here is our
reading ("A. cross-layer adjust-and-quantize" in the notes):

  X   the layer's inputs in the float model (the float stream),
  X~  its inputs in the model quantized so far (the quantized stream),
  G = X~^T X~,  C = X~^T X   ([in, in], streamed; Flax layout y = x W).
  adjust:  W' = argmin_V ||X~ V - X W||^2 closest to W
              = W + G^+ (C - G) W          (adjust='lstsq', the default)
  quantize: Q = RTN_F(W'), blocks along the input axis, OCP scale rule.
The next layer then sees X~ Q instead of X W and absorbs what is left.
Writing the solution as a correction of W (rather than G^+ C W) keeps W
wherever the calibration data says nothing (rank-deficient G), makes ED
equal RTN when X~ = X, and keeps W untouched by a lossless format. G^+ is
the pseudo-inverse (no damping: no hyperparameter); its rank is reported.

Other adjust steps, since the paper's "weighted adjust" may be simpler:
  'rescale'  W'[j, :] = W[j, :] * C_jj / G_jj (a diagonal least squares);
  'bias'     Q = RTN(W) and the bias absorbs the mean output error:
             b' = b + mean(X) W - mean(X~) Q (the caller owns the bias).
And the within-layer variant, GPFQ (Lybrand & Saab, JMLR 2021) with two
streams, `gpfq`: input rows t in order, each output column independently,
  q_t = Q((<x~_t, u_{t-1}> + w_t <x~_t, x_t>) / ||x~_t||^2),
  u_t = u_{t-1} + w_t x_t - q_t x~_t,
which depends on the data only through G and C:
  q_t = Q((sum_{s<=t} C_ts w_s - sum_{s<t} G_ts q_s) / G_tt).
Where its grid comes from is the keyword `scales`:
  'weights'   (default) from W before the loop, as GPTQ's static groups;
  'feedback'  the notes' rule for MX: a block's scales are fixed when its
              first row comes up, from the block's values after feedback.
The notes do not say which feedback a later row of the block should count
before it is reached. We take the state at the block's start for every row
of the block (u_{b-1}: the rows before the block, float and quantized):
  z0_t = (sum_{s<b} C_ts w_s - sum_{s<b} G_ts q_s + C_tt w_t) / G_tt,
which is each row's target as if it came next; the grid is RTN's on z0
(NVFP4's second-level tensor scale still comes from W). This reading is
ours. 'weights' stays the default because it is what our
GPFQ results in the README were measured with.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from qjax import qtensor
from qjax.formats import exmy, packing
from qjax.formats.scaling import Scaling
from qjax.quantizers import rtn

_HI = jax.lax.Precision.HIGHEST
ADJUSTS = ("lstsq", "rescale", "bias", "none")


class EDInfo(NamedTuple):
  """rank: rank of G as the pseudo-inverse saw it (-1 when not computed).
  error_before / error_after: ||X~ W - X W||^2 and ||X~ W' - X W||^2 on the
  calibration data (from G and C and ||XW||^2 terms that cancel: reported
  as the parts that depend on W'; their difference is exact)."""

  rank: jax.Array
  error_before: jax.Array
  error_after: jax.Array


def _output_error(v, w, g, c):
  # ||X~ V - X W||^2 - ||X W||^2 = tr(V^T G V) - 2 tr(V^T C W)
  return jnp.sum(v * jnp.matmul(g, v, precision=_HI)) - 2 * jnp.sum(
    v * jnp.matmul(c, w, precision=_HI)
  )


@functools.partial(jax.jit, static_argnums=(3,))
def _adjust(w, g, c, how):
  if how == "lstsq":
    g_pinv = jnp.linalg.pinv(g, hermitian=True)
    w_new = w + jnp.matmul(
      g_pinv, jnp.matmul(c - g, w, precision=_HI), precision=_HI
    )
    # The rank pinv used: singular values above its default cutoff.
    s = jnp.linalg.eigvalsh(g)
    cutoff = (
      10 * max(g.shape) * jnp.finfo(jnp.float32).eps * jnp.max(jnp.abs(s))
    )
    rank = jnp.sum(jnp.abs(s) > cutoff).astype(jnp.int32)
  elif how == "rescale":
    gd, cd = jnp.diag(g), jnp.diag(c)
    ratio = jnp.where(gd > 0, cd / jnp.where(gd > 0, gd, 1.0), 1.0)
    w_new = w * ratio[:, None]
    rank = jnp.int32(-1)
  else:
    w_new, rank = w, jnp.int32(-1)
  info = EDInfo(rank, _output_error(w, w, g, c), _output_error(w_new, w, g, c))
  return w_new, info


def adjust(w, g, c, how: str = "lstsq") -> tuple[jax.Array, EDInfo]:
  """The adjust step: W [in, out] -> W' [in, out] (see the module docstring).

  Args:
    w: [in, out] float kernel.
    g: [in, in] X~^T X~ (quantized stream), float32.
    c: [in, in] X~^T X (quantized stream against float stream), float32.
    how: one of ADJUSTS ('bias' and 'none' return W).

  Raises:
    ValueError: unknown `how`, shapes that disagree, or non-finite G or C.
  """
  if how not in ADJUSTS:
    raise ValueError(f"unknown adjust {how!r}; known: {ADJUSTS}")
  w = exmy.as_float32(w, "w")
  g, c = jnp.asarray(g, jnp.float32), jnp.asarray(c, jnp.float32)
  n = w.shape[0]
  if w.ndim != 2 or g.shape != (n, n) or c.shape != (n, n):
    raise ValueError(
      f"adjust needs w [in, out], g and c [in, in]; got {w.shape}, {g.shape}, "
      f"{c.shape}"
    )
  if not (bool(jnp.all(jnp.isfinite(g))) and bool(jnp.all(jnp.isfinite(c)))):
    raise ValueError("G or C has NaN/Inf values: check the calibration data")
  return _adjust(w, g, c, how)


def error_diffusion(
  w, g, c, fmt, scaling: Scaling, *, adjust_step: str = "lstsq"
) -> tuple[qtensor.QTensor, EDInfo]:
  """ED for one layer: adjust, then round in `fmt` (no tuning knobs).

  Args:
    w: [in, out] kernel (Flax layout); blocks run along axis 0.
    g, c: the layer's X~^T X~ and X~^T X ([in, in], float32).
    fmt, scaling: the target format (e.g. formats.block_format('mxfp4')).
    adjust_step: one of ADJUSTS (default 'lstsq', our reading of the paper).

  Returns:
    (QTensor of w's shape, EDInfo).
  """
  w_new, info = adjust(w, g, c, adjust_step)
  return rtn.rtn(w_new.astype(jnp.asarray(w).dtype), fmt, scaling), info


def bias_correction(b, w, q, mean_x, mean_xq) -> jax.Array:
  """b' = b + mean(X) W - mean(X~) Q: the mean output error moved into the
  bias. b [out] (or None: zeros), w, q [in, out], means [in]."""
  b = jnp.zeros(w.shape[1], jnp.float32) if b is None else b
  return (
    b
    + jnp.matmul(mean_x, w, precision=_HI)
    - jnp.matmul(mean_xq, q, precision=_HI)
  )


GPFQ_SCALES = ("weights", "feedback")


def _target(fed, g_tt, w_t):
  """fed / G_tt; an input that never fires (G_tt = 0) keeps its weight."""
  return jnp.where(g_tt > 0, fed / jnp.where(g_tt > 0, g_tt, 1.0), w_t)


def _scale_and_zero(grid: rtn.Grid):
  """The grid's per-element scale and zero point (zeros without one)."""
  zero = grid.zero_full
  return grid.scale_full, (
    zero if zero is not None else jnp.zeros_like(grid.scale_full)
  )


def _gpfq_rows(state, rows, a, g, diag, w, fmt, grid: rtn.Grid):
  """GPFQ over the input rows `rows` (a fori range) on `grid`, whose
  per-element arrays [len, out] start at the range's first row."""
  start = rows[0]
  scale, zero = _scale_and_zero(grid)

  def row(t, state):
    codes, q = state
    fed = a[t] - jnp.matmul(g[t], q, precision=_HI)  # rows >= t of q are 0
    z = _target(fed, diag[t], w[t])
    s, zp = scale[t - start], zero[t - start]
    code = rtn.encode_scaled(
      z,
      fmt,
      s,
      zp if grid.block_full is None else None,
      None
      if grid.block_full is None
      else (grid.block_full[t - start], grid.tensor_scale),
    )
    value = (fmt.decode(code) - zp) * s
    return codes.at[t].set(code), q.at[t].set(value)

  return jax.lax.fori_loop(rows[0], rows[1], row, state)


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _gpfq(w, g, c, fmt, scaling, scales):
  n_in, n_out = w.shape
  a = jnp.matmul(jnp.tril(c), w, precision=_HI)  # sum_{s<=t} C_ts w_s
  diag = jnp.diag(g)
  state = (
    jnp.zeros((n_in, n_out), exmy.code_dtype(fmt.bits)),
    jnp.zeros((n_in, n_out), jnp.float32),
  )
  if scales == "weights":
    grid = rtn.block_scales(w, fmt, scaling)
    codes, _ = _gpfq_rows(state, (0, n_in), a, g, diag, w, fmt, grid)
    parts = grid.stored, grid.zero, grid.tensor_scale
    return packing.pack(codes, fmt.bits), *parts
  # 'feedback': blocks of `rows` input rows, each grid from z0 (module doc).
  rows = scaling.block_shape(w.shape)[0]
  full = jax.eval_shape(lambda v: rtn.block_scales(v, fmt, scaling), w)
  stored = jnp.zeros(full.stored.shape, full.stored.dtype)
  zeros = (
    None if full.zero is None else jnp.zeros(full.zero.shape, full.zero.dtype)
  )
  c_diag = jnp.diag(c)
  tensor_scale = None  # NVFP4: measured once, from W, as 'weights' does
  if scaling.tensor_scale:
    tensor_scale = rtn.block_scales(w, fmt, scaling).tensor_scale
  index = jnp.arange(n_in)
  per_block = jax.eval_shape(
    lambda v: rtn.block_scales(v, fmt, scaling), w[:rows]
  ).stored.shape[0]  # scale rows that one block of input rows stores

  def block(first, size, carry):
    state, stored, zeros = carry
    before = jnp.where((index < first)[:, None], w, 0.0)
    take = lambda m: jax.lax.dynamic_slice_in_dim(m, first, size)  # noqa: E731
    fed = (
      jnp.matmul(take(c), before, precision=_HI)
      - jnp.matmul(take(g), state[1], precision=_HI)  # rows >= first are 0
      + take(c_diag)[:, None] * take(w)
    )
    z0 = _target(fed, take(diag)[:, None], take(w))
    grid = rtn.block_scales(z0, fmt, scaling, tensor_scale=tensor_scale)
    state = _gpfq_rows(state, (first, first + size), a, g, diag, w, fmt, grid)
    at = first // rows * per_block
    stored = jax.lax.dynamic_update_slice_in_dim(stored, grid.stored, at, 0)
    if zeros is not None:
      zeros = jax.lax.dynamic_update_slice_in_dim(zeros, grid.zero, at, 0)
    return state, stored, zeros

  n_full = n_in // rows
  carry = (state, stored, zeros)
  if n_full:  # (its body would not trace for a weight shorter than a block)
    carry = jax.lax.fori_loop(
      0, n_full, lambda b, carry: block(b * rows, rows, carry), carry
    )
  if n_in % rows:  # a ragged last block (scaling.ragged)
    carry = block(n_full * rows, n_in % rows, carry)
  (codes, _), stored, zeros = carry
  return packing.pack(codes, fmt.bits), stored, zeros, tensor_scale


def gpfq(
  w, g, c, fmt, scaling: Scaling, scales: str = "weights"
) -> qtensor.QTensor:
  """GPFQ with a float and a quantized stream, from G and C (module doc).

  Args as `error_diffusion`, and `scales`: where the grid comes from,
  'weights' (W, before the loop) or 'feedback' (each block of input rows
  from its values after feedback when the block starts; our reading of the
  notes' rule for MX, see the module doc). Returns a QTensor of w's shape.
  """
  w = exmy.as_float32(w, "w")
  g, c = jnp.asarray(g, jnp.float32), jnp.asarray(c, jnp.float32)
  if scaling.mode == "block" and any(a % 2 != 0 for a in scaling.axes):
    raise ValueError(
      f"gpfq blocks run along the input axis 0; got {scaling.axes}"
    )
  if scales not in GPFQ_SCALES:
    raise ValueError(
      f"gpfq scales must be one of {GPFQ_SCALES}, got {scales!r}"
    )
  parts = _gpfq(w, g, c, rtn._saturating(fmt), scaling, scales)
  return qtensor.from_parts(parts, fmt, scaling, w)
