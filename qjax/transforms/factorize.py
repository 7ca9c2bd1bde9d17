"""Quantization-aware CP factorization (QAF; Cherniuk et al., arXiv:2308.04595).

A conv kernel becomes a 3-way tensor X [Cout, Cin, kh*kw] (the spatial modes
merged, as the authors' code does) and a Dense kernel a matrix X [out, in];
QAF solves

    min ||X - [[A, B, C]]||_F^2   with every factor entry on a b-bit grid

by alternating least squares whose per-factor step is ADMM (AO-ADMM, Huang
et al. 2016). For factor H with Gram G (Hadamard product of the other
factors' Grams) and MTTKRP F:

    rho = tr(G) / R,  L = chol(G + rho I)             (once per factor step)
    H~  = (G + rho I)^-1 (F + rho (H + U))^T          (transposed back)
    H   = Q(H~ - U),  U = U + H - H~                   (projection, dual)
    stop when ||H - H~||^2/||H||^2 and ||H - H_prev||^2/||U||^2 < eps

and the sweep stops when the relative error e_t = ||X - [[A,B,C]]||/||X||
changes by less than `tol`, or rises by more than 1e-3 over 4 sweeps (the
authors' divergence guard), or after `sweeps`. U persists across sweeps.

Q (the authors' `tensor_mseminmax_symmetric`): one scale per factor matrix,
symmetric, t the MSE-best of `candidates` values in [0.2, 1.2] max|x|,
searched again at every call (the grid moves during ADMM). For intN the
scale is 2t/(2^b - 1) with codes in [-2^(b-1), 2^(b-1)-1], as theirs; for
float formats (eXmY) it is t / max_elem.

What is ours, not the paper's (its PDF was not available; see
../shared/papers/qaf.md):
  * Initialization: plain CP-ALS in float32 with a tiny ridge, not
    tensorly's float64 parafac + EPC rounds (no tensorly here). Keyword
    `init_sweeps`.
  * The factors are returned on the ADMM grid itself (the authors
    re-quantize with a fresh 1000-candidate search afterwards).
  * The weight matrix / tensor is scaled so max|X| = 1 inside the solver and
    the scale is folded back into A (the grid is scale-invariant).
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qjax import qtensor
from qjax.formats import integer, packing
from qjax.formats.scaling import per_tensor

_HI = jax.lax.Precision.HIGHEST


def cp_rank(shape: tuple[int, ...], rate: float) -> int:
  """The authors' rank for a compression `rate`: a conv [kh, kw, Cin, Cout]
  gives R = floor(Cout Cin k^2 / ((Cout + Cin + k^2) rate)) (k^2 one mode);
  a Dense [in, out] R = floor(in out / ((in + out) rate)).

  Raises:
    ValueError: rate <= 0, or a rate so high that R = 0.
  """
  if rate <= 0:
    raise ValueError(f"compression rate must be > 0; got {rate}")
  modes = tensor_modes(shape)
  rank = math.floor(math.prod(modes) / (sum(modes) * rate))
  if rank < 1:
    raise ValueError(
      f"compression rate {rate} gives rank 0 for a kernel {tuple(shape)} "
      f"(modes {modes}); the largest rate with rank 1 is "
      f"{math.prod(modes) / sum(modes):.3g}"
    )
  return rank


def tensor_modes(shape) -> tuple[int, ...]:
  """[kh, kw, Cin, Cout] -> (Cout, Cin, kh*kw); [in, out] and a 1x1 conv
  [1, 1, in, out] -> (out, in), a matrix (the authors' mapping)."""
  if len(shape) == 4 and shape[0] * shape[1] == 1:
    return (shape[3], shape[2])
  if len(shape) == 4:
    kh, kw, cin, cout = shape
    return (cout, cin, kh * kw)
  if len(shape) == 2:
    return (shape[1], shape[0])
  raise ValueError(
    f"QAF factorizes conv [kh,kw,in,out] or Dense [in,out]; got {shape}"
  )


def to_tensor(w: jax.Array) -> jax.Array:
  """Flax kernel -> the factorized tensor: HWIO -> (O, I, h*kw + w)."""
  if w.ndim == 4 and w.shape[0] * w.shape[1] == 1:
    return w[0, 0].T
  if w.ndim == 4:
    kh, kw, cin, cout = w.shape
    return jnp.transpose(w, (3, 2, 0, 1)).reshape(cout, cin, kh * kw)
  return w.T


def from_tensor(x: jax.Array, shape) -> jax.Array:
  """Inverse of to_tensor."""
  if len(shape) == 4 and shape[0] * shape[1] == 1:
    return x.T.reshape(shape)
  if len(shape) == 4:
    kh, kw, cin, cout = shape
    return jnp.transpose(x.reshape(cout, cin, kh, kw), (2, 3, 1, 0))
  return x.T


def reconstruct(factors) -> jax.Array:
  """[[A, B]] = A B^T or [[A, B, C]]_ijk = sum_r A_ir B_jr C_kr."""
  if len(factors) == 2:
    a, b = factors
    return jnp.matmul(a, b.T, precision=_HI)
  a, b, c = factors
  return jnp.einsum("ir,jr,kr->ijk", a, b, c, precision=_HI)


def _gram_and_mttkrp(x, factors, mode):
  """G = Hadamard product of the other factors' Grams; F = X_(mode) times
  the Khatri-Rao product of the others, by einsum (never materialised)."""
  others = [f for m, f in enumerate(factors) if m != mode]
  g = functools.reduce(
    jnp.multiply, [jnp.matmul(f.T, f, precision=_HI) for f in others]
  )
  if len(factors) == 2:
    f = jnp.matmul(x if mode == 0 else x.T, others[0], precision=_HI)
  else:
    spec = {0: "ijk,jr,kr->ir", 1: "ijk,ir,kr->jr", 2: "ijk,ir,jr->kr"}[mode]
    f = jnp.einsum(spec, x, *others, precision=_HI)
  return g, f


class Projection(NamedTuple):
  values: jax.Array  # on the grid
  codes: jax.Array  # element codes (uint)
  scale: jax.Array  # float32 scalar


def _half_range(fmt) -> float:
  if isinstance(fmt, integer.IntFormat) and fmt.signed:
    # s = 2t / (2^b - 1), the authors' int grid (in the format's units).
    return (fmt.qmax - fmt.qmin) / 2 * 2.0**fmt.step_exponent
  return float(fmt.max)


def project(x, fmt, candidates: int = 200) -> Projection:
  """Q(x): one symmetric scale for the whole matrix, the MSE-best of
  `candidates` clipping values t in [0.2, 1.2] max|x| (vmapped)."""
  amax = jnp.max(jnp.abs(x))
  ts = jnp.linspace(0.2, 1.2, candidates, dtype=jnp.float32) * amax
  scales = ts / _half_range(fmt)
  scales = jnp.where(scales > 0, scales, 1.0)

  def one(s):
    codes = fmt.encode(x / s)
    return jnp.sum(jnp.square(fmt.decode(codes) * s - x))

  best = scales[jnp.argmin(jax.vmap(one)(scales))]
  codes = fmt.encode(x / best)
  return Projection(fmt.decode(codes) * best, codes, best)


class ADMMState(NamedTuple):
  step: jax.Array
  h: jax.Array
  u: jax.Array
  r: jax.Array
  s: jax.Array


def admm_factor(g, f, h, u, fmt, *, max_iter: int, eps: float, candidates: int):
  """The ADMM inner loop for one factor (module docstring); returns the new
  (H on the grid, U, ADMMState with the iterations and residuals)."""
  rank = g.shape[0]
  rho = jnp.trace(g) / rank
  rho = jnp.where(rho > 0, rho, 1.0)
  chol = jax.scipy.linalg.cho_factor(g + rho * jnp.eye(rank, dtype=g.dtype))

  def cond(st):
    return (st.step < max_iter) & ((st.r >= eps) | (st.s >= eps))

  def body(st):
    h_tilde = jax.scipy.linalg.cho_solve(chol, (f + rho * (st.h + st.u)).T).T
    h_new = project(h_tilde - st.u, fmt, candidates).values
    u = st.u + h_new - h_tilde
    hh = jnp.sum(h_new * h_new)
    uu = jnp.sum(u * u)
    r = jnp.where(hh > 0, jnp.sum(jnp.square(h_new - h_tilde)) / hh, jnp.inf)
    s = jnp.where(uu > 0, jnp.sum(jnp.square(h_new - st.h)) / uu, jnp.inf)
    return ADMMState(st.step + 1, h_new, u, r, s)

  inf = jnp.asarray(jnp.inf, jnp.float32)
  st = jax.lax.while_loop(cond, body, ADMMState(jnp.int32(0), h, u, inf, inf))
  return st


def cp_als(x, rank: int, sweeps: int, key) -> tuple[jax.Array, ...]:
  """Plain float32 CP-ALS (random normal start, ridge 1e-6 tr(G)/R), the
  initialization we use in place of the authors' parafac + EPC."""
  keys = jax.random.split(key, x.ndim)
  factors = [
    jax.random.normal(k, (n, rank), jnp.float32) / math.sqrt(rank)
    for k, n in zip(keys, x.shape, strict=True)
  ]

  def sweep(_, fs):
    fs = list(fs)
    for mode in range(x.ndim):
      g, f = _gram_and_mttkrp(x, fs, mode)
      ridge = 1e-6 * jnp.trace(g) / rank + 1e-12
      fs[mode] = jnp.linalg.solve(g + ridge * jnp.eye(rank), f.T).T
    return tuple(fs)

  return jax.lax.fori_loop(0, sweeps, sweep, tuple(factors))


class QAFInfo(NamedTuple):
  """sweeps: ALS sweeps run; errors [max sweeps] (relative Frobenius error
  after each sweep, NaN after the last); init_error (the float CP-ALS
  start); inner_steps [max sweeps, modes] ADMM iterations per factor;
  inner_r, inner_s: the last step's residuals per factor."""

  sweeps: jax.Array
  errors: jax.Array
  init_error: jax.Array
  inner_steps: jax.Array
  inner_r: jax.Array
  inner_s: jax.Array


class _Sweep(NamedTuple):
  t: jax.Array
  factors: tuple
  duals: tuple
  errors: jax.Array
  inner_steps: jax.Array
  inner_r: jax.Array
  inner_s: jax.Array
  done: jax.Array


def normalized_start(w, rank: int, init_sweeps: int = 50, key=None):
  """The float start every CP method shares: the kernel's tensor divided
  by its amax (1 for an all-zero kernel), and its CP-ALS start.

  Returns:
    (x, start, amax): x = to_tensor(w) / amax, the initial_factors of x
    (key 0 unless `key` is given), and amax.

  Raises:
    ValueError: a rank < 1 or above prod(modes) / max(modes); NaN/Inf.
  """
  w = jnp.asarray(w, jnp.float32)
  modes = tensor_modes(w.shape)
  full = math.prod(modes) // max(modes)
  if not 1 <= rank <= full:
    raise ValueError(
      f"rank {rank} is outside [1, {full}] for a kernel {tuple(w.shape)} "
      f"(modes {modes})"
    )
  if not bool(jnp.all(jnp.isfinite(w))):
    raise ValueError("the kernel has NaN/Inf values")
  x = to_tensor(w)
  amax = jnp.max(jnp.abs(x))
  amax = jnp.where(amax > 0, amax, 1.0)
  x = x / amax
  key = jax.random.key(0) if key is None else key
  return x, initial_factors(x, rank, init_sweeps, key), amax


@functools.partial(jax.jit, static_argnums=(1, 2))
def initial_factors(x, rank: int, init_sweeps: int, key) -> tuple:
  """CP-ALS start with each column's norm shared equally by the modes
  (folding lambda into one factor would skew that factor's grid)."""
  start = cp_als(x, rank, init_sweeps, key)
  norms = [jnp.linalg.norm(f, axis=0) for f in start]
  geo = functools.reduce(jnp.multiply, norms) ** (1.0 / len(start))
  return tuple(
    f * jnp.where(n > 0, geo / n, 1.0)
    for f, n in zip(start, norms, strict=True)
  )


@functools.partial(
  jax.jit, static_argnames=("fmt", "sweeps", "inner", "candidates")
)
def qaf_factors(x, start, *, fmt, sweeps, inner, eps, tol, candidates):
  """The jitted QAF loops from `start` (factors of x's modes); returns
  (Projection per factor, QAFInfo). cp_quantized wraps it."""
  modes = x.ndim
  norm = jnp.sqrt(jnp.sum(x * x))

  def rel_error(fs):
    return jnp.sqrt(jnp.sum(jnp.square(x - reconstruct(fs)))) / norm

  start = tuple(start)
  init_error = rel_error(start)
  guard = 4  # the authors' e_t - e_{t-4} for tensors

  def cond(st):
    return (st.t < sweeps) & ~st.done

  def body(st):
    fs, us = list(st.factors), list(st.duals)
    steps, rs, ss = [], [], []
    for mode in range(modes):
      g, f = _gram_and_mttkrp(x, fs, mode)
      res = admm_factor(
        g,
        f,
        fs[mode],
        us[mode],
        fmt,
        max_iter=inner,
        eps=eps,
        candidates=candidates,
      )
      fs[mode], us[mode] = res.h, res.u
      steps.append(res.step)
      rs.append(res.r)
      ss.append(res.s)
    e = rel_error(fs)
    errors = st.errors.at[st.t].set(e)
    prev = jnp.where(st.t > 0, st.errors[jnp.maximum(st.t - 1, 0)], jnp.inf)
    back = st.errors[jnp.maximum(st.t - guard, 0)]
    converged = jnp.abs(prev - e) < tol
    diverging = (st.t >= 10) & (e - back > 1e-3)
    return _Sweep(
      st.t + 1,
      tuple(fs),
      tuple(us),
      errors,
      st.inner_steps.at[st.t].set(jnp.stack(steps)),
      jnp.stack(rs),
      jnp.stack(ss),
      converged | diverging,
    )

  # The first projection puts the start on the grid (U = 0).
  fs0 = tuple(project(f, fmt, candidates).values for f in start)
  st = jax.lax.while_loop(
    cond,
    body,
    _Sweep(
      jnp.int32(0),
      fs0,
      tuple(jnp.zeros_like(f) for f in start),
      jnp.full((sweeps,), jnp.nan, jnp.float32),
      jnp.zeros((sweeps, modes), jnp.int32),
      jnp.zeros((modes,), jnp.float32),
      jnp.zeros((modes,), jnp.float32),
      jnp.asarray(False),
    ),
  )
  projections = tuple(project(f, fmt, candidates) for f in st.factors)
  info = QAFInfo(
    st.t, st.errors, init_error, st.inner_steps, st.inner_r, st.inner_s
  )
  return projections, info


class CPFactors(NamedTuple):
  """QAF output: factors as QTensors (A [m0, R], B [m1, R], C [m2, R] of
  the tensor's modes, see tensor_modes), the kernel shape, and QAFInfo."""

  factors: tuple
  shape: tuple
  info: QAFInfo

  def dequantize(self) -> jax.Array:
    """The kernel [[A, B, C]] in its Flax layout."""
    return kernel_from_factors(self.factors, self.shape)

  @property
  def nbytes(self) -> int:
    return sum(f.nbytes for f in self.factors)


def cp_quantized(
  w,
  rank: int,
  fmt,
  *,
  sweeps: int = 100,
  inner: int = 300,
  eps: float = 1e-8,
  tol: float = 1e-5,
  init_sweeps: int = 50,
  candidates: int = 200,
  key=None,
) -> CPFactors:
  """QAF: CP factors of a conv or Dense kernel with every entry on `fmt`'s
  grid (one scale per factor matrix).

  Args:
    w: a Flax kernel, conv [kh, kw, Cin, Cout] or Dense [in, out].
    rank: R, 1 <= R <= the tensor's full-rank bound (cp_rank gives R from a
      compression rate).
    fmt: element format (int4, int8, an eXmY, ...; qjax.formats.get).
    sweeps: ALS sweeps cap (authors: 5000; 1000 in their README).
    inner: ADMM iterations cap per factor step (authors: 1000; their own
      runs hit the cap, see qaf.md).
    eps: ADMM stopping threshold on both residual ratios (authors: 1e-8).
    tol: stop when the relative error changes by less (authors: 1e-5).
    init_sweeps: float CP-ALS sweeps for the start (authors: 50 EPC).
    candidates: clipping values searched per projection (authors: 200).
    key: jax.random key for the CP-ALS start (default key 0).

  Returns:
    CPFactors; info.errors[info.sweeps - 1] is the final relative error.

  Raises:
    ValueError: a rank < 1 or above prod(modes) / max(modes); NaN/Inf.
  Warns:
    UserWarning when the sweep cap was hit before convergence, with the
    last error change.
  """
  import warnings

  x, start, amax = normalized_start(w, rank, init_sweeps, key)
  projections, info = qaf_factors(
    x,
    start,
    fmt=fmt,
    sweeps=sweeps,
    inner=inner,
    eps=eps,
    tol=tol,
    candidates=candidates,
  )
  t = int(info.sweeps)
  if t >= sweeps:
    change = (
      abs(float(info.errors[t - 1] - info.errors[t - 2])) if t > 1 else math.inf
    )
    warnings.warn(
      f"QAF stopped at the sweep cap {sweeps} with relative error "
      f"{float(info.errors[t - 1]):.4g} still changing by {change:.2g} "
      f"(tol {tol}); raise sweeps or tol",
      stacklevel=2,
    )
  factors = []
  for i, p in enumerate(projections):
    scale = p.scale * (amax if i == 0 else 1.0)  # max|X| folded into A
    factors.append(_as_qtensor(p.codes, scale, fmt))
  return CPFactors(tuple(factors), tuple(w.shape), info)


def _as_qtensor(codes, scale, fmt) -> qtensor.QTensor:
  scaling = per_tensor()
  stored = jnp.reshape(
    scale.astype(jnp.float32), scaling.scale_shape(codes.shape)
  )
  qt = qtensor.QTensor(
    packing.pack(codes, fmt.bits),
    stored,
    None,
    None,
    fmt,
    scaling,
    tuple(codes.shape),
    np.dtype(np.float32),
  )
  qt.validate()
  return qt


def cp_then_quantize(
  w, rank: int, fmt, *, init_sweeps: int = 50, candidates: int = 200, key=None
) -> list:
  """The factorize-then-quantize baseline: the same float CP-ALS start QAF
  uses, each factor then projected once with the same quantizer. Returns
  the factors as QTensors (A, B[, C])."""
  _, start, amax = normalized_start(w, rank, init_sweeps, key)
  factors = []
  for i, f in enumerate(start):
    p = project(f, fmt, candidates)
    factors.append(
      _as_qtensor(p.codes, p.scale * (amax if i == 0 else 1.0), fmt)
    )
  return factors


def kernel_from_factors(factors, shape) -> jax.Array:
  """The Flax kernel [[A, B, C]] of QTensor (or float) factors."""
  fs = [
    f.dequantize(jnp.float32) if qtensor.is_qtensor(f) else f for f in factors
  ]
  return from_tensor(reconstruct(fs), shape)
