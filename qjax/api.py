"""quantize / dequantize / plan / stats over parameter pytrees.

`quantize` picks the driver from the statistics the recipe's methods need
(qjax.methods.STATISTICS): none (leaf by leaf), 'hessian' / 'last_sample'
(GPTQ's sequential mode) or 'two_stream' (Error Diffusion's driver); every
driver quantizes each leaf through qjax.dispatch.
"""

import math
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qjax import calibration, dispatch, qtensor
from qjax.activations import hooks as act_hooks
from qjax.methods.base import Stats
from qjax.paths import path_str
from qjax.recipe import Recipe

__all__ = ["dequantize", "path_str", "plan", "quantize", "sqnr_db", "stats"]


def plan(params, recipe: Recipe) -> dict[str, str]:
  """path -> how `quantize` will treat that leaf (for logs and dry runs)."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return {
    path_str(p): recipe.match(path_str(p), np.ndim(x), np.size(x))[1]
    for p, x in leaves
  }


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
  allow_unquantized: bool = False,
  calib_precision: str = "float32",
  activations=None,
  act_scales=None,
  resume=None,
  layer_log: list | None = None,
):
  """Quantizes every leaf a rule of `recipe` decides; others pass through.

  Data-free recipes are traceable: jax.jit(lambda p: quantize(p, r))(params)
  equals the eager result (NaN/Inf checks raise only outside a trace).

  Args:
    params: a pytree of float arrays (e.g. Flax params).
    recipe: the rules (see qjax.recipe).
    key: jax.random key, split per leaf, for stochastic rounding rules.
    calib: (model, batches) or (model, batches, collections): calibrate
      and quantize block by block (qjax.calibration); then hessians/grams
      must be None. `model` is any Linen module (with `collections`, its
      other variables, e.g. {'batch_stats': ...}), any NNX module (then
      `params` is nnx.state(model, nnx.Param)), a walk from
      qjax.calibration.discover(..., blocks=[...]), or a hand-written
      qjax.calibration.BlockModel. Batches are model inputs (or tuples of
      them).
    hessians: {path: H [in, in]} statistics computed elsewhere, for methods
      that need 'hessian'.
    grams: {path: Gram [in, in] of the last calibration sample}, for
      MagR(statistics='last_sample').
    progress: show a progress bar.
    calib_precision: 'float32', or 'float64' to run the calibration
      forward passes and H in float64 so that the statistics (and GPTQ's
      codes) do not depend on the machine's instruction set
      (calibration.quantize_sequential; Hessian methods only).
    activations: a qjax.activations.ActRecipe (with `calib` only): the
      calibration passes run under these activation rules, so a
      calibrated method sees the inputs of the quantized model: each
      block's inputs come from earlier blocks with quantized weights and
      quantized activations, and each layer's statistics (H, or ED's and
      GPFQ's X~) from its input as its rule quantizes it. A kernel that a
      Hadamard or SmoothQuant stage will transform is still float here, so
      the rule quantizes its input in the model's basis.
    act_scales: static scales for `activations`
      (qjax.activations.calibrate on the float model).
    resume: a qjax.io.resume.BlockLog (with `calib`; GPTQ's sequential
      mode and the two-stream driver of ED and GPFQ): every finished block
      is recorded, and a run started again with the same log goes on after
      the last one, with the codes of an uninterrupted run.
    layer_log: a list that gets one dict per quantized leaf: 'path',
      'method', 'seconds' (the method's wall time, compilation included),
      'sqnr_db', and with a Hessian 'loss' = tr(D^T H D) / 2, the mean
      squared output error over calibration rows (GPTQ's objective).
    report_unused: warn about rules that matched nothing.
    allow_unquantized: return the tree unchanged when no leaf matches a
      quantizing rule (otherwise that is an error).

  Returns:
    The same tree with quantized leaves where rules applied.

  Raises:
    ValueError: NaN/Inf in a weight (naming its path) unless its rule sets
      nan_policy='zero'; a block size that does not divide an axis (naming
      the path); statistics a method needs that did not reach a leaf; no
      leaf matching a quantizing rule (listing the rules and a sample of
      the leaf names) unless allow_unquantized.
  Warns:
    UserWarning listing rules that matched no leaf.
  """
  with dispatch.layer_log(layer_log):
    return _quantize(
      params,
      recipe,
      key,
      calib,
      hessians,
      grams,
      progress,
      report_unused,
      allow_unquantized,
      calib_precision,
      activations,
      act_scales,
      resume,
    )


def _quantize(
  params,
  recipe,
  key,
  calib,
  hessians,
  grams,
  progress,
  report_unused,
  allow_unquantized,
  calib_precision,
  activations,
  act_scales,
  resume,
):
  if not allow_unquantized:
    dispatch.require_a_match(
      recipe,
      (
        (path_str(p), np.ndim(x), np.size(x))
        for p, x in jax.tree_util.tree_leaves_with_path(params)
      ),
    )
  used = set()
  if activations is None and act_scales is not None:
    raise ValueError("act_scales given without activations")
  if resume is not None and calib is None:
    raise ValueError("resume= records calibrated runs: give calib= too")
  if activations is not None and calib is None:
    raise ValueError(
      "activations= applies to calibration passes: give calib=(model, "
      "batches) too (qjax.apply(..., activations=) quantizes inputs at "
      "inference)"
    )
  hook = (
    None
    if activations is None
    else act_hooks.calibration_hook(activations, act_scales)
  )
  if calib is not None:
    if hessians is not None or grams is not None:
      raise ValueError("pass either calib or hessians/grams, not both")
    state, params = _pure(params)
    walk, batches = _walk(calib, params)
    if recipe.needs_two_streams:
      if calib_precision != "float32":
        raise ValueError(
          f"calib_precision={calib_precision!r}: two-stream methods (ED, "
          "GPFQ) calibrate in float32 only"
        )
      out = calibration.quantize_two_stream(
        params,
        recipe,
        walk,
        batches,
        progress=progress,
        used=used,
        input_hook=hook,
        resume=resume,
      )
    else:
      out = calibration.quantize_sequential(
        params,
        recipe,
        walk,
        batches,
        key=key,
        progress=progress,
        used=used,
        precision=calib_precision,
        input_hook=hook,
        resume=resume,
      )
    out = _as_state(state, out)
  else:
    hessians, grams = hessians or {}, grams or {}
    out, used = dispatch.quantize_tree(
      params,
      recipe,
      key=key,
      stats_for=lambda p: Stats(
        hessian=hessians.get(p), last_sample=grams.get(p)
      ),
      progress=progress,
    )
  unused = recipe.unused(used)
  if unused and report_unused:
    warnings.warn(
      f"recipe rules matched no parameter: {', '.join(unused)}", stacklevel=3
    )
  return out


def _pure(params):
  """(the NNX state or None, a nested dict of the parameters)."""
  if isinstance(params, nnx.State):
    return params, params.to_pure_dict()
  return None, params


def _as_state(state, out):
  if state is None:
    return out
  new = jax.tree.map(lambda v: v, state)
  nnx.replace_by_pure_dict(new, out)
  return new


def _walk(calib, params):
  """(walk, batches) from quantize's `calib`."""
  if not isinstance(calib, (tuple, list)) or len(calib) not in (2, 3):
    raise ValueError(
      "calib must be (model, batches) or (model, batches, collections)"
    )
  model, batches = calib[0], calib[1]
  collections = calib[2] if len(calib) == 3 else None
  if hasattr(model, "first_calls"):  # a BlockModel or a discovered walk
    if collections:
      raise ValueError("a walk holds its own collections")
    return model, batches
  if not isinstance(model, (nn.Module, nnx.Module)):
    raise TypeError(
      "calib's model must be a Linen or NNX module, a BlockModel or a walk "
      f"from qjax.calibration.discover; got {type(model).__name__}"
    )
  return calibration.discover(
    model, params, batches, collections=collections
  ), batches


def dequantize(tree, dtype=None):
  """Replaces every QTensor (and composite quantized leaf) by its float
  tensor."""
  return qtensor.dequantize_tree(tree, dtype)


def sqnr_db(reference, approx) -> float:
  """10 log10(|x|^2 / |x - y|^2); inf when exact."""
  x = np.asarray(reference, np.float64)
  noise = np.sum((x - np.asarray(approx, np.float64)) ** 2)
  return (
    float("inf") if noise == 0 else float(10 * np.log10(np.sum(x**2) / noise))
  )


def stats(qtree, float_tree=None, *, activation_bits: int = 32) -> dict:
  """Per leaf: bits per weight, bytes stored, and SQNR against `float_tree`.

  Quantized leaves also report `format`, `scaling`, `macs` (per output
  position) and `bops` with activations of `activation_bits` (qjax keeps
  activations in float32); composite leaves (qtensor.CompositeLeaf) add
  their own entries (a residual expansion its `orders`, a CP kernel its
  `rank`). Unquantized leaves count their own bytes at their own dtype.
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
      entry = {
        "bits_per_weight": q.bits_per_weight,
        "bytes": q.nbytes,
        "quantized": True,
      }
      if qtensor.is_qtensor(q):
        macs, bops = qtensor.qtensor_macs_and_bops(q, activation_bits)
        entry.update(
          format=str(q.fmt), scaling=q.scaling.spec(), macs=macs, bops=bops
        )
      else:
        entry.update(q.describe(activation_bits))
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
