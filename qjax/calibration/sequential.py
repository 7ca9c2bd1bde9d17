"""GPTQ's sequential mode (paper §5): the model is cut into blocks (an
embedding, then Transformer blocks); each block's statistics come from
inputs produced by the already-quantized earlier blocks, and memory holds
one block's activations for the calibration set.
"""

import contextlib
import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from qjax import dispatch, qtensor
from qjax.calibration import blocks, trees
from qjax.formats import nearest64
from qjax.methods.base import Stats
from qjax.recipe import Recipe


def _last_calls(calls, tokens):
  """The trailing calls that hold at least `tokens` input rows."""
  taken, count = [], 0
  for c in reversed(calls):
    taken.insert(0, c)
    x = c[0][0]
    count += int(np.prod(x.shape[:-1]))
    if count >= tokens:
      return taken
  raise ValueError(
    f"the last-sample statistics need {tokens} calibration tokens; the "
    f"calibration set has only {count}"
  )


def _stats_for(name, hessians, grams, absmax):
  def stats(path) -> Stats:
    inner = path[len(name) + 1 :]
    return Stats(
      hessian=hessians.get(inner),
      last_sample=grams.get(inner),
      input_absmax=absmax.get(inner),
    )

  return stats


PRECISIONS = ("float32", "float64")


def _widen(tree):
  """Every float32 (or narrower float) array leaf as float64, exactly."""

  def widen(x):
    if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
      return nearest64.widen(x)
    return x

  return jax.tree.map(widen, tree)


def quantize_sequential(
  params,
  recipe: Recipe,
  model,
  batches: Sequence,
  *,
  last_tokens: int = 2048,
  key: jax.Array | None = None,
  progress: bool = True,
  emit: Callable[[str, Any, Any], None] | None = None,
  used: set | None = None,
  precision: str = "float32",
  input_hook=None,
  resume=None,
):
  """qjax.quantize with calibration, block by block (GPTQ's sequential mode).

  Leaves outside the blocks (embeddings, final norm) are quantized by the
  recipe without statistics (so a rule that needs them must not reach
  them). When a rule asks for MagR on the last sample
  (MagR(statistics='last_sample')), the Gram matrix of the last
  `last_tokens` calibration tokens (the authors' one 2048-token sample) is
  captured too.

  `model` is a walk (qjax.calibration.blocks): a BlockModel, or what
  qjax.calibration.discover finds. `params` may be any Mapping of
  top-level names (qjax.io.convert reads each block from disk on access):
  each block is read once. With `emit`, every quantized block (then every
  other top-level entry) is passed to emit(name, quantized tree, float
  tree) as soon as it is ready and not kept; the function then returns {}.
  `used` collects the indices of the rules that matched.

  precision='float64' runs the blocks (the float one for the statistics,
  the quantized one for the next block's inputs) and accumulates H in
  float64, and hands the methods float64 H (GPTQ keeps it; others round it
  to float32). float32 activations differ between machines: XLA's code
  for one instruction set (SSE4.2, like ARM's 128-bit vectors) sums in
  another order than for AVX2/AVX-512, so H and the codes did too; in
  float64 they agree to ~1e-14 (tests/calibration/
  float64_calibration_test.py). About 2x the time of the forward passes.
  The model must compute in its inputs' dtype (a module that casts to
  float32 runs that part in float32).

  `input_hook` (qjax.activations.hooks.calibration_hook): every pass runs
  under activation rules (qjax.calibration.blocks), so each block's inputs
  come from earlier blocks with quantized weights and quantized inputs,
  and H = (2/n) X~^T X~ is taken from each layer's input as its rule
  quantizes it, the matrix the quantized layer multiplies.

  `resume` (qjax.io.resume.BlockLog) records each finished block; a run
  started again with the same log goes on after the last recorded block and
  gives the codes of an uninterrupted run bit for bit. With `emit`, the
  recorded blocks are emitted first, read back from the log one at a time.

  Raises:
    ValueError: no batches, fewer than `last_tokens` tokens when the last
      sample is needed, or an unknown precision.
  """
  if not batches:
    raise ValueError("quantize_sequential needs at least one calibration batch")
  if precision not in PRECISIONS:
    raise ValueError(
      f"calibration precision={precision!r} is not one of "
      f"{', '.join(PRECISIONS)}"
    )
  _check_hook(model, input_hook)
  with blocks.input_hook(input_hook):
    return _sequential(
      params,
      recipe,
      model,
      batches,
      last_tokens,
      key,
      progress,
      emit,
      used,
      precision,
      resume,
    )


def fingerprint(recipe, walk, batches, precision, key, hook) -> str:
  """What a resumable run depends on, as text: the recipe, the blocks, a
  digest of the calibration batches, the precision, the key and the
  activation rules (a log of another run must not be mixed in)."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(batches):
    a = np.asarray(leaf)
    digest.update(f"{a.dtype.name}{a.shape}".encode())
    digest.update(np.ascontiguousarray(a).tobytes())
  if key is not None:
    digest.update(np.asarray(jax.random.key_data(key)).tobytes())
  hook_rules = getattr(hook, "rules", None) if hook is not None else None
  return "\n".join(
    [
      f"recipe: {recipe!r}",
      f"blocks: {list(walk.names)}",
      f"batches+key sha256: {digest.hexdigest()}",
      f"precision: {precision}",
      f"activation rules: {hook_rules!r}",
    ]
  )


def _check_hook(walk, hook):
  if hook is not None and not getattr(walk, "applies_input_hook", False):
    raise ValueError(
      "activation rules during calibration need a walk that applies them "
      "(a BlockModel or one from qjax.calibration.discover); "
      f"{type(walk).__name__} does not set applies_input_hook"
    )


def _sequential(
  params,
  recipe,
  model,
  batches,
  last_tokens,
  key,
  progress,
  emit,
  used,
  precision,
  resume,
):
  wide = precision == "float64"
  context = nearest64.float64_allowed if wide else contextlib.nullcontext
  widen = _widen if wide else (lambda tree: tree)
  used = set() if used is None else used
  walk = model
  with context():
    calls = widen(walk.first_calls(params, batches))
  done, stream = {}, params  # stream: the tree as the quantized model has it
  outputs = None
  start = 0
  if resume is not None:
    hook = blocks.current_hook()
    saved = resume.start(
      fingerprint(recipe, walk, batches, precision, key, hook), walk.names
    )
    if saved is not None:
      last, recorded, outputs, saved_used = saved
      used |= saved_used
      start = last + 1
      with context():  # float64 outputs stay float64
        outputs = jax.tree.map(jnp.asarray, outputs)
      for name, qblock in recorded.items():  # read one at a time
        if getattr(walk, "needs_tree", False):
          stream = trees.replace(stream, name, qtensor.dequantize_tree(qblock))
        if emit is None:
          done[name] = qblock
        else:
          emit(name, qblock, trees.get(params, name))
  bar = tqdm(
    walk.names,
    desc="calibrate+quantize",
    disable=not progress,
    initial=start,
  )
  for index, name in enumerate(walk.names):
    if index < start:
      continue
    block = trees.get(params, name)
    with context():
      if index:
        calls = widen(walk.next_calls(index, outputs, stream, batches))
      absmax = {}
      hessians = walk.hessians(name, widen(block), calls, absmax_out=absmax)
      grams = {}
      if recipe.needs_last_sample:
        grams = walk.hessians(
          name, widen(block), _last_calls(calls, last_tokens)
        )
    qblock, block_used = dispatch.quantize_tree(
      trees.nest(name, block),
      recipe,
      key=None if key is None else jax.random.fold_in(key, index),
      stats_for=_stats_for(name, hessians, grams, absmax),
    )
    used |= block_used
    qblock = trees.get(qblock, name)
    deq = qtensor.dequantize_tree(qblock)
    # The next block sees what the quantized block produces.
    with context():
      outputs = [walk.run(name, widen(deq), c) for c in calls]
    if getattr(walk, "needs_tree", False):
      stream = trees.replace(stream, name, deq)
    if emit is None:
      done[name] = qblock
    else:
      emit(name, qblock, block)
    if resume is not None:
      resume.block_done(index, name, qblock, outputs, used)
    bar.update()
    del block, qblock, deq
  bar.close()
  return _finish(params, recipe, walk, done, key, emit, used)


def _finish(params, recipe, walk, done, key, emit, used):
  """Leaves outside the blocks, quantized without statistics; the tree
  assembled (or each top-level entry emitted)."""
  names = walk.names
  if all("/" not in n for n in names) and hasattr(params, "keys"):
    rest = {k: params[k] for k in params if k not in names}
    qrest, rest_used = dispatch.quantize_tree(rest, recipe, key=key)
    used |= rest_used
    if emit is not None:
      for name, tree in qrest.items():
        emit(name, tree, rest[name])
      return {}
    return {**done, **qrest}
  if emit is not None:
    raise ValueError("emit needs blocks that are top-level entries")
  inside = {
    p
    for name in names
    for p in trees.leaf_paths(trees.nest(name, trees.get(params, name)))
  }
  out, rest_used = dispatch.quantize_tree(params, recipe, key=key, skip=inside)
  used |= rest_used
  for name, qblock in done.items():
    out = trees.replace(out, name, qblock)
  return out
