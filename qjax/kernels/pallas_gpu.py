"""Pallas GPU kernel (Triton lowering) for x @ dequantize(w) on byte planes.

Why Triton and not Mosaic GPU. JAX 0.10.2 lowers Pallas GPU kernels to
Mosaic GPU by default (`jax_pallas_use_mosaic_gpu=True`) and asks new Mosaic
GPU kernels to use `plgpu.kernel`; that backend targets Hopper and newer and
is built around warpgroup MMAs on large tiles. A weight-only quantized
matmul at decode shapes (M = 1..16) is bound by reading the weights, not by
the MMA, and must run on the Ampere/Ada GPUs researchers have as well as on
Hopper. The Triton lowering runs on all of them (and on ROCm), accepts the
bit operations the unpacking needs, and can be lowered on a CPU-only machine,
so the tests check that this kernel lowers on every CI run. We select it
explicitly with `triton.CompilerParams`.

Grid: (Mp / tm, Np / tn, split_k). Each program owns one [tm, tn] output
tile of one K split and walks its K steps (one scale block per step for
block scaling) in a `fori_loop`, keeping 8 float32 accumulators, one per
column slot; XLA sums the splits (deterministic, no atomics).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from qjax.kernels import decode, layout, tile

# The M = 1 loop when matmul's gemv is None (see matmul).
GEMV = "reduce"


def _fma(xk: jax.Array, v: jax.Array) -> jax.Array:
  """[tm, ks] x [ks, w] -> float32 [tm, w] on the CUDA cores (tm < 16).

  A Triton MMA needs 16 rows; at decode (M = 1..4) padding x to 16 would
  multiply the work and the split-K output by 16 / M, so small M broadcasts
  and reduces instead.
  """
  xt = xk.astype(jnp.float32).T  # [ks, tm]
  return jnp.sum(xt[:, :, None] * v[:, None, :], axis=0)


def _split_range(n_steps: int, split_k: int):
  """Split-K: program (i, n, c) sums steps [lo, hi); XLA adds the splits."""
  per_split = -(-n_steps // split_k)
  lo = pl.program_id(2) * per_split
  return lo, jnp.minimum(lo + per_split, n_steps)


def _store(o_ref, accs, scale_ref, scale_format, per_step, w):
  """Writes the 8 slot results, scaled here when scales are per channel."""
  for j, acc in enumerate(accs):
    if not per_step:
      acc = acc * decode.decode_scale(
        scale_ref[pl.ds(0, 1), pl.ds(j * w, w)], scale_format
      )
    o_ref[:, pl.ds(j * w, w)] = acc


def _step_slots(s, planes, scale_ref, zero_ref, pw_meta):
  """K step s: for each of the 8 slots, (values [k_step, w] minus zero
  points, the step's scale row [1, w] or None when scales are per channel
  and applied at the end)."""
  fmt, scale_format, k_step, tile_n, per_step, _, _ = pw_meta
  w = tile_n // tile.SLOTS
  k0 = pl.multiple_of(s * k_step, k_step)
  bytes_ = [p[pl.ds(k0, k_step), :].astype(jnp.int32) for p in planes]
  row = pl.ds(s if per_step else 0, 1)
  for j in range(tile.SLOTS):
    cols = pl.ds(j * w, w)
    zero = zero_ref[row, cols] if zero_ref is not None else None
    scale = None
    if per_step:
      scale = decode.decode_scale(scale_ref[row, cols], scale_format)
    yield tile.slot_values(bytes_, j, fmt, zero), scale


def _kernel(x_ref, *refs, pw_meta, has_zero, gemv):
  fmt, scale_format, k_step, tile_n, per_step, n_steps, split_k = pw_meta
  if gemv == "accumulate" and x_ref.shape[0] == 1:
    return _gemv_kernel(x_ref, *refs, pw_meta=pw_meta, has_zero=has_zero)
  planes, scale_ref, zero_ref, (o_ref,) = tile.split_refs(
    refs, fmt.bits, has_zero
  )
  w = tile_n // tile.SLOTS
  tm = x_ref.shape[0]
  cd = tile.mma_dtype(x_ref.dtype)
  product = tile.dot if tm >= 16 else _fma

  def step(s, accs):
    xk = x_ref[:, pl.ds(pl.multiple_of(s * k_step, k_step), k_step)]
    out = []
    slots = _step_slots(s, planes, scale_ref, zero_ref, pw_meta)
    for acc, (values, scale) in zip(accs, slots, strict=True):
      part = product(xk.astype(cd), values)
      out.append(acc + (part if scale is None else part * scale))
    return tuple(out)

  init = tuple(jnp.zeros((tm, w), jnp.float32) for _ in range(tile.SLOTS))
  accs = jax.lax.fori_loop(*_split_range(n_steps, split_k), step, init)
  _store(o_ref, accs, scale_ref, scale_format, per_step, w)


def _gemv_kernel(x_ref, *refs, pw_meta, has_zero):
  """M = 1 without a reduction per step: each slot keeps a [k_step, w]
  float32 accumulator of x_k * w_kn (scaled per step), summed over k once
  at the end, so the loop body is loads, unpacking and FMAs only."""
  fmt, scale_format, k_step, tile_n, per_step, n_steps, split_k = pw_meta
  planes, scale_ref, zero_ref, (o_ref,) = tile.split_refs(
    refs, fmt.bits, has_zero
  )
  w = tile_n // tile.SLOTS

  def step(s, accs):
    xk = x_ref[:, pl.ds(pl.multiple_of(s * k_step, k_step), k_step)]
    xt = xk.astype(jnp.float32).T  # [ks, 1]
    out = []
    slots = _step_slots(s, planes, scale_ref, zero_ref, pw_meta)
    for acc, (values, scale) in zip(accs, slots, strict=True):
      out.append(acc + xt * (values if scale is None else values * scale))
    return tuple(out)

  init = tuple(jnp.zeros((k_step, w), jnp.float32) for _ in range(tile.SLOTS))
  accs = jax.lax.fori_loop(*_split_range(n_steps, split_k), step, init)
  sums = [jnp.sum(a, axis=0, keepdims=True) for a in accs]  # [1, w] each
  _store(o_ref, sums, scale_ref, scale_format, per_step, w)


def default_tiles(
  m: int, pw: layout.PreparedWeight, target_programs: int = 512
) -> tuple[int, int]:
  """(tile_m, split_k) for M rows: enough programs to fill a GPU.

  M <= 4 takes tile_m = M rounded up to a power of two (the CUDA-core path,
  `_fma`), larger M the MMA path with 16 or 64 rows. Decode shapes have far
  fewer column tiles than an H100 has SMs (132), so K is split until there
  are about `target_programs` programs.
  """
  if m <= 4:
    tile_m = 1 << (m - 1).bit_length()
  else:
    tile_m = 16 if m <= 16 else 64
  kp, np_ = pw.padded_shape
  n_steps = kp // pw.k_step
  programs = -(-m // tile_m) * (np_ // pw.tile_n)
  split_k = 1
  while split_k * 2 <= n_steps and programs * split_k * 2 <= target_programs:
    split_k *= 2
  return tile_m, split_k


@functools.partial(
  jax.jit,
  static_argnames=(
    "tile_m",
    "split_k",
    "interpret",
    "num_warps",
    "num_stages",
    "target_programs",
    "gemv",
  ),
)
def matmul(
  x: jax.Array,
  pw: layout.PreparedWeight,
  *,
  tile_m: int | None = None,
  split_k: int | None = None,
  interpret: bool = False,
  num_warps: int = 4,
  num_stages: int = 3,
  target_programs: int = 512,
  gemv: str | None = None,
) -> jax.Array:
  """x [M, K] @ pw -> float32 [M, N] (tensor scale applied, not cast).

  x is padded to [Mp, Kp] (tile_m rows, the K steps) here; the weight was
  padded once by `layout.prepare`. tile_m and split_k default to
  `default_tiles`. gemv picks the M = 1 loop: 'reduce' (a K reduction per
  step, `_fma`) or 'accumulate' (`_gemv_kernel`).
  """
  gemv = gemv or GEMV
  if gemv not in ("reduce", "accumulate"):
    raise ValueError(f"gemv must be 'reduce' or 'accumulate', got {gemv!r}")
  auto_m, auto_split = default_tiles(x.shape[0], pw, target_programs)
  tile_m = tile_m or auto_m
  split_k = split_k or auto_split
  m = x.shape[0]
  kp, np_ = pw.padded_shape
  x = tile.pad_activations(x, pw, tile_m)
  mp = x.shape[0]
  tn, w = pw.tile_n, pw.tile_n // tile.SLOTS
  has_zero = pw.zero is not None
  s_rows = pw.scale.shape[0]
  n_steps = kp // pw.k_step
  split_k = max(1, min(split_k, n_steps))
  meta = (
    pw.fmt,
    pw.scale_format,
    pw.k_step,
    tn,
    pw.scale_per_step,
    n_steps,
    split_k,
  )
  in_specs = [pl.BlockSpec((tile_m, kp), lambda i, n, c: (i, 0))]
  in_specs += [pl.BlockSpec((None, kp, w), lambda i, n, c: (n, 0, 0))] * (
    pw.bits
  )
  in_specs += [pl.BlockSpec((s_rows, tn), lambda i, n, c: (0, n))] * (
    1 + has_zero
  )
  operands = [x, *pw.planes, pw.scale] + ([pw.zero] if has_zero else [])
  out = pl.pallas_call(
    functools.partial(_kernel, pw_meta=meta, has_zero=has_zero, gemv=gemv),
    out_shape=jax.ShapeDtypeStruct((split_k, mp, np_), jnp.float32),
    grid=(mp // tile_m, np_ // tn, split_k),
    in_specs=in_specs,
    out_specs=pl.BlockSpec((None, tile_m, tn), lambda i, n, c: (c, i, n)),
    compiler_params=pltriton.CompilerParams(
      num_warps=num_warps, num_stages=num_stages
    ),
    interpret=interpret,
  )(*operands)
  out = out.sum(axis=0) if split_k > 1 else out[0]
  out = out[:m, : pw.shape[1]]
  if pw.tensor_scale is not None:
    out = out * pw.tensor_scale
  return out
