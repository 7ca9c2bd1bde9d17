"""The one dispatcher: a leaf, the rule that decides it and its statistics ->
the rule's method result. Every driver (data-free, GPTQ's sequential mode,
the two-stream driver, checkpoint conversion) quantizes through here, so a
method runs the same way whichever collected its statistics.

Errors and warnings a method raises come out naming the parameter path.
"""

import contextlib
import contextvars
import dataclasses
import math
import time
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from qjax import linear_layers, qtensor
from qjax.formats import packing
from qjax.methods import base
from qjax.paths import path_str
from qjax.quantizers import rtn as rtn_lib
from qjax.recipe import Recipe, Rule
from qjax.transforms import rotated, smoothquant


def check_finite(path: str, w, nan_policy: str):
  """w, or w with NaN/Inf zeroed under nan_policy='zero'.

  Inside a jax trace the values are unknown, so nothing is raised there (a
  host sync is impossible); 'zero' still applies. Call qjax.quantize
  outside jit once to get the error.

  Raises:
    ValueError: NaN/Inf values under nan_policy='raise', naming `path` and
      the counts.
  """
  finite = jnp.isfinite(w)
  if isinstance(w, jax.core.Tracer):
    if nan_policy == "zero":
      return jnp.where(finite, w, jnp.zeros_like(w))
    return w
  if bool(jnp.all(finite)):
    return w
  if nan_policy == "zero":
    return jnp.where(finite, w, jnp.zeros_like(w))
  n_nan = int(jnp.sum(jnp.isnan(w)))
  n_inf = int(jnp.sum(jnp.isinf(w)))
  raise ValueError(
    f"parameter {path!r} has {n_nan} NaN and {n_inf} Inf values; fix the "
    "weights or set nan_policy='zero' on its rule"
  )


def apply_rule(rule: Rule, w, stats: base.Stats, path: str) -> base.Result:
  """Runs `rule`'s method on the leaf `w` at `path`.

  A method that needs statistics sees a matrix: a conv kernel
  [*taps, in, out] as [taps * in, out], a DenseGeneral kernel [*in, *out]
  as [prod(in), prod(out)], a grouped conv group by group; the result is
  viewed back with the rule's scaling (qtensor.matrix_scaling says which
  scalings map).

  Raises:
    ValueError / TypeError: from the method, or statistics the method needs
      that did not reach this leaf; the message names `path`.
  """
  w = check_finite(path, jnp.asarray(w), rule.nan_policy)
  try:
    missing = sorted(rule.needs - stats.available())
    if missing:
      raise ValueError(
        f"method {rule.method_name!r} needs {' and '.join(missing)} "
        "statistics and none reached this layer: pass calib=(model, "
        "batches) to qjax.quantize (see qjax.calibration). Only layers that "
        "calibration sees (qjax.linear_layers: Dense, DenseGeneral, Einsum, "
        "Conv, and their NNX forms) get statistics: give the others a "
        "data-free rule (e.g. rtn) ahead of this one"
      )
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      start = time.perf_counter()
      result = _run(rule, w, stats)
      log = _LAYER_LOG.get()
      if log is not None and not isinstance(w, jax.core.Tracer):
        log.append(_layer_record(path, rule, w, result, stats, start))
  except (ValueError, TypeError) as e:
    raise type(e)(f"parameter {path!r}: {e}") from e
  for c in caught:  # e.g. QAF's sweep cap: say which parameter it was
    warnings.warn(f"parameter {path!r}: {c.message}", c.category, stacklevel=3)
  return result


# The records of qjax.quantize(..., layer_log=[...]): one per quantized leaf.
_LAYER_LOG = contextvars.ContextVar("qjax_layer_log", default=None)


@contextlib.contextmanager
def layer_log(records: list | None):
  """Appends a record per quantized leaf to `records` inside the block
  (None: records nothing)."""
  token = _LAYER_LOG.set(records)
  try:
    yield records
  finally:
    _LAYER_LOG.reset(token)


def current_layer_log() -> list | None:
  """The list qjax.quantize(..., layer_log=) is filling, or None."""
  return _LAYER_LOG.get()


def _layer_record(path, rule, w, result, stats, start) -> dict:
  """path, method, seconds (the method's wall time, compilation included),
  SQNR of the dequantized leaf, and with a Hessian the calibration loss
  tr(D^T H D) / 2 = mean over calibration rows of |x D|^2 for D = W - Q
  (the objective GPTQ minimizes; the kernel as its [d, out] matrix)."""
  q = result.leaf.dequantize(jnp.float32)
  jax.block_until_ready(q)
  seconds = time.perf_counter() - start
  w32 = np.asarray(w, np.float64)
  diff = w32 - np.asarray(q, np.float64)
  noise = float(np.sum(diff**2))
  signal = float(np.sum(w32**2))
  record = {
    "path": path,
    "method": rule.method_name,
    "seconds": seconds,
    "sqnr_db": float("inf") if noise == 0 else 10 * math.log10(signal / noise),
  }
  h = stats.hessian
  if h is not None and np.ndim(h) == 2:
    d = np.shape(h)[0]
    if diff.size % d == 0:
      m = diff.reshape(d, -1)
      hd = np.asarray(h, np.float64) @ m
      record["loss"] = float(np.sum(m * hd) / 2)
  return record


def _run(rule: Rule, w, stats) -> base.Result:
  if rule.needs and w.ndim > 2:
    return _run_as_matrix(rule, w, stats)
  return rule.method(w, rule.fmt, rule.scaling, stats)


def _first_stat(stats):
  for s in (stats.hessian, stats.last_sample, stats.g):
    if s is not None:
      return s
  raise ValueError("no statistics to view this kernel by")


def _run_as_matrix(rule: Rule, w, stats) -> base.Result:
  """A kernel of rank > 2 (a conv [*taps, in_g, out], a DenseGeneral or
  Einsum kernel [*in, *out]) quantized as its matrix [d, out] against
  statistics [d, d] (or [G, d, d] per feature group of a grouped conv,
  each group's columns with its own statistics), then viewed back."""
  ref = _first_stat(stats)
  grouped = ref.ndim == 3
  d = ref.shape[-1]
  split = w.ndim - 1 if grouped else linear_layers.kernel_split(w.shape, d)
  scaling = qtensor.matrix_scaling(rule.scaling, w.shape, split)
  matrix = w.reshape(d, -1)
  if not grouped:
    inner = rule.method(matrix, rule.fmt, scaling, stats)
    return inner._replace(leaf=_view_back(inner.leaf, w.shape, rule))
  return _run_grouped(rule, w, matrix, scaling, stats)


def _view_back(leaf, shape, rule):
  if isinstance(leaf, (rotated.Rotated, smoothquant.Smoothed)):
    # An input-channel transform: exact for a kernel whose matrix rows are
    # its input channels (1x1 convs); a wider conv's rows are patches.
    if math.prod(shape[:-2]) != 1:
      raise ValueError(
        f"method {rule.method_name!r} transforms input channels, which a "
        f"kernel {tuple(shape)} mixes with its taps; use it on Dense and "
        "1x1 conv kernels"
      )
    inner = _view_back(leaf.inner, shape, rule)
    return dataclasses.replace(leaf, inner=inner, shape=tuple(shape))
  if not qtensor.is_qtensor(leaf):
    raise ValueError(
      f"method {rule.method_name!r} on a kernel {tuple(shape)} gives a "
      f"{type(leaf).__name__}; only QTensor results can be viewed back"
    )
  return qtensor.from_matrix(leaf, shape, rule.scaling)


def _group_stats(stats, g: int):
  pick = {
    f: (v[g] if f in _PER_GROUP and v is not None else v)
    for f, v in stats._asdict().items()
  }
  return base.Stats(**pick)


_PER_GROUP = (
  "hessian",
  "last_sample",
  "g",
  "c",
  "mean_x",
  "mean_xq",
  "input_absmax",
)


def _run_grouped(rule, w, matrix, scaling, stats) -> base.Result:
  """Feature group by feature group: each group's [d, out/G] columns with
  its own statistics; the codes and scales are joined along the outputs.

  A group whose statistics are all zero (a channel no calibration input
  reached, e.g. one ReLU6 zeroes everywhere) has nothing to calibrate
  against: it is rounded to nearest (RTN) on the same grid. Warnings are
  counted over groups, not repeated per group."""
  ref = _first_stat(stats)
  groups = ref.shape[0]
  if scaling.mode == "tensor" or scaling.tensor_scale:
    raise ValueError(
      f"a conv with {groups} feature groups is quantized group by group: "
      "use per-output-channel or input-axis block scales, not one scale "
      "per tensor"
    )
  dead = np.asarray(jnp.all(ref.reshape(groups, -1) == 0, axis=1))
  out = matrix.shape[1] // groups
  results = []
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for g in range(groups):
      cols = slice(g * out, (g + 1) * out)
      if dead[g]:
        result = base.Result(rtn_lib.rtn(matrix[:, cols], rule.fmt, scaling))
      else:
        bias = None if stats.bias is None else stats.bias[cols]
        result = rule.method(
          matrix[:, cols],
          rule.fmt,
          scaling,
          _group_stats(stats, g)._replace(bias=bias),
        )
      if not qtensor.is_qtensor(result.leaf):
        raise ValueError(
          f"method {rule.method_name!r} on a grouped conv gives a "
          f"{type(result.leaf).__name__}; only QTensor results can be joined"
        )
      results.append(result)
  counts = {}
  for c in caught:
    counts[str(c.message)] = counts.get(str(c.message), 0) + 1
  if dead.any():
    counts["saw only zero inputs in calibration: rounded to nearest"] = int(
      dead.sum()
    )
  for message, n in counts.items():
    warnings.warn(f"{n} of {groups} feature groups: {message}", stacklevel=2)
  return _join_groups(results, w.shape, rule.scaling, scaling, stats, out)


def _join_groups(results, shape, tensor_scaling, scaling, stats, out):
  leaves = [r.leaf for r in results]
  first = leaves[0]
  codes = [packing.unpack(q.codes, q.fmt.bits, out) for q in leaves]
  joined = qtensor.QTensor(
    packing.pack(jnp.concatenate(codes, axis=-1), first.fmt.bits),
    jnp.concatenate([q.scale for q in leaves], axis=-1),
    None
    if first.zero is None
    else jnp.concatenate([q.zero for q in leaves], axis=-1),
    None,
    first.fmt,
    scaling,
    (first.shape[0], out * len(leaves)),
    first.dtype,
  )
  bias = None
  if any(r.bias is not None for r in results):  # a group keeps its own
    bias = jnp.concatenate(
      [
        stats.bias[g * out : (g + 1) * out] if r.bias is None else r.bias
        for g, r in enumerate(results)
      ]
    )
  return base.Result(
    qtensor.from_matrix(joined, shape, tensor_scaling),
    tuple(r.info for r in results),
    bias,
  )


def quantize_leaf(
  path: str,
  w,
  recipe: Recipe,
  *,
  key=None,
  stats: base.Stats | None = None,
):
  """One leaf: (leaf or quantized leaf, index of the deciding rule or None).

  `key` is this leaf's own key (drivers fold in the leaf's position);
  conversion programs call this to stream leaf by leaf.
  """
  index, _ = recipe.match(path, np.ndim(w), np.size(w))
  if index is None:
    return w, None
  stats = (stats or base.Stats())._replace(key=key)
  return apply_rule(recipe.rules[index], w, stats, path).leaf, index


def require_a_match(recipe: Recipe, leaves, what: str = "quantize") -> None:
  """Raises ValueError when no leaf of `leaves` ((path, ndim, size) triples)
  is decided by a quantizing rule: a recipe written for other parameter
  names would otherwise pass everything through (or write a float copy)
  and look like success.

  The message lists the rules and a sample of the leaf names, so the
  mismatch shows (e.g. llama.cpp's 'blk.0.attn_q.weight' against 'kernel').
  """
  leaves = list(leaves)
  if not any(recipe.match(p, n, s)[0] is not None for p, n, s in leaves):
    rules = (
      ", ".join(
        f"{i}: {r.pattern!r}" for i, r in enumerate(recipe.rules) if not r.skips
      )
      or "none"
    )
    sample = ", ".join(repr(p) for p, _, _ in leaves[:8])
    raise ValueError(
      f"{what}: no parameter matched a quantizing rule (rules {rules};"
      f" {len(leaves)} leaves, e.g. {sample}). Fix the patterns (qjax.plan "
      "shows each leaf's fate), or pass allow_unquantized=True to quantize "
      "nothing on purpose"
    )


def quantize_tree(
  params,
  recipe: Recipe,
  *,
  key=None,
  stats_for: Callable[[str], base.Stats] | None = None,
  progress: bool = False,
  desc: str = "quantize",
  skip=frozenset(),
):
  """Every leaf of `params` through `quantize_leaf`; leaf i gets
  fold_in(key, i). Paths in `skip` stay as they are (a driver quantizes
  them itself). Returns (tree, indices of the rules that matched)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  used, out = set(), []
  for i, (p, w) in enumerate(tqdm(leaves, desc=desc, disable=not progress)):
    path = path_str(p)
    if path in skip:
      out.append(w)
      continue
    leaf, index = quantize_leaf(
      path,
      w,
      recipe,
      key=None if key is None else jax.random.fold_in(key, i),
      stats=None if stats_for is None else stats_for(path),
    )
    if index is not None:
      used.add(index)
    out.append(leaf)
  return jax.tree_util.tree_unflatten(treedef, out), used
