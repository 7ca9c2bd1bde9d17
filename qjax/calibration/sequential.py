"""GPTQ's sequential mode (paper §5): the model is cut into blocks (an
embedding, then Transformer blocks); each block's statistics come from
inputs produced by the already-quantized earlier blocks, and memory holds
one block's activations for the calibration set.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from qjax import dispatch, qtensor
from qjax.calibration.blocks import BlockModel
from qjax.calibration.capture import dense_hessians
from qjax.methods.base import Stats
from qjax.recipe import Recipe


def _last_calls(calls, tokens):
  """The trailing calls that hold at least `tokens` input rows."""
  taken, count = [], 0
  for c in reversed(calls):
    taken.insert(0, c)
    count += int(np.prod(c[0].shape[:-1]))
    if count >= tokens:
      return taken
  raise ValueError(
    f"the last-sample statistics need {tokens} calibration tokens; the "
    f"calibration set has only {count}"
  )


def _stats(hessians, grams, path) -> Stats:
  return Stats(hessian=hessians.get(path), last_sample=grams.get(path))


def quantize_sequential(
  params,
  recipe: Recipe,
  model: BlockModel,
  batches: Sequence,
  *,
  last_tokens: int = 2048,
  key: jax.Array | None = None,
  progress: bool = True,
  emit: Callable[[str, Any, Any], None] | None = None,
  used: set | None = None,
):
  """qjax.quantize with calibration, block by block (GPTQ's sequential mode).

  Leaves outside the blocks (embeddings, final norm) are quantized by the
  recipe without statistics (so a rule that needs them must not reach
  them). When a rule asks for MagR on the last sample
  (MagR(statistics='last_sample')), the Gram matrix of the last
  `last_tokens` calibration tokens (the authors' one 2048-token sample) is
  captured too.

  `params` may be any Mapping of top-level names (qjax.io.convert reads each
  block from disk on access): each block is read once, and `model.embed`
  sees only the leaves outside the blocks. With `emit`, every quantized
  block (then every other top-level entry) is passed to emit(name,
  quantized tree, float tree) as soon as it is ready and not kept; the
  function then returns {}. `used` collects the indices of the rules that
  matched.

  Raises:
    ValueError: no batches, or fewer than `last_tokens` tokens when the
      last sample is needed.
  """
  if not batches:
    raise ValueError("quantize_sequential needs at least one calibration batch")
  used = set() if used is None else used
  rest = {k: params[k] for k in params if k not in model.blocks}
  xs = [model.embed(rest, b) for b in batches]
  out = {}
  for index, name in enumerate(
    tqdm(model.blocks, desc="calibrate+quantize", disable=not progress)
  ):
    block = params[name]
    module = model.module(name)
    variables = model.variables(name, block)
    calls = model.calls(xs, batches)
    hessians, _ = dense_hessians(module, variables, calls, prefix=name)
    grams = {}
    if recipe.needs_last_sample:
      grams, _ = dense_hessians(
        module, variables, _last_calls(calls, last_tokens), prefix=name
      )
    qblock, block_used = dispatch.quantize_tree(
      {name: block},
      recipe,
      key=None if key is None else jax.random.fold_in(key, index),
      stats_for=functools.partial(_stats, hessians, grams),
    )
    used |= block_used
    qblock = qblock[name]
    deq = model.variables(name, qtensor.dequantize_tree(qblock))
    # The next block sees what the quantized block produces.
    xs = [module.apply(deq, *c) for c in calls]
    if emit is None:
      out[name] = qblock
    else:
      emit(name, qblock, block)
    del block, variables, qblock, deq, module
  qrest, rest_used = dispatch.quantize_tree(rest, recipe, key=key)
  used |= rest_used
  if emit is None:
    return {**out, **qrest}
  for name, tree in qrest.items():
    emit(name, tree, rest[name])
  return {}
