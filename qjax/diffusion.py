"""Two-stream calibration for Error Diffusion (qjax.quantizers.error_diffusion).

`quantize_diffused` walks a BlockModel (qjax.calibration) block by block and,
inside a block, Dense layer by Dense layer in execution order. For each
layer it runs the block twice per calibration batch:

  float stream      float parameters on the float model's block input: the
                    layer's input rows X;
  quantized stream  the layers quantized so far (dequantized) on the
                    quantized model's block input: the layer's input X~,

and accumulates G = X~^T X~, C = X~^T X and both means in float32 (never
the whole X). q/k/v that share an input each get their own pass, so nothing
assumes a chain. The layer's rule then decides: 'ed' (adjust, then round),
'gpfq', or any other method with H = (2/n) G (the quantized stream's
Hessian, GPTQ's sequential mode). After the block, both streams move on: the
float block on the float input, the quantized block on the quantized input.
Memory holds one block's activations, twice.

Rank-deficient G (fewer calibration rows than inputs, dead inputs) is
handled by the pseudo-inverse and reported in one warning listing the
layers and their ranks.
"""

import functools
import warnings
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from qjax import api, qtensor
from qjax.calibration import BlockModel, is_linear
from qjax.quantizers import error_diffusion as ed
from qjax.recipe import TWO_STREAM, Recipe

_HI = jax.lax.Precision.HIGHEST


def _is_linear_call(context) -> bool:
  return is_linear(context.module) and context.method_name == "__call__"


def _join(*parts: str) -> str:
  """'/'-joined, skipping empty parts (a block that is itself one layer)."""
  return "/".join(p for p in parts if p)


def dense_order(module: nn.Module, params, call: tuple, extra=None) -> list:
  """'/'-joined module paths of the linear layers (Dense, pointwise Conv)
  `module` calls, in order; '' when the module itself is one."""
  order = []

  def record(next_fun, args, kwargs, context):
    if _is_linear_call(context):
      order.append("/".join(context.module.scope.path))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(
      lambda p, c: module.apply({"params": p, **(extra or {})}, *c),
      params,
      call,
    )
  return list(dict.fromkeys(order))


def _inputs_of(module, target, params, extra, call):
  """Rows [n, in] entering the layer at `target` when module runs on call."""

  def sow_input(next_fun, args, kwargs, context):
    if (
      _is_linear_call(context) and "/".join(context.module.scope.path) == target
    ):
      context.module.sow("ed_inputs", "x", args[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(sow_input):
    _, state = module.apply(
      {"params": params, **extra}, *call, mutable=["ed_inputs"]
    )
  xs = jax.tree.leaves(state["ed_inputs"])
  return jnp.concatenate(
    [x.reshape(-1, x.shape[-1]).astype(jnp.float32) for x in xs]
  )


@functools.partial(jax.jit, static_argnums=(0, 1))
def _two_stream_stats(
  module, target, p_float, p_quant, extra, call_float, call_quant
):
  x = _inputs_of(module, target, p_float, extra, call_float)
  xq = _inputs_of(module, target, p_quant, extra, call_quant)
  g = jnp.matmul(xq.T, xq, precision=_HI)
  c = jnp.matmul(xq.T, x, precision=_HI)
  return g, c, x.sum(0), xq.sum(0), jnp.float32(x.shape[0])


def _get(tree, path):
  for key in filter(None, path.split("/")):
    tree = tree[key]
  return tree


def _set(tree, path, value):
  """A copy of nested dict `tree` with `path` set to value."""
  head, *rest = [k for k in path.split("/") if k]
  out = dict(tree)
  out[head] = value if not rest else _set(tree[head], "/".join(rest), value)
  return out


def _has(tree, path):
  try:
    _get(tree, path)
    return True
  except (KeyError, TypeError):
    return False


def quantize_diffused(
  params,
  recipe: Recipe,
  model: BlockModel,
  batches: Sequence,
  *,
  progress: bool = True,
):
  """qjax.quantize with two-stream calibration (Error Diffusion's driver).

  Args:
    params: the model's float parameters.
    recipe: rules; 'ed' takes the option adjust (see
      qjax.quantizers.error_diffusion.ADJUSTS), 'gpfq' the option scales
      (error_diffusion.GPFQ_SCALES); other methods
      get H = (2/n) X~^T X~.
    model: the model cut into blocks (qjax.calibration.BlockModel).
    batches: calibration batches for model.embed.
    progress: a progress bar over blocks.

  Returns:
    The quantized tree (biases corrected where a rule says adjust='bias'
    and the layer has one). Leaves outside the blocks are quantized by the
    recipe without statistics.

  Raises:
    ValueError: no batches; a rule's errors name the parameter path.
  Warns:
    UserWarning listing layers whose G was rank-deficient.
  """
  if not batches:
    raise ValueError("quantize_diffused needs at least one calibration batch")
  rest = {k: v for k, v in params.items() if k not in model.blocks}
  xs_float = [model.embed(rest, b) for b in batches]
  xs_quant = list(xs_float)
  out = dict(params)
  deficient = []
  bar = tqdm(
    model.blocks, desc="diffuse+quantize", disable=not progress, leave=False
  )
  for name in bar:
    module = model.module(name)
    extra = model.variables(name, None)
    extra.pop("params")
    p_float = params[name]
    calls_f = [
      (x, *model.block_args(b)) for x, b in zip(xs_float, batches, strict=True)
    ]
    calls_q = [
      (x, *model.block_args(b)) for x, b in zip(xs_quant, batches, strict=True)
    ]
    layers = dense_order(module, p_float, calls_f[0], extra)
    # Leaves no linear layer owns (depthwise/3x3 convs, norms) take their
    # data-free rules first, so the quantized stream carries their error.
    q_block = _quantize_others(name, p_float, layers, recipe)
    p_quant = api.dequantize(q_block)  # dequantized values done so far
    for layer in layers:
      path = _join(name, layer, "kernel")
      index, _ = recipe.match(path, 2)
      if index is None:
        continue
      rule = recipe.rules[index]
      if rule.method == "skip":
        continue
      # NaN/Inf weights are named here, before they poison both streams.
      w = api._check_finite(
        path,
        jnp.asarray(_get(p_float, _join(layer, "kernel"))),
        rule.nan_policy,
      )
      g = c = mx = mxq = 0.0
      rows = 0.0
      for cf, cq in zip(calls_f, calls_q, strict=True):
        s = _two_stream_stats(module, layer, p_float, p_quant, extra, cf, cq)
        g, c, mx, mxq, rows = (
          g + s[0],
          c + s[1],
          mx + s[2],
          mxq + s[3],
          rows + s[4],
        )
      try:
        qt, bias = _quantize_layer(
          rule,
          w,
          g,
          c,
          mx / rows,
          mxq / rows,
          rows,
          p_float,
          layer,
          deficient,
          path,
        )
      except (ValueError, TypeError) as e:
        raise type(e)(f"parameter {path!r}: {e}") from e
      q_block = _set(q_block, _join(layer, "kernel"), qt)
      p_quant = _set(
        p_quant, _join(layer, "kernel"), api.dequantize(qt).astype(w.dtype)
      )
      if bias is not None:
        q_block = _set(q_block, _join(layer, "bias"), bias)
        p_quant = _set(p_quant, _join(layer, "bias"), bias)
    out[name] = q_block
    xs_float = [module.apply({"params": p_float, **extra}, *c) for c in calls_f]
    xs_quant = [module.apply({"params": p_quant, **extra}, *c) for c in calls_q]
  if deficient:
    warnings.warn(
      "rank-deficient calibration statistics (pseudo-inverse used): "
      + ", ".join(f"{p} rank {r}/{n}" for p, r, n in deficient),
      stacklevel=2,
    )
  out.update(api.quantize(rest, recipe, report_unused=False))
  return out


def _quantize_others(name, block, layers, recipe):
  """The block with every leaf outside the linear layers' kernels
  quantized by its (data-free) rule; the kernels stay float for now."""
  kernels = {_join(name, layer, "kernel") for layer in layers}
  leaves, treedef = jax.tree_util.tree_flatten_with_path(block)
  out = []
  for p, w in leaves:
    path = _join(name, api.path_str(p))
    if path in kernels:
      out.append(w)
      continue
    index, _ = recipe.match(path, w.ndim)
    if index is not None and recipe.rules[index].method in TWO_STREAM:
      raise ValueError(
        f"parameter {path!r}: method {recipe.rules[index].method!r} reaches "
        "a layer that is not Dense or a pointwise conv; give it a data-free "
        "rule (e.g. rtn) first in the recipe"
      )
    out.append(api.quantize_leaf(path, w, recipe)[0])
  return jax.tree_util.tree_unflatten(treedef, out)


def _quantize_layer(
  rule, w, g, c, mean_x, mean_xq, rows, p_float, layer, deficient, path
):
  if w.ndim > 2:  # a pointwise conv [1, 1, in, out]: quantize the matrix
    qt, bias = _quantize_layer(
      rule,
      w.reshape(w.shape[-2:]),
      g,
      c,
      mean_x,
      mean_xq,
      rows,
      p_float,
      layer,
      deficient,
      path,
    )
    return qtensor.with_leading_unit_axes(qt, w.shape), bias
  kwargs = dict(rule.options)
  if rule.method == "ed":
    how = kwargs.pop("adjust", "lstsq")
    if kwargs:
      raise ValueError(
        f"method 'ed' takes only the option adjust; got {sorted(kwargs)}"
      )
    qt, info = ed.error_diffusion(
      w, g, c, rule.fmt, rule.scaling, adjust_step=how
    )
    if int(info.rank) >= 0 and int(info.rank) < w.shape[0]:
      deficient.append((path, int(info.rank), w.shape[0]))
    bias = None
    if how == "bias":
      b_path = _join(layer, "bias")
      b = _get(p_float, b_path) if _has(p_float, b_path) else None
      if b is not None:
        q = api.dequantize(qt)
        bias = ed.bias_correction(b, w, q, mean_x, mean_xq).astype(b.dtype)
    return qt, bias
  if rule.method == "gpfq":
    scales = kwargs.pop("scales", "weights")
    if kwargs:
      raise ValueError(
        f"method 'gpfq' takes only the option scales; got {sorted(kwargs)}"
      )
    return ed.gpfq(w, g, c, rule.fmt, rule.scaling, scales=scales), None
  return api._apply_rule(rule, w, 2.0 * g / rows, None, kwargs), None
