"""Coordinate descent on a fixed grid: MagR's refinement after GPTQ.

The MagR authors' code finishes "MagR+OPTQ" with sweeps of coordinate
descent (as in COMQ, arXiv:2403.07134, and QuantEase, arXiv:2309.01885) on
the codes GPTQ produced, keeping GPTQ's grid (scales, zero points) fixed.
With S = H + damp * mean(diag H) I and D = W0 - Q, each sweep visits the
input rows j = 0 .. in-1 in order (Gauss-Seidel) and sets row j to the grid
point nearest its unconstrained optimum,

  q_j = quant(w0_j + (sum_{k != j} S_jk d_k) / S_jj),

which is the exact minimiser over the grid of tr(D^T S D) in q_j (the loss
is a 1-D quadratic in each entry, and columns are independent), so the
damped loss never increases. The target is the original W0, not MagR's W'.

Authors' defaults: damp 0.75, one sweep at 3 and 4 bits, 30 at 2 bits.
Their code divides by S_jj + 0.1 with S in raw sum-of-X^T X units; qjax's
H = (2/n) X^T X has another scale, so that constant has no fixed meaning
here and is left out (damping already keeps S_jj > 0). Not verified to
matter; noted as a deviation.
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from qjax import qtensor
from qjax.formats import exmy, packing
from qjax.quantizers import rtn

_HI = jax.lax.Precision.HIGHEST


class CDInfo(NamedTuple):
  """losses: [sweeps + 1] damped layer losses tr(D^T S D), before first."""

  losses: jax.Array


class _Carry(NamedTuple):
  codes: jax.Array  # [in_p, out]
  d: jax.Array  # W0 - Q, [in_p, out]


def _full_grid(qt: qtensor.QTensor):
  """Per-element scale and zero point [in, out] of a QTensor's grid."""
  block_shape = qt.scaling.block_shape(qt.shape)
  scale = qtensor.decode_scale(qt.scale, qt.scaling)
  if qt.tensor_scale is not None:
    scale = scale * qt.tensor_scale
  scale = qtensor.expand_blocks(scale, qt.shape, block_shape)
  zero = jnp.zeros_like(scale)
  if qt.zero is not None:
    zero = qtensor.expand_blocks(
      qt.zero.astype(jnp.float32), qt.shape, block_shape
    )
  return scale, zero


@functools.partial(jax.jit, static_argnums=(3, 4, 6))
def _refine(w0, qt, h, sweeps, fmt, damp, block):
  m = w0.shape[0]
  scale, zero = _full_grid(qt)
  codes = packing.unpack(qt.codes, qt.fmt.bits, qt.shape[-1])
  s = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(m)
  d = w0 - (fmt.decode(codes) - zero) * scale

  def loss(d):
    return jnp.sum(d[:m] * jnp.matmul(s, d[:m], precision=_HI))

  # Static shapes: pad rows to a multiple of the block. A pad row has S = 1
  # on its diagonal and 0 elsewhere, w0 = 0 and scale 0, so it stays 0 and
  # touches no real row.
  pad = -m % block
  n_p = m + pad
  s_p = jnp.pad(s, ((0, pad), (0, pad))) + jnp.diag(
    jnp.concatenate([jnp.zeros(m), jnp.ones(pad)])
  )
  w0_p, scale_p, zero_p = (
    jnp.pad(a, ((0, pad), (0, 0))) for a in (w0, scale, zero)
  )
  diag = jnp.diag(s_p)

  def block_step(b, c: _Carry) -> _Carry:
    i1 = b * block
    s_rows = jax.lax.dynamic_slice_in_dim(s_p, i1, block, 0)  # [B, n_p]
    s_bb = jax.lax.dynamic_slice_in_dim(s_rows, i1, block, 1)  # [B, B]
    # Lazy: S D for this block's rows only, kept current inside the block.
    g = jnp.matmul(s_rows, c.d, precision=_HI)  # [B, out]

    w0_b, scale_b, zero_b, diag_b = (
      jax.lax.dynamic_slice_in_dim(a, i1, block, 0)
      for a in (w0_p, scale_p, zero_p, diag)
    )

    def row(k, state):
      # Block-local rows only: no full-size array is touched per row.
      g, codes, d = state
      others = g[k] - diag_b[k] * d[k]  # sum_{l != j} S_jl d_l
      target = w0_b[k] + others / diag_b[k]
      sk, zk = scale_b[k], zero_b[k]
      y = jnp.where(sk > 0, target / sk, 0.0) + zk
      new_codes = fmt.encode(y)
      d_k = jnp.where(sk > 0, w0_b[k] - (fmt.decode(new_codes) - zk) * sk, 0.0)
      g = g + s_bb[:, k][:, None] * (d_k - d[k])[None, :]
      return g, codes.at[k].set(new_codes), d.at[k].set(d_k)

    codes_b = jax.lax.dynamic_slice_in_dim(c.codes, i1, block, 0)
    d_b = jax.lax.dynamic_slice_in_dim(c.d, i1, block, 0)
    _, codes_b, d_b = jax.lax.fori_loop(0, block, row, (g, codes_b, d_b))
    return _Carry(
      jax.lax.dynamic_update_slice_in_dim(c.codes, codes_b, i1, 0),
      jax.lax.dynamic_update_slice_in_dim(c.d, d_b, i1, 0),
    )

  def sweep(i, state):
    c, losses = state
    c = jax.lax.fori_loop(0, n_p // block, block_step, c)
    return c, losses.at[i + 1].set(loss(c.d))

  c = _Carry(jnp.pad(codes, ((0, pad), (0, 0))), jnp.pad(d, ((0, pad), (0, 0))))
  losses = jnp.zeros(sweeps + 1).at[0].set(loss(c.d))
  c, losses = jax.lax.fori_loop(0, sweeps, sweep, (c, losses))
  return packing.pack(c.codes[:m], qt.fmt.bits), CDInfo(losses)


def refine(
  w0: jax.Array,
  qt: qtensor.QTensor,
  h: jax.Array,
  *,
  sweeps: int = 1,
  damp: float = 0.75,
  block_size: int = 128,
) -> tuple[qtensor.QTensor, CDInfo]:
  """Re-chooses qt's codes by coordinate descent towards w0; same grid.

  Args:
    w0: [in, out] the original float kernel (Flax layout).
    qt: its quantization (e.g. from gptq), per channel or in groups of
      input rows.
    h: [in, in] Hessian proxy of the layer's inputs.
    sweeps: Gauss-Seidel passes over the input rows (authors: 1 at 3-4
      bits, 30 at 2 bits).
    damp: relative diagonal damping of S (authors: 0.75).
    block_size: rows whose S D is kept current at a time (lazy updates, as
      in GPTQ: one [B, in] x [in, out] matmul per block, then rank-1
      updates of B rows only). Changes speed, not the result.

  Returns:
    (QTensor with qt's scales and new codes, CDInfo).
  """
  w0 = exmy.as_float32(w0, "w0")
  h = jnp.asarray(h, jnp.float32)
  if w0.ndim != 2 or tuple(w0.shape) != qt.shape:
    raise ValueError(f"w0 {w0.shape} does not match the QTensor {qt.shape}")
  if h.shape != (w0.shape[0],) * 2:
    raise ValueError(f"h is {h.shape}; expected {(w0.shape[0],) * 2}")
  if not bool(jnp.all(jnp.isfinite(h))):
    raise ValueError("the Hessian has NaN/Inf values")
  if sweeps < 0:
    raise ValueError(f"sweeps must be >= 0; got {sweeps}")
  codes, info = _refine(
    w0,
    qt,
    h,
    int(sweeps),
    rtn._saturating(qt.fmt),
    jnp.float32(damp),
    int(block_size),
  )
  return dataclasses.replace(qt, codes=codes), info
