"""The two-stream driver (Error Diffusion, GPFQ: qjax.methods.two_stream).

`quantize_two_stream` walks a model block by block (a walk:
qjax.calibration.blocks) and, inside a block, linear layer by linear layer
in execution order. For each
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

With `resume` (qjax.io.resume.BlockLog) each finished block is recorded with
both streams' outputs, so a killed run started again goes on after the last
recorded block with the codes of an uninterrupted run.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from qjax import dispatch, qtensor
from qjax.calibration import blocks, sequential, trees
from qjax.calibration.sequential import _finish
from qjax.methods.base import Stats
from qjax.recipe import Recipe


def _join(*parts: str) -> str:
  """'/'-joined, skipping empty parts (a block that is itself one layer)."""
  return "/".join(p for p in parts if p)


def quantize_two_stream(
  params,
  recipe: Recipe,
  model,
  batches: Sequence,
  *,
  progress: bool = True,
  used: set | None = None,
  input_hook=None,
  resume=None,
):
  """qjax.quantize with two-stream calibration (Error Diffusion's driver).

  Args:
    params: the model's float parameters.
    recipe: rules; each layer's method gets Stats with G, C, both means,
      H = (2/n) X~^T X~ and the layer's float bias.
    model: a walk (qjax.calibration.blocks): a BlockModel, or what
      qjax.calibration.discover finds.
    batches: calibration batches.
    progress: a progress bar over blocks.
    used: collects the indices of the rules that matched.
    input_hook: activation rules for the quantized stream only
      (qjax.activations.hooks.calibration_hook): X~ and the quantized
      blocks' outputs are those of the model with quantized inputs; the
      float stream, the target, stays float.
    resume: a qjax.io.resume.BlockLog. Each finished block is recorded
      with its quantized tree and both streams' outputs (the float and the
      quantized block's, the next block's two inputs); a run started again
      with the same log skips the recorded blocks and gives the codes of an
      uninterrupted run bit for bit.

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
  walk = model
  sequential._check_hook(walk, input_hook)

  def quantized_stream():
    return blocks.input_hook(input_hook)

  calls_f = walk.first_calls(params, batches)
  calls_q = list(calls_f)
  stream_q = params  # the tree as the quantized model has it
  done, outs_f, outs_q = {}, None, None
  start = 0
  if resume is not None:
    saved = resume.start(
      fingerprint(recipe, walk, batches, input_hook), walk.names
    )
    if saved is not None:
      last, recorded, (outs_f, outs_q), saved_used = saved
      done = dict(recorded)
      used |= saved_used
      start = last + 1
      outs_f = jax.tree.map(jnp.asarray, outs_f)
      outs_q = jax.tree.map(jnp.asarray, outs_q)
      if getattr(walk, "needs_tree", False):
        for name, q_block in done.items():
          stream_q = trees.replace(
            stream_q, name, qtensor.dequantize_tree(q_block)
          )
  bar = tqdm(
    walk.names, desc="diffuse+quantize", disable=not progress, initial=start
  )
  for index, name in enumerate(walk.names):
    if index < start:
      continue
    if index:
      calls_f = walk.next_calls(index, outs_f, params, batches)
      with quantized_stream():
        calls_q = walk.next_calls(index, outs_q, stream_q, batches)
    p_float = trees.get(params, name)
    layers = walk.layer_order(name, p_float, calls_f[0])
    # Leaves no linear layer owns (norms, an embedding inside a block) take
    # their data-free rules first, so the quantized stream carries their
    # error.
    kernels = {_join(name, layer, "kernel") for layer in layers}
    q_block, others_used = dispatch.quantize_tree(
      trees.nest(name, p_float), recipe, skip=kernels
    )
    used |= others_used
    q_block = trees.get(q_block, name)
    p_quant = qtensor.dequantize_tree(q_block)  # dequantized values done so far
    for layer in layers:
      path = _join(name, layer, "kernel")
      index_, _ = recipe.match(path, 2)
      if index_ is None:
        continue
      used.add(index_)
      rule = recipe.rules[index_]
      # NaN/Inf weights are named here, before they poison both streams.
      w = dispatch.check_finite(
        path,
        jnp.asarray(trees.get(p_float, _join(layer, "kernel"))),
        rule.nan_policy,
      )
      g = c = mx = mxq = 0.0
      rows = 0.0
      for cf, cq in zip(calls_f, calls_q, strict=True):
        with quantized_stream():  # applied to the quantized call only
          s = walk.layer_stats(name, layer, p_float, p_quant, cf, cq)
        g, c, mx, mxq, rows = (
          g + s[0],
          c + s[1],
          mx + s[2],
          mxq + s[3],
          rows + s[4],
        )
      b_path = _join(layer, "bias")
      bias = trees.get(p_float, b_path) if trees.has(p_float, b_path) else None
      stats = Stats(
        hessian=2.0 * g / rows,
        g=g,
        c=c,
        mean_x=mx / rows,
        mean_xq=mxq / rows,
        rows=rows,
        bias=None if bias is None else jnp.asarray(bias),
      )
      result = dispatch.apply_rule(rule, w, stats, path)
      qt = result.leaf
      q_block = trees.replace(q_block, _join(layer, "kernel"), qt)
      p_quant = trees.replace(
        p_quant, _join(layer, "kernel"), qt.dequantize().astype(w.dtype)
      )
      if result.bias is not None:
        q_block = trees.replace(q_block, b_path, result.bias)
        p_quant = trees.replace(p_quant, b_path, result.bias)
    done[name] = q_block
    outs_f = [walk.run(name, p_float, cf) for cf in calls_f]
    with quantized_stream():
      outs_q = [walk.run(name, p_quant, cq) for cq in calls_q]
    if getattr(walk, "needs_tree", False):
      stream_q = trees.replace(stream_q, name, p_quant)
    if resume is not None:
      resume.block_done(index, name, q_block, (outs_f, outs_q), used)
    bar.update()
  bar.close()
  return _finish(params, recipe, walk, done, None, None, used)


def fingerprint(recipe, walk, batches, input_hook) -> str:
  """sequential.fingerprint, marked as this driver's (a log of GPTQ's
  sequential mode holds one stream's outputs, not two)."""
  return "driver: two-stream\n" + sequential.fingerprint(
    recipe, walk, batches, "float32", None, input_hook
  )
