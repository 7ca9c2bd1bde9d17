"""PIPE / REx residual expansion: W ~ R_1 + R_2 + ... + R_K, each a QTensor.

Yvinec, Dapogny, Bailly: REx (NeurIPS 2023, arXiv:2203.14645) and PIPE
(arXiv:2311.15806). Data-free: only the weight is used.

  R_1 = Q(W),   R_k = Q(W - sum_{j<k} R_j),   k = 2..K

Each order gets its own scales from its own residual, so the error shrinks
by a constant factor per order (`error_bound`). Orders k >= 2 are group
sparse: only the n_keep = ceil(keep * n_out) output channels whose residual
has the largest l2 norm get a term; the others keep their residual for
later orders. n_keep is static, so the expansion keeps static shapes under
jit; the kept channel indices are data (a weight update never recompiles).

Our paper notes could not read the papers' method sections, so these
readings are ours and are keyword arguments:
  * the group is an output channel (the last axis: Dense [in, out], Conv
    [kh, kw, in, out]), ranked by the l2 norm of the current residual
    (`rank_by='residual'`; 'weight' ranks by W instead);
  * the next residual is taken against the sparse sum, so a channel dropped
    at one order can be picked at a later one;
  * the budget `keep` is uniform over layers (REx reports that giving more
    to layers near the head is better; its rule is not known to us).

Storage: order 1 is a dense QTensor [*shape]; a sparse order k is a QTensor
of the kept columns [*shape[:-1], n_keep] plus int32 indices [n_keep], so
`nbytes` counts what a sparse kernel would really read.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from qjax import qtensor
from qjax.formats import exmy, integer
from qjax.formats.scaling import Scaling
from qjax.quantizers import rtn as rtn_lib

RANK_BY = ("residual", "weight")


@qtensor.register_composite
@dataclasses.dataclass(frozen=True)
class Expansion(qtensor.CompositeLeaf):
  """K quantized residual terms of one weight (see the module docstring).

  Invariants:
    terms[k]  QTensor: [*shape] if keep[k] is None, else
              [*shape[:-1], len(keep[k])] (the kept output channels).
    keep[k]   None (dense) or int32 [n_keep] sorted, distinct indices into
              the last axis.
    shape, dtype are static: the weight's logical shape and dtype.
  A member of an ensemble split holds a subset of a model's orders, so the
  first term need not be order 1.
  """

  terms: tuple[qtensor.QTensor, ...]
  keep: tuple[jax.Array | None, ...]
  shape: tuple[int, ...]
  dtype: np.dtype

  @property
  def order(self) -> int:
    return len(self.terms)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    """Bytes stored: every term's codes and scales, and the kept indices."""
    idx = sum(4 * k.shape[0] for k in self.keep if k is not None)
    return sum(t.nbytes for t in self.terms) + idx

  @property
  def bits_per_weight(self) -> float:
    return 8 * self.nbytes / self.size if self.size else 0.0

  def term(self, k: int) -> jax.Array:
    """Order k's dense float32 contribution, [*shape] (zeros off its keep)."""
    values = self.terms[k].dequantize(jnp.float32)
    if self.keep[k] is None:
      return values
    zeros = jnp.zeros(self.shape, jnp.float32)
    return zeros.at[..., self.keep[k]].set(values)

  def dequantize(self, dtype=None) -> jax.Array:
    """sum_k R_k in float32, cast to `dtype` (default: the weight's)."""
    return reconstruct(self).astype(dtype or self.dtype)

  def validate(self) -> None:
    """Raises ValueError if the terms and indices break the invariants."""
    if len(self.terms) != len(self.keep):
      raise ValueError(f"{len(self.terms)} terms but {len(self.keep)} keeps")
    for k, (t, idx) in enumerate(zip(self.terms, self.keep, strict=True)):
      t.validate()
      n = self.shape[-1] if idx is None else idx.shape[0]
      if t.shape != (*self.shape[:-1], n):
        raise ValueError(f"term {k} has shape {t.shape}, want {n} columns")

  # The leaf protocol (qtensor.CompositeLeaf): checkpoints and qjax.stats.
  kind = "expansion"

  def parts(self) -> dict:
    out = {}
    for k, (t, idx) in enumerate(zip(self.terms, self.keep, strict=True)):
      out[f"t{k}"] = t
      if idx is not None:
        out[f"t{k}_keep"] = idx
    return out

  def meta(self) -> dict:
    return {
      "shape": list(self.shape),
      "dtype": str(np.dtype(self.dtype)),
      "order": self.order,
    }

  @classmethod
  def from_parts(cls, meta: dict, parts: dict) -> "Expansion":
    n = int(meta["order"])
    leaf = cls(
      tuple(parts[f"t{k}"] for k in range(n)),
      tuple(parts.get(f"t{k}_keep") for k in range(n)),
      tuple(meta["shape"]),
      np.dtype(meta["dtype"]),
    )
    leaf.validate()
    return leaf

  def describe(self, activation_bits: int) -> dict:
    """Format and scaling of the terms; MACs and BOPs per output position:
    prod(shape[:-1]) per stored column of each term (PIPE's accounting)."""
    counts = [
      qtensor.qtensor_macs_and_bops(t, activation_bits) for t in self.terms
    ]
    return {
      "format": str(self.terms[0].fmt),
      "scaling": self.terms[0].scaling.spec(),
      "macs": sum(m for m, _ in counts),
      "bops": sum(b for _, b in counts),
      "orders": self.order,
    }

  def __repr__(self) -> str:
    cols = [self.shape[-1] if k is None else k.shape[0] for k in self.keep]
    return (
      f"Expansion(order={self.order}, shape={self.shape}, columns={cols}, "
      f"{self.bits_per_weight:.3f} bits/weight)"
    )


jax.tree_util.register_dataclass(
  Expansion, data_fields=["terms", "keep"], meta_fields=["shape", "dtype"]
)


def reconstruct(e: Expansion, orders: int | None = None) -> jax.Array:
  """sum of the first `orders` terms (all by default) in float32, [*shape]."""
  total = jnp.zeros(e.shape, jnp.float32)
  for k in range(e.order if orders is None else orders):
    total = total + e.term(k)
  return total


def n_keep(n_out: int, keep: float) -> int:
  """Columns a sparse order keeps: ceil(keep * n_out), at least 1."""
  return max(1, math.ceil(keep * n_out - 1e-9))


def keeps_per_order(keep, order: int) -> tuple[float, ...]:
  keeps = (keep,) * (order - 1) if np.isscalar(keep) else tuple(keep)
  if len(keeps) != order - 1:
    raise ValueError(
      f"keep has {len(keeps)} entries; order {order} needs {order - 1} (one "
      "per order k >= 2) or a single number"
    )
  for g in keeps:
    if not 0.0 < float(g) <= 1.0:
      raise ValueError(f"keep must lie in (0, 1], got {g}")
  return tuple(float(g) for g in keeps)


def check_grid(fmt, scaling: Scaling) -> None:
  """Raises ValueError for a grid no residual can use (any shape)."""
  if scaling.zero_point or (
    isinstance(fmt, integer.IntFormat) and not fmt.signed
  ):
    raise ValueError(
      f"residual expansion needs a signed, symmetric grid (a residual is "
      f"centred on 0); {fmt} with zero_point={scaling.zero_point} is not"
    )
  if scaling.tensor_scale:
    raise ValueError(
      "residual expansion gives each order its own scales; a second-level "
      "tensor scale (NVFP4) is not supported"
    )


def check_format(fmt, scaling: Scaling, shape, sparse: bool) -> None:
  """Raises ValueError for a format/scaling the expansion cannot use on a
  weight of `shape` (`sparse`: some order keeps fewer channels)."""
  check_grid(fmt, scaling)
  block = scaling.block_shape(tuple(shape))
  if sparse and block[-1] != 1 and block[-1] != shape[-1]:
    raise ValueError(
      f"sparse orders keep whole output channels (the last axis); scale "
      f"blocks of {block[-1]} along that axis would split them. Block along "
      "another axis or use keep=1"
    )


def expand(
  w: jax.Array,
  fmt,
  scaling: Scaling,
  *,
  order: int,
  keep: float | tuple[float, ...] = 1.0,
  rank_by: str = "residual",
  first: qtensor.QTensor | None = None,
) -> Expansion:
  """Residual expansion of one weight into `order` quantized terms.

  Args:
    w: [..., d_out] float weight; the last axis is the output channel.
    fmt: element format of every term (signed int, eXmY, NF4, MX element).
    scaling: scale sharing of every term (per channel, per block along an
      input axis, MX blocks, ...); no zero point.
    order: K >= 1 terms.
    keep: fraction of output channels each order k >= 2 keeps (REx's group
      sparsity, 1 = dense); one number or one per order k >= 2.
    rank_by: 'residual' (default) or 'weight': what the channel l2 norms
      that choose the kept channels are taken on [our reading, see above].
    first: an optional QTensor of w's shape used as R_1 (e.g. from GPTQ);
      orders >= 2 expand what it leaves.

  Returns:
    An Expansion; `reconstruct` sums its terms.

  Raises:
    ValueError: order < 1, keep outside (0, 1], rank_by unknown, a format
      or scaling the expansion cannot use, or `first` of another shape.
  """
  if not isinstance(order, (int, np.integer)) or order < 1:
    raise ValueError(f"order must be an integer >= 1, got {order!r}")
  if rank_by not in RANK_BY:
    raise ValueError(f"rank_by must be one of {RANK_BY}, got {rank_by!r}")
  w = jnp.asarray(w)
  if w.ndim < 1:
    raise ValueError("expand needs a weight of rank >= 1, got a scalar")
  keeps = keeps_per_order(keep, int(order))
  check_format(fmt, scaling, w.shape, any(g < 1 for g in keeps))
  if first is not None and tuple(first.shape) != tuple(w.shape):
    raise ValueError(f"first has shape {first.shape}, weight {w.shape}")
  x = exmy.as_float32(w, "w")
  terms, kept = _expand(x, first, fmt, scaling, keeps, rank_by)
  return Expansion(tuple(terms), tuple(kept), tuple(w.shape), np.dtype(w.dtype))


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _expand(x, first, fmt, scaling, keeps, rank_by):
  n_out = x.shape[-1]
  r1 = first if first is not None else rtn_lib.rtn(x, fmt, scaling)
  terms, kept = [r1], [None]
  total = r1.dequantize(jnp.float32)
  for g in keeps:
    residual = x - total
    if g >= 1.0:
      qt = rtn_lib.rtn(residual, fmt, scaling)
      terms.append(qt)
      kept.append(None)
      total = total + qt.dequantize(jnp.float32)
      continue
    ranked = residual if rank_by == "residual" else x
    axes = tuple(range(x.ndim - 1))
    norms = jnp.sqrt(jnp.sum(jnp.square(ranked), axis=axes))
    # top_k breaks ties towards the lower index; sorting keeps memory order.
    idx = jnp.sort(jax.lax.top_k(norms, n_keep(n_out, g))[1]).astype(jnp.int32)
    qt = rtn_lib.rtn(jnp.take(residual, idx, axis=-1), fmt, scaling)
    terms.append(qt)
    kept.append(idx)
    total = total.at[..., idx].add(qt.dequantize(jnp.float32))
  return terms, kept


def reduction_factor(fmt, scale_format: str) -> float:
  """rho: each order divides the worst-case error by at least this.

  float32 scales (s = amax / max): a value is off by at most half the largest
  gap between neighbouring grid values, so rho = 2 max / max_gap (2^b - 2 for
  a symmetric b-bit integer, 6 for e2m1, 28 for e4m3). E8M0 scales (the OCP
  MX floor rule, elements saturate): amax / s lies in [2^emax, 2^(emax+1)),
  and the error is at most s * max(max_gap / 2, 2^(emax+1) - max), so
  rho = 2^emax / max(max_gap / 2, 2^(emax+1) - max) (2 for mxfp4, 64 for
  mxint8). Other scale formats round a scale down as well as up, which clips
  by a data-dependent amount; no closed form is offered for them.
  """
  values = np.asarray(fmt.values(), np.float64)
  top = float(fmt.max)
  grid = values[np.isfinite(values) & (np.abs(values) <= top)]
  max_gap = float(np.max(np.diff(np.unique(grid))))
  if scale_format == "float32":
    return 2.0 * top / max_gap
  if scale_format == "e8m0":
    emax = math.floor(math.log2(top))
    return 2.0**emax / max(max_gap / 2, 2.0 ** (emax + 1) - top)
  raise ValueError(
    f"no closed-form expansion bound for {scale_format!r} scales; use "
    "float32 or e8m0 (see reduction_factor)"
  )


def error_bound(w, fmt, scaling: Scaling, order) -> jax.Array:
  """The expansion's worst-case error |W - sum_k R_k|, elementwise [*shape].

  Per scale block: amax_block(W) * rho^-order (`reduction_factor`), the bound
  of our notes (for a b-bit integer grid: ||W||_inf / (2^b - 2)^K). Dense
  expansions use an int `order`; for sparse ones pass `orders_per_channel`
  (an int array over the last axis): a channel's residual only shrinks at
  the orders that kept it. That needs blocks that do not span channels.

  Args:
    w: [..., d_out] the weight that was expanded.
    fmt, scaling: the terms' format and scaling.
    order: int K, or int [d_out] orders per output channel.
  """
  check_format(fmt, scaling, np.shape(w), False)
  rho = reduction_factor(fmt, scaling.scale_format)
  x = jnp.abs(exmy.as_float32(jnp.asarray(w), "w"))
  block = scaling.block_shape(x.shape)
  order = jnp.asarray(order)
  if order.ndim and block[-1] != 1:
    raise ValueError(
      "a per-channel order needs scale blocks that do not span channels"
    )
  amax = rtn_lib.block_reduce(x, block, jnp.max)
  amax = qtensor.expand_blocks(amax, x.shape, block)
  return amax * jnp.power(rho, -order.astype(jnp.float32))


def orders_per_channel(e: Expansion) -> jax.Array:
  """int32 [d_out]: how many of e's terms touch each output channel."""
  count = jnp.zeros(e.shape[-1], jnp.int32)
  for idx in e.keep:
    count = count + 1 if idx is None else count.at[idx].add(1)
  return count


def split(e: Expansion, groups) -> tuple[Expansion, ...]:
  """The ensemble split of one weight: member m holds the orders groups[m].

  Args:
    e: an expansion of order K.
    groups: a partition of range(K), e.g. ((0,), (1, 2)): zero-based orders
      per member. sum_m reconstruct(member_m) == reconstruct(e).
  """
  flat = sorted(k for g in groups for k in g)
  if flat != list(range(e.order)) or any(not g for g in groups):
    raise ValueError(
      f"groups {groups} must partition the orders 0..{e.order - 1} into "
      "non-empty members"
    )
  return tuple(
    Expansion(
      tuple(e.terms[k] for k in g),
      tuple(e.keep[k] for k in g),
      e.shape,
      e.dtype,
    )
    for g in groups
  )
