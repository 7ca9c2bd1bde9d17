"""GPTQ / OPTQ (Frantar et al., arXiv:2210.17323) on one weight, given H.

Layout: a Flax Dense kernel W is [in, out]. The paper's "columns" are our
input rows: one step quantizes a whole row W[i, :], vectorised over outputs,
and pushes its error onto the rows not yet quantized (the OBS update):

  e_i = (w_i - q_i) / U_ii,   w_j -= U_ij e_i  (j > i),
  with H^-1 = U^T U, U upper triangular (Cholesky form, paper §4).

Rows go in blocks of `block_size` (lazy batch updates, §4 step 2): inside a
block row by row, then one matmul updates all later rows. The loops are
`lax.fori_loop`s with a NamedTuple carry; the whole solve is one jitted call.

The grid is fixed before the loop from the original weights, with qjax's
RTN scale rules for the given scaling ("static groups" in the reference
code: per channel, or blocks of g input rows as groups). With act-order,
rows are visited by descending diag(H) (stable sort) while each row keeps
its own group's scale, so act-order costs nothing at inference. The
reference code's default "dynamic" groups (grids rebuilt from the updated
weights at each group start) are not implemented yet.

Dead inputs (H_ii = 0) get H_ii = 1 and a zero weight row (reference code).
Damping adds `damp * mean(diag H)` to the diagonal (paper: 0.01).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from qjax import qtensor
from qjax.formats import exmy, nearest64, packing, power_of_two, tiny_scales
from qjax.formats.scaling import Scaling
from qjax.quantizers import rtn

_HI = jax.lax.Precision.HIGHEST
PRECISIONS = ("float64", "float32")


class GPTQInfo(NamedTuple):
  """Diagnostics: the OBS loss estimate sum (w - q)^2 / (2 U_ii^2), and the
  layer loss tr((W - Q)^T H (W - Q)) on the undamped H."""

  loss_estimate: jax.Array
  layer_loss: jax.Array


class _Carry(NamedTuple):
  w: jax.Array  # [in_p, out] weights, updated as rows are quantized
  codes: jax.Array  # [in_p, out] element codes
  q: jax.Array  # [in_p, out] dequantized values
  loss: jax.Array  # scalar


def _upper_cholesky_of_inverse(h):
  """U with U^T U = H^-1, U upper triangular (paper §4 step 3), in h's
  dtype."""
  lower = jnp.linalg.cholesky(h)
  eye = jnp.eye(h.shape[0], dtype=h.dtype)
  h_inv = jax.scipy.linalg.cho_solve((lower, True), eye)
  return jnp.linalg.cholesky(h_inv).T


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6, 9))
def _gptq(
  w, h, fmt, scaling, block_size, act_order, clip_ratios, damp, shrink, wide
):
  n_in, n_out = w.shape
  # wide: H, U, the weights being updated and the errors in float64 (see
  # gptq's `precision`); the grid and the dequantized values stay float32.
  ft = jnp.float64 if wide else jnp.float32
  dead = jnp.diag(h) == 0
  h = jnp.where(jnp.diag(dead), 1.0, h)
  w = jnp.where(dead[:, None], 0.0, w)
  grid = rtn.block_scales(w, fmt, scaling, clip_ratios, shrink)
  scale, zero = grid.scale_full, grid.zero_full
  if zero is None:
    zero = jnp.zeros_like(scale)
  # NVFP4: the block scale per element, so values round against the exact
  # block * tensor scale (rtn.encode_scaled); ones otherwise (unused).
  two_level = grid.block_full is not None
  block_full = grid.block_full if two_level else jnp.ones_like(scale)

  # Subnormal scales (tiny layers): the float32 estimate divides at 2^shift
  # times x and the scale; float64 reads them exactly (nearest64.widen).
  shift = grid.shift_full
  if shift is None:
    shift = jnp.zeros(scale.shape, jnp.int32)
  if wide:
    unit = nearest64.widen(scale)
    if two_level:
      unit = nearest64.widen(block_full) * nearest64.widen(grid.tensor_scale)
  else:
    unit = scale

  perm = (
    jnp.argsort(-jnp.diag(h), stable=True) if act_order else jnp.arange(n_in)
  )
  wp, sp, zp, bp = w[perm], scale[perm], zero[perm], block_full[perm]
  kp, up = shift[perm], unit[perm]
  hp = h[perm][:, perm].astype(ft)
  hp = hp + damp * jnp.mean(jnp.diag(hp)) * jnp.eye(n_in, dtype=ft)
  u = _upper_cholesky_of_inverse(hp)
  wp = nearest64.widen(wp) if wide else wp

  pad = -n_in % block_size  # static shapes: pad rows, identity in U
  n_p = n_in + pad
  wp = jnp.pad(wp, ((0, pad), (0, 0)))
  sp = jnp.pad(sp, ((0, pad), (0, 0)), constant_values=1.0)
  zp = jnp.pad(zp, ((0, pad), (0, 0)))
  bp = jnp.pad(bp, ((0, pad), (0, 0)), constant_values=1.0)
  kp = jnp.pad(kp, ((0, pad), (0, 0)))
  up = jnp.pad(up, ((0, pad), (0, 0)), constant_values=1.0)
  shifted = jnp.any(kp != 0)
  u = jnp.pad(u, ((0, pad), (0, pad)))
  u = u + jnp.diag(jnp.concatenate([jnp.zeros(n_in, ft), jnp.ones(pad, ft)]))

  code_dtype = exmy.code_dtype(fmt.bits)
  rows = jnp.arange(n_p)

  settle = wide and nearest64.refines(fmt)
  value_bits = tiny_scales.value_bits(fmt, grid.zero_full is not None)

  def estimate(x, s, z, b, k):
    """The float32 rule's codes for x (x * 2^k and s * 2^k where k > 0)."""

    def up(x, s, t):
      if wide:  # float64 holds tiny x exactly: scale it there
        x = jnp.where(k != 0, x * 2.0**tiny_scales.SHIFT, x)
        x = x.astype(jnp.float32)
      else:
        x = power_of_two.ldexp(x, k)
      return x, power_of_two.ldexp(s, k), power_of_two.ldexp(t, k)

    def keep(x, s, t):
      return x.astype(jnp.float32), s, t

    t = jnp.broadcast_to(grid.tensor_scale if two_level else 1.0, s.shape)
    x, s, t = jax.lax.cond(shifted, up, keep, x, s, t)
    return rtn.encode_scaled(
      x, fmt, s, None if two_level else z, (b, t) if two_level else None
    )

  def quantize_row(x, s, z, b, k, unit):
    codes = estimate(x, s, z, b, k)
    if settle:  # decided on the float64 value itself (nearest64)
      codes = nearest64.nearest_code(
        x, codes, fmt, unit, None if two_level else z
      )
    # The error is taken against the value dequantize gives (float32,
    # subnormal products rounded, not flushed).
    value = fmt.decode(codes) - z
    if two_level:
      q = tiny_scales.times_two_level(value, b, grid.tensor_scale)
    else:
      q = tiny_scales.times_scale(value, s, value_bits)
    return codes, nearest64.widen(q) if wide else q

  def block(b, carry: _Carry) -> _Carry:
    i1 = b * block_size
    w1 = jax.lax.dynamic_slice_in_dim(carry.w, i1, block_size, 0)
    u_rows = jax.lax.dynamic_slice_in_dim(u, i1, block_size, 0)  # [B, n_p]
    u1 = jax.lax.dynamic_slice_in_dim(u_rows, i1, block_size, 1)  # [B, B]
    s1 = jax.lax.dynamic_slice_in_dim(sp, i1, block_size, 0)
    z1 = jax.lax.dynamic_slice_in_dim(zp, i1, block_size, 0)
    b1 = jax.lax.dynamic_slice_in_dim(bp, i1, block_size, 0)
    k1 = jax.lax.dynamic_slice_in_dim(kp, i1, block_size, 0)
    n1 = jax.lax.dynamic_slice_in_dim(up, i1, block_size, 0)

    def row(j, state):
      w1, c1, q1, e1, loss = state
      codes, q = quantize_row(w1[j], s1[j], z1[j], b1[j], k1[j], n1[j])
      d = u1[j, j]
      err = (w1[j] - q) / d
      # U1 is upper triangular: this only moves rows >= j of the block.
      w1 = w1 - u1[j][:, None] * err[None, :]
      loss = loss + jnp.sum(err**2) / 2  # (w - q)^2 / (2 U_ii^2)
      return (w1, c1.at[j].set(codes), q1.at[j].set(q), e1.at[j].set(err), loss)

    zeros = jnp.zeros((block_size, n_out), ft)
    w1, c1, q1, e1, loss = jax.lax.fori_loop(
      0,
      block_size,
      row,
      (w1, zeros.astype(code_dtype), zeros, zeros, carry.loss),
    )
    # Lazy batch update of every later row: W[i2:] -= U[i1:i2, i2:]^T E.
    later = (rows >= i1 + block_size)[:, None]
    update = jnp.matmul(u_rows.T, e1, precision=_HI)
    w = jnp.where(later, carry.w - update, carry.w)
    codes = jax.lax.dynamic_update_slice_in_dim(carry.codes, c1, i1, 0)
    q = jax.lax.dynamic_update_slice_in_dim(carry.q, q1, i1, 0)
    return _Carry(w, codes, q, loss)

  init = _Carry(
    wp,
    jnp.zeros((n_p, n_out), code_dtype),
    jnp.zeros((n_p, n_out), ft),
    jnp.zeros((), ft),
  )
  out = jax.lax.fori_loop(0, n_p // block_size, block, init)
  inverse = jnp.argsort(perm)
  codes = out.codes[:n_in][inverse]
  q = out.q[:n_in][inverse]
  diff = (nearest64.widen(w) if wide else w) - q
  layer_loss = jnp.sum(diff * jnp.matmul(h.astype(ft), diff, precision=_HI))
  packed = packing.pack(codes, fmt.bits)
  return (
    packed,
    grid.stored,
    grid.zero,
    grid.tensor_scale,
    GPTQInfo(out.loss.astype(jnp.float32), layer_loss.astype(jnp.float32)),
  )


def gptq(
  w: jax.Array,
  h: jax.Array,
  fmt,
  scaling: Scaling,
  *,
  block_size: int = 128,
  damp: float = 0.01,
  act_order: bool = False,
  clip_ratios: tuple[float, ...] = (),
  shrink: float = 1.0,
  precision: str = "float64",
) -> tuple[qtensor.QTensor, GPTQInfo]:
  """GPTQ-quantizes one Dense kernel.

  Args:
    w: [in, out] kernel (Flax layout).
    h: [in, in] Hessian proxy (2/n) X^T X of the layer's inputs; its scale
      does not matter (damping is relative).
    fmt: element format (ExMy, IntFormat, Codebook).
    scaling: the grid; blocks, if any, must run along axis 0 (input rows).
    block_size: rows per lazy batch update (paper: 128).
    damp: relative diagonal damping (paper: 0.01).
    act_order: visit rows by descending diag(H).
    clip_ratios: MSE clip search for the grid, as in rtn.
    shrink: step multiplier beta for the grid (MagR), as in rtn.
    precision: 'float64' (default) carries H's factorisation, the weights
      being updated and the errors in float64 and decides every code on the
      float64 value (formats.nearest64), so that machines whose LAPACK and
      BLAS sum in different orders give the same codes (float32 did not:
      one core against two moved SmolLM2's perplexity by 2.5%). 'float32'
      is the paper's arithmetic, about 1.5x faster on CPU. H and the grid
      are float32 either way, unless H comes in float64
      (qjax.quantize(..., calib_precision='float64')).

  Returns:
    (QTensor of w's shape, GPTQInfo).

  Raises:
    ValueError: shapes disagree, the Hessian is not finite, or the damped
      Hessian is not positive definite.
  """
  w = exmy.as_float32(w, "w")
  # A float64 H (calib_precision='float64') is kept by the float64 solve.
  wide_h = precision == "float64" and getattr(h, "dtype", None) == jnp.float64
  h = h if wide_h else jnp.asarray(h, jnp.float32)
  if w.ndim != 2 or h.shape != (w.shape[0], w.shape[0]):
    raise ValueError(
      f"gptq needs w [in, out] and h [in, in]; got {w.shape} and {h.shape}"
    )
  if scaling.mode == "block" and any(a % 2 != 0 for a in scaling.axes):
    # Groups are consecutive input rows: blocks along axis 0 (= -2) only.
    raise ValueError(
      f"gptq groups run along the input axis 0; got blocks along {scaling.axes}"
    )
  if not bool(jnp.all(jnp.isfinite(h))):
    raise ValueError(
      "the Hessian has NaN/Inf values: no calibration data reached this layer?"
    )
  if not bool(jnp.any(h != 0)):
    raise ValueError(
      "the Hessian is all zeros: no calibration data reached this layer"
    )
  if precision not in PRECISIONS:
    raise ValueError(
      f"gptq precision={precision!r} is not one of {', '.join(PRECISIONS)}"
    )
  scaling.block_shape(w.shape)
  fmt_sat = rtn._saturating(fmt)
  with nearest64.float64_allowed():
    packed, stored, zero, tensor_scale, info = _gptq(
      w,
      h,
      fmt_sat,
      scaling,
      block_size,
      act_order,
      tuple(clip_ratios),
      float(damp),
      float(shrink),
      precision == "float64",
    )
  if not bool(jnp.isfinite(info.loss_estimate)):
    raise ValueError(
      "the damped Hessian is not positive definite; raise "
      "damp or check the calibration data"
    )
  qt = qtensor.from_parts((packed, stored, zero, tensor_scale), fmt, scaling, w)
  return qt, info
