"""The two-stream driver (Error Diffusion, GPFQ: qjax.methods.two_stream).

`quantize_two_stream` walks a BlockModel block by block and,
inside a block, Dense layer by Dense layer in execution order. For each
layer it runs the block twice per calibration batch:

  float stream      float parameters on the float model's block input: the
                    layer's input rows X;
  quantized stream  the layers quantized so far (dequantized) on the
                    quantized model's block input: the layer's input X~,

and accumulates G = X~^T X~, C = X~^T X and both means in float32 (never
the whole X). q/k/v that share an input each get their own pass, so nothing
assumes a chain. The layer's rule then runs with Stats holding G, C, both
means and H = (2/n) G (the quantized stream's Hessian, GPTQ's sequential
mode), so any method runs here. After the block, both streams move on: the
float block on the float input, the quantized block on the quantized input.
Memory holds one block's activations, twice.

Rank-deficient G (fewer calibration rows than inputs, dead inputs) is
handled by the pseudo-inverse and reported in a warning naming the layer.
"""

from collections.abc import Sequence

import jax.numpy as jnp
from tqdm.auto import tqdm

from qjax import dispatch, qtensor
from qjax.calibration.blocks import BlockModel
from qjax.calibration.capture import linear_order, two_stream_stats
from qjax.methods.base import Stats
from qjax.recipe import Recipe


def _join(*parts: str) -> str:
  """'/'-joined, skipping empty parts (a block that is itself one layer)."""
  return "/".join(p for p in parts if p)


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


def quantize_two_stream(
  params,
  recipe: Recipe,
  model: BlockModel,
  batches: Sequence,
  *,
  progress: bool = True,
  used: set | None = None,
):
  """qjax.quantize with two-stream calibration (Error Diffusion's driver).

  Args:
    params: the model's float parameters.
    recipe: rules; each layer's method gets Stats with G, C, both means,
      H = (2/n) X~^T X~ and the layer's float bias.
    model: the model cut into blocks (qjax.calibration.BlockModel).
    batches: calibration batches for model.embed.
    progress: a progress bar over blocks.
    used: collects the indices of the rules that matched.

  Returns:
    The quantized tree (biases replaced where a method returns one, e.g.
    ErrorDiffusion(adjust='bias') on a layer with a bias). Leaves outside
    the blocks are quantized by the recipe without statistics.

  Raises:
    ValueError: no batches; a rule's errors name the parameter path.
  """
  if not batches:
    raise ValueError("quantize_two_stream needs at least one calibration batch")
  used = set() if used is None else used
  rest = {k: v for k, v in params.items() if k not in model.blocks}
  xs_float = [model.embed(rest, b) for b in batches]
  xs_quant = list(xs_float)
  out = dict(params)
  for name in tqdm(model.blocks, desc="diffuse+quantize", disable=not progress):
    module = model.module(name)
    extra = model.variables(name, None)
    extra.pop("params")
    p_float = params[name]
    calls_f = model.calls(xs_float, batches)
    calls_q = model.calls(xs_quant, batches)
    layers = linear_order(module, p_float, calls_f[0], extra)
    # Leaves no linear layer owns (depthwise/3x3 convs, norms) take their
    # data-free rules first, so the quantized stream carries their error.
    kernels = {_join(name, layer, "kernel") for layer in layers}
    q_block, others_used = dispatch.quantize_tree(
      {name: p_float}, recipe, skip=kernels
    )
    used |= others_used
    q_block = q_block[name]
    p_quant = qtensor.dequantize_tree(q_block)  # dequantized values done so far
    for layer in layers:
      path = _join(name, layer, "kernel")
      index, _ = recipe.match(path, 2)
      if index is None:
        continue
      used.add(index)
      rule = recipe.rules[index]
      # NaN/Inf weights are named here, before they poison both streams.
      w = dispatch.check_finite(
        path,
        jnp.asarray(_get(p_float, _join(layer, "kernel"))),
        rule.nan_policy,
      )
      g = c = mx = mxq = 0.0
      rows = 0.0
      for cf, cq in zip(calls_f, calls_q, strict=True):
        s = two_stream_stats(module, layer, p_float, p_quant, extra, cf, cq)
        g, c, mx, mxq, rows = (
          g + s[0],
          c + s[1],
          mx + s[2],
          mxq + s[3],
          rows + s[4],
        )
      b_path = _join(layer, "bias")
      stats = Stats(
        hessian=2.0 * g / rows,
        g=g,
        c=c,
        mean_x=mx / rows,
        mean_xq=mxq / rows,
        rows=rows,
        bias=_get(p_float, b_path) if _has(p_float, b_path) else None,
      )
      result = dispatch.apply_rule(rule, w, stats, path)
      qt = result.leaf
      q_block = _set(q_block, _join(layer, "kernel"), qt)
      p_quant = _set(
        p_quant, _join(layer, "kernel"), qt.dequantize().astype(w.dtype)
      )
      if result.bias is not None:
        q_block = _set(q_block, b_path, result.bias)
        p_quant = _set(p_quant, b_path, result.bias)
    out[name] = q_block
    xs_float = [module.apply({"params": p_float, **extra}, *c) for c in calls_f]
    xs_quant = [module.apply({"params": p_quant, **extra}, *c) for c in calls_q]
  qrest, rest_used = dispatch.quantize_tree(rest, recipe)
  used |= rest_used
  out.update(qrest)
  return out
