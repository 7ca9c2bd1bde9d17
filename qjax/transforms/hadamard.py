"""Hadamard rotations (incoherence processing, as in QuIP#, QuaRot and
SpinQuant): an orthogonal R with entries +-1/sqrt(n) spreads an outlier
channel over all n channels, so x R and R^T W quantize with smaller ranges
while (x R)(R^T W) = x W.

R = H_n / sqrt(n) for a Hadamard matrix H_n (entries +-1, H H^T = n I). H_n
is built as Paley(m) (x) Sylvester(2^k) with n = m 2^k, where m is 1, q + 1
(Paley I, q a prime = 3 mod 4) or 2(q + 1) (Paley II, q a prime = 1 mod 4),
e.g. 576 = 72 * 8 (q = 71) and 1536 = 384 * 4 (q = 383), SmolLM2's widths,
and 384 = 384 * 1 (MiniLM's).
`block` > 0 rotates runs of `block` channels instead (a block-diagonal R):
cheaper, and the natural pairing with MX/NVFP4 blocks.

R is randomized, R = D H / sqrt(n) with D a diagonal of random signs drawn
from NumPy's PCG64 with a fixed `seed` (QuIP# and QuaRot do the same): the
plain H maps a vector's mean into its first coordinate (H's first column is
all ones), so a mostly positive input (a GELU or SwiGLU output) would get
one new outlier of size sqrt(n) * mean. seed=None gives the plain H.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

_HI = jax.lax.Precision.HIGHEST


def _is_prime(q: int) -> bool:
  return q > 1 and all(q % d for d in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> np.ndarray:
  """Q[i, j] = chi(j - i), chi the quadratic character mod q."""
  squares = {(i * i) % q for i in range(1, q)}
  chi = np.array([0] + [1 if a in squares else -1 for a in range(1, q)])
  idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
  return chi[idx]


def _paley(m: int) -> np.ndarray | None:
  """A Hadamard matrix of order m by Paley I or II, or None."""
  q = m - 1
  if q % 4 == 3 and _is_prime(q):  # Paley I: I + [[0, 1], [-1, Q]]
    s = np.zeros((m, m), np.int64)
    s[0, 1:], s[1:, 0] = 1, -1
    s[1:, 1:] = _jacobsthal(q)
    return np.eye(m, dtype=np.int64) + s
  if m % 2 == 0:
    q = m // 2 - 1
    if q % 4 == 1 and _is_prime(q):  # Paley II from the conference matrix
      c = np.zeros((q + 1, q + 1), np.int64)
      c[0, 1:], c[1:, 0] = 1, 1
      c[1:, 1:] = _jacobsthal(q)
      a = np.array([[1, -1], [-1, -1]])
      b = np.array([[1, 1], [1, -1]])
      return np.kron(c, a) + np.kron(np.eye(q + 1, dtype=np.int64), b)
  return None


def _sylvester(n: int) -> np.ndarray:
  h = np.ones((1, 1), np.int64)
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h


@functools.lru_cache(maxsize=32)
def hadamard(n: int) -> np.ndarray:
  """An n x n Hadamard matrix (int64 entries +-1, H H^T = n I).

  Raises:
    ValueError: n has no construction here (the message says which n do).
  """
  if n < 1:
    raise ValueError(f"a Hadamard matrix needs n >= 1, got {n}")
  m = n
  while True:
    power = n // m
    base = np.ones((1, 1), np.int64) if m == 1 else _paley(m)
    if m in (1, 2) and base is None:
      base = _sylvester(m)
    if base is not None:
      h = np.kron(base, _sylvester(power))
      if not np.array_equal(h @ h.T, n * np.eye(n, dtype=np.int64)):
        raise AssertionError(f"Hadamard construction failed for n={n}")
      return h
    if m % 2:
      break
    m //= 2
  raise ValueError(
    f"no Hadamard matrix of order {n} is built here: n must be m * 2^k "
    "with m = 1, q + 1 (q a prime = 3 mod 4) or 2(q + 1) (q a prime = 1 "
    "mod 4); use a block size that divides it (block=...)"
  )


@functools.lru_cache(maxsize=64)
def rotation(n: int, block: int = 0, seed: int | None = 0) -> np.ndarray:
  """The orthogonal [n, n] float64 R = D H_n / sqrt(n), or D times the
  block-diagonal H_block / sqrt(block) for block > 0; D = diag of random
  signs from `seed` (identity for seed None).

  Raises:
    ValueError: block does not divide n, or no Hadamard matrix of that
      order is built here.
  """
  size = block or n
  if n % size:
    raise ValueError(f"rotation block {block} does not divide {n}")
  h = hadamard(size).astype(np.float64) / np.sqrt(size)
  r = np.kron(np.eye(n // size), h) if size < n else h
  if seed is not None:
    signs = np.random.default_rng(seed).integers(0, 2, n) * 2 - 1
    r = signs[:, None] * r
  r.setflags(write=False)
  return r


def rotate_last(
  x, block: int = 0, *, transpose: bool = False, seed: int | None = 0
) -> jax.Array:
  """x [..., n] @ R (or @ R^T), in float32 at full precision."""
  n = x.shape[-1]
  r = jnp.asarray(rotation(n, block, seed), jnp.float32)
  m = r.T if transpose else r
  return jnp.matmul(x.astype(jnp.float32), m, precision=_HI)


def rotate_input_axis(
  w, block: int = 0, *, inverse: bool = False, seed: int | None = 0
):
  """R^T w (or R w with inverse=True) along axis -2, the input axis of a
  Dense kernel [in, out] and of an HWIO conv kernel [..., in, out]."""
  n = w.shape[-2]
  r = jnp.asarray(rotation(n, block, seed), jnp.float32)
  m = r if inverse else r.T
  return jnp.einsum("ij,...jk->...ik", m, w.astype(jnp.float32), precision=_HI)
