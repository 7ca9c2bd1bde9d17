"""quantize / dequantize / stats over parameter pytrees."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from qjax import qtensor
from qjax.quantizers import coordinate_descent
from qjax.quantizers.gptq import gptq
from qjax.quantizers.rtn import rtn
from qjax.recipe import CALIBRATED, FACTORIZED, TWO_STREAM, Recipe
from qjax.transforms import residual
from qjax.transforms.magr import magr


def path_str(path) -> str:
  """'/'-joined keys of a jax tree path."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def plan(params, recipe: Recipe) -> dict[str, str]:
  """path -> how `quantize` will treat that leaf (for logs and dry runs)."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return {
    path_str(p): recipe.match(path_str(p), np.ndim(x))[1] for p, x in leaves
  }


def _check_finite(path: str, w, nan_policy: str):
  finite = jnp.isfinite(w)
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


def quantize(
  params,
  recipe: Recipe,
  *,
  key: jax.Array | None = None,
  calib=None,
  hessians=None,
  grams=None,
  progress: bool = False,
  report_unused: bool = True,
):
  """Quantizes every leaf a rule of `recipe` decides; others pass through.

  Args:
    params: a pytree of float arrays (e.g. Flax params).
    recipe: the rules (see qjax.recipe).
    key: jax.random key, split per leaf, for stochastic rounding rules.
    calib: (qjax.calibration.BlockModel, batches): calibrate and quantize
      block by block (GPTQ's sequential mode, see
      qjax.calibration.quantize_sequential); then hessians/grams must be
      None.
    hessians: {path: H [in, in]} for calibrated rules (qjax.calibration).
    grams: {path: Gram [in, in] of the last calibration sample}, for rules
      with magr_statistics='last_sample' (the MagR authors' choice).
    progress: show a progress bar over the leaves.
    report_unused: warn about rules that matched nothing.

  Returns:
    The same tree with QTensor leaves where rules applied.

  Raises:
    ValueError: NaN/Inf in a weight (naming its path) unless its rule sets
      nan_policy='zero'; a block size that does not divide an axis (naming
      the path).
  Warns:
    UserWarning listing rules that matched no leaf.
  """
  if calib is not None:
    if hessians is not None or grams is not None:
      raise ValueError("pass either calib or hessians/grams, not both")
    from qjax import calibration  # calibration itself calls quantize

    model, batches = calib
    if recipe.needs_two_streams:
      from qjax import diffusion

      return diffusion.quantize_diffused(
        params, recipe, model, batches, progress=progress
      )
    return calibration.quantize_sequential(
      params, recipe, model, batches, key=key, progress=progress
    )
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  used = set()
  out = []
  bar = tqdm(leaves, desc="quantize", disable=not progress, leave=False)
  for i, (p, w) in enumerate(bar):
    path = path_str(p)
    leaf, index = quantize_leaf(
      path,
      w,
      recipe,
      key=None if key is None else jax.random.fold_in(key, i),
      hessian=None if hessians is None else hessians.get(path),
      gram=None if grams is None else grams.get(path),
    )
    if index is not None:
      used.add(index)
    out.append(leaf)
  unused = [
    f"{i}: {r.pattern!r}"
    for i, r in enumerate(recipe.rules)
    if i not in used and r.method != "skip"
  ]
  if unused and report_unused:
    warnings.warn(
      f"recipe rules matched no parameter: {', '.join(unused)}", stacklevel=2
    )
  return jax.tree_util.tree_unflatten(treedef, out)


def quantize_leaf(
  path: str, w, recipe: Recipe, *, key=None, hessian=None, gram=None
):
  """One leaf of `quantize`: returns (leaf or QTensor, index of the rule
  that matched or None). `key` is this leaf's own key (quantize folds in the
  leaf's position); conversion programs call this to stream leaf by leaf.
  """
  index, _ = recipe.match(path, np.ndim(w))
  if index is None:
    return w, None
  r = recipe.rules[index]
  w = _check_finite(path, jnp.asarray(w), r.nan_policy)
  kwargs = dict(r.options)
  if kwargs.get("rounding") == "stochastic":
    if key is None:
      raise ValueError(f"{path!r}: stochastic rounding needs quantize(key=)")
    kwargs["key"] = key
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      out = _apply_rule(r, w, hessian, gram, kwargs)
  except (ValueError, TypeError) as e:
    raise type(e)(f"parameter {path!r}: {e}") from e
  for c in caught:  # e.g. QAF's sweep cap: say which parameter it was
    warnings.warn(f"parameter {path!r}: {c.message}", c.category, stacklevel=3)
  return out, index


def _pop_prefixed(kwargs, prefix):
  return {
    k[len(prefix) :]: kwargs.pop(k)
    for k in list(kwargs)
    if k.startswith(prefix)
  }


def _apply_rule(r, w, h, gram, kwargs):
  if r.method in TWO_STREAM:
    raise ValueError(
      f"method {r.method!r} needs the float and the quantized activation "
      "streams: quantize(params, recipe, calib=(block_model, batches)) "
      "(qjax.diffusion)"
    )
  if r.method in FACTORIZED:
    from qjax.transforms import cp_layers  # cp_layers builds on this module

    return cp_layers.factorize_kernel(w, fmt=r.fmt, method=r.method, **kwargs)
  if r.method in CALIBRATED and h is None:
    raise ValueError(
      f"method {r.method!r} needs calibration statistics and none reached "
      "this layer (see qjax.calibration)"
    )
  if r.method in CALIBRATED and w.ndim > 2:
    # A pointwise conv [1, 1, in, out]: its statistics are the matrix's.
    inner = _apply_rule(r, w.reshape(w.shape[-2:]), h, gram, kwargs)
    if not qtensor.is_qtensor(inner):
      raise ValueError(
        f"method {r.method!r} on a conv kernel {w.shape} gives a "
        f"{type(inner).__name__}; only QTensor results can be viewed as convs"
      )
    return qtensor.with_leading_unit_axes(inner, w.shape)
  magr_kwargs = _pop_prefixed(kwargs, "magr_")
  cd_kwargs = _pop_prefixed(kwargs, "cd_")
  pipe_kwargs = _pop_prefixed(kwargs, "pipe_")
  if pipe_kwargs and not r.method.endswith("pipe"):
    raise ValueError(f"pipe_* options apply to pipe methods, not {r.method!r}")
  if r.method.endswith("pipe") and "order" not in pipe_kwargs:
    raise ValueError(f"method {r.method!r} needs the option pipe_order")
  w0 = w
  if r.method.startswith("magr+"):
    statistics = magr_kwargs.pop("statistics", "hessian")
    if statistics not in ("hessian", "last_sample"):
      raise ValueError(
        f"magr_statistics must be 'hessian' or 'last_sample'; got "
        f"{statistics!r}"
      )
    if statistics == "last_sample" and gram is None:
      raise ValueError(
        "magr_statistics='last_sample' needs the last sample's Gram matrix "
        "(quantize(grams=...), see qjax.calibration)"
      )
    x_stats = h if statistics == "hessian" else gram
    w = magr(w, x_stats, **magr_kwargs)[0].astype(w.dtype)
  if r.method.endswith("pipe"):
    if cd_kwargs:
      raise ValueError(f"cd_* options do not apply to {r.method!r}")
    first = None
    if r.method == "gptq+pipe":
      first = gptq(w, h, r.fmt, r.scaling, **kwargs)[0]
    elif kwargs:
      raise ValueError(f"{r.method!r} takes no options {sorted(kwargs)}")
    return residual.expand(w, r.fmt, r.scaling, first=first, **pipe_kwargs)
  if r.method.endswith("gptq"):
    qt = gptq(w, h, r.fmt, r.scaling, **kwargs)[0]
    if cd_kwargs.get("sweeps", 0) > 0:
      # The authors' refinement aims at the original weights, not MagR's.
      qt = coordinate_descent.refine(w0, qt, h, **cd_kwargs)[0]
    return qt
  if cd_kwargs:
    raise ValueError(f"cd_* options apply to gptq methods, not {r.method!r}")
  return rtn(w, r.fmt, r.scaling, **kwargs)


def dequantize(tree, dtype=None):
  """Replaces every QTensor by its float tensor."""
  return jax.tree_util.tree_map(
    lambda x: x.dequantize(dtype) if qtensor.is_quantized(x) else x,
    tree,
    is_leaf=qtensor.is_quantized,
  )


def sqnr_db(reference, approx) -> float:
  """10 log10(|x|^2 / |x - y|^2); inf when exact."""
  x = np.asarray(reference, np.float64)
  noise = np.sum((x - np.asarray(approx, np.float64)) ** 2)
  return (
    float("inf") if noise == 0 else float(10 * np.log10(np.sum(x**2) / noise))
  )


def _macs_and_bops(q, activation_bits: int) -> tuple[int, int]:
  """Multiply-accumulates per output position (token or pixel) and BOPs.

  A kernel [..., d_out] costs prod(shape) MACs per output position; a
  residual expansion costs prod(shape[:-1]) per stored column of each term,
  and BOPs = sum_k MACs_k * bits_k * activation_bits (PIPE's accounting).
  """
  if hasattr(q, "macs_and_bops"):  # e.g. a CP-factorized kernel
    return q.macs_and_bops(activation_bits)
  terms = getattr(q, "terms", (q,))
  macs = bops = 0
  for t in terms:
    m = math.prod(t.shape)
    macs += m
    bops += m * t.fmt.bits * activation_bits
  return macs, bops


def stats(qtree, float_tree=None, *, activation_bits: int = 32) -> dict:
  """Per leaf: bits per weight, bytes stored, and SQNR against `float_tree`.

  Quantized leaves also report `macs` (per output position) and `bops` with
  activations of `activation_bits` (qjax keeps activations in float32);
  residual expansions report their `orders`, CP-factorized kernels
  (qjax.transforms.cp_layers.CPKernel) their `rank` and the MACs of their
  layer sequence at stride 1 (cp_layers.macs counts a strided forward).
  Unquantized leaves count their own bytes at their own dtype.
  """
  q_leaves = jax.tree_util.tree_leaves_with_path(
    qtree, is_leaf=qtensor.is_quantized
  )
  f_leaves = (
    [None] * len(q_leaves)
    if float_tree is None
    else jax.tree_util.tree_leaves(float_tree)
  )
  out = {}
  for (p, q), f in zip(q_leaves, f_leaves, strict=True):
    if qtensor.is_quantized(q):
      first = getattr(q, "terms", getattr(q, "factors", (q,)))[0]
      macs, bops = _macs_and_bops(q, activation_bits)
      quantized = qtensor.is_quantized(first)
      entry = {
        "bits_per_weight": q.bits_per_weight,
        "bytes": q.nbytes,
        "quantized": True,
        "format": str(first.fmt) if quantized else str(first.dtype),
        "scaling": first.scaling.spec() if quantized else None,
        "macs": macs,
        "bops": bops,
      }
      if hasattr(q, "terms"):
        entry["orders"] = len(q.terms)
      if hasattr(q, "rank"):
        entry["rank"] = q.rank
      if f is not None:
        entry["sqnr_db"] = sqnr_db(f, q.dequantize(jnp.float32))
    else:
      size = math.prod(np.shape(q))
      nbytes = size * np.dtype(q.dtype).itemsize
      entry = {
        "bits_per_weight": 8 * nbytes / max(size, 1),
        "bytes": nbytes,
        "quantized": False,
      }
    out[path_str(p)] = entry
  return out
