"""Pallas TPU kernel (Mosaic) for x @ dequantize(w) on byte planes.

Grid: (Mp / tm, Np / tn, Kp / k_step), the K axis last and sequential
("arbitrary"): each step DMAs one [tm, k_step] activation tile and b
contiguous [k_step, tn / 8] byte-plane tiles into VMEM, unpacks them with
shifts and masks (qjax.kernels.tile), and adds 8 MMAs into a float32 VMEM
accumulator. Scales stay in their stored dtype in HBM ([S / r, r, Np], one
block per step's r scale rows) and are decoded in the kernel.

Tile sizes follow Mosaic's (8, 128) rule: tn / 8 is a multiple of 128
(tn >= 1024) and k_step a multiple of 128 unless it is all of K. Untested on
TPU hardware here; the tests run it in interpret mode and check that it
lowers to Mosaic.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from qjax.kernels import decode, layout, tile

_K_STEP = 128  # K rows per grid step: the lane width of the x tile


def _kernel(x_ref, *refs, meta, has_zero):
  fmt, scale_format, per_step, block = meta
  planes, scale_ref, zero_ref, (o_ref, acc_ref) = tile.split_refs(
    refs, fmt.bits, has_zero
  )
  w = acc_ref.shape[1] // tile.SLOTS
  s = pl.program_id(2)

  @pl.when(s == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  xk = x_ref[...].astype(tile.mma_dtype(x_ref.dtype))
  bytes_ = [p[...].astype(jnp.int32) for p in planes]
  rows = xk.shape[1]

  def per_row(a):  # [rows / block, w] block values -> [rows, w]
    r, width = a.shape
    if r == rows:
      return a
    return jnp.broadcast_to(a[:, None, :], (r, block, width)).reshape(
      rows, width
    )

  for j in range(tile.SLOTS):
    cols = pl.ds(j * w, w)
    zero = per_row(zero_ref[:, cols]) if zero_ref is not None else None
    values = tile.slot_values(bytes_, j, fmt, zero)
    if per_step:  # several scale blocks per step: scale before the MMA
      values = values * per_row(
        decode.decode_scale(scale_ref[:, cols], scale_format)
      )
    acc_ref[:, cols] += tile.dot(xk, values)

  @pl.when(s == pl.num_programs(2) - 1)
  def _():
    for j in range(tile.SLOTS):
      cols = pl.ds(j * w, w)
      acc = acc_ref[:, cols]
      if not per_step:
        acc = acc * decode.decode_scale(scale_ref[:, cols], scale_format)
      o_ref[:, cols] = acc


@functools.partial(jax.jit, static_argnames=("tile_m", "interpret"))
def matmul(
  x: jax.Array,
  pw: layout.PreparedWeight,
  *,
  tile_m: int = 16,
  interpret: bool = False,
) -> jax.Array:
  """x [M, K] @ pw -> float32 [M, N] (tensor scale applied, not cast)."""
  m = x.shape[0]
  kp, np_ = pw.padded_shape
  x = tile.pad_activations(x, pw, tile_m)
  mp = x.shape[0]
  tn, block = pw.tile_n, pw.k_step
  ks = max(block, _K_STEP) if pw.scale_per_step else block
  if kp % ks:
    raise ValueError(
      f"padded K={kp} is not a multiple of the TPU K step {ks}; prepare the "
      f"weight with k_multiple={_K_STEP}"
    )
  w = tn // tile.SLOTS
  has_zero = pw.zero is not None
  per_step = pw.scale_per_step
  r = ks // block if per_step else 1  # scale rows per step

  def side(a):  # [S, Np] -> [S / r, r, Np]: a step's scale rows, one block
    return a.reshape(a.shape[0] // r, r, a.shape[1])

  side_index = (
    (lambda i, n, s: (s, 0, n)) if per_step else (lambda i, n, s: (0, 0, n))
  )
  in_specs = [pl.BlockSpec((tile_m, ks), lambda i, n, s: (i, s))]
  in_specs += [pl.BlockSpec((None, ks, w), lambda i, n, s: (n, s, 0))] * (
    pw.bits
  )
  in_specs += [pl.BlockSpec((None, r, tn), side_index)] * (1 + has_zero)
  operands = [x, *pw.planes, side(pw.scale)]
  operands += [side(pw.zero)] if has_zero else []
  out = pl.pallas_call(
    functools.partial(
      _kernel,
      meta=(pw.fmt, pw.scale_format, per_step, block),
      has_zero=has_zero,
    ),
    out_shape=jax.ShapeDtypeStruct((mp, np_), jnp.float32),
    grid=(mp // tile_m, np_ // tn, kp // ks),
    in_specs=in_specs,
    out_specs=pl.BlockSpec((tile_m, tn), lambda i, n, s: (i, n)),
    scratch_shapes=[pltpu.VMEM((tile_m, tn), jnp.float32)],
    compiler_params=pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "arbitrary")
    ),
    interpret=interpret,
  )(*operands)
  out = out[:m, : pw.shape[1]]
  if pw.tensor_scale is not None:
    out = out * pw.tensor_scale
  return out
