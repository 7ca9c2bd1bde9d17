"""Calibration: the input statistics of every Dense layer of a Flax model.

`dense_hessians` runs a Linen module on calibration batches and returns, for
each `nn.Dense` inside it, H = (2/n) X^T X over all n input rows, keyed by
the kernel's parameter path ('layer_3/q/kernel'). X^T X is accumulated in
float32 (HIGHEST precision) batch by batch, so the whole X never exists.

`quantize_sequential` is GPTQ's sequential mode (paper §5): the model is
cut into blocks (an embedding, then Transformer blocks); each block's
statistics come from inputs produced by the already-quantized earlier
blocks, and memory holds one block's activations for the calibration set.
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from qjax import api
from qjax.recipe import Recipe

_HI = jax.lax.Precision.HIGHEST


def _add(a, b):
  return a + b


def _zero():
  return 0.0


def is_linear(module: nn.Module) -> bool:
  """A layer whose input rows meet the kernel as one matmul: nn.Dense, or a
  1x1 nn.Conv with stride 1 and no groups (MobileNet's pointwise convs;
  its kernel [1, 1, in, out] is quantized as the matrix [in, out])."""
  if isinstance(module, nn.Dense):
    return True
  if not isinstance(module, nn.Conv):
    return False
  ones = lambda v: v is None or all(int(k) == 1 for k in np.atleast_1d(v))  # noqa: E731
  return (
    ones(module.kernel_size)
    and ones(module.strides)
    and ones(module.kernel_dilation)
    and module.feature_group_count == 1
  )


def _interceptor(next_fun, args, kwargs, context):
  if is_linear(context.module) and context.method_name == "__call__":
    x = args[0].reshape(-1, args[0].shape[-1]).astype(jnp.float32)
    module = context.module
    module.sow(
      "calibration",
      "xtx",
      jnp.matmul(x.T, x, precision=_HI),
      reduce_fn=_add,
      init_fn=_zero,
    )
    module.sow(
      "calibration",
      "rows",
      jnp.float32(x.shape[0]),
      reduce_fn=_add,
      init_fn=_zero,
    )
  return next_fun(*args, **kwargs)


def _capture(module, variables, args):
  with nn.intercept_methods(_interceptor):
    out, state = module.apply(variables, *args, mutable=["calibration"])
  return out, state.get("calibration", {})  # {} for blocks without a layer


_capture_jit = jax.jit(_capture, static_argnums=0)


def _flatten(stats, prefix=()):
  if "xtx" in stats and "rows" in stats:  # the block is itself one layer
    return {"/".join((*prefix, "kernel")): stats}
  out = {}
  for key, value in stats.items():
    if "xtx" in value and "rows" in value:
      out["/".join((*prefix, key, "kernel"))] = value
    else:
      out.update(_flatten(value, (*prefix, key)))
  return out


def dense_hessians(
  module: nn.Module,
  variables,
  batches: Sequence[tuple],
  *,
  prefix: str = "",
) -> tuple[dict[str, jax.Array], list]:
  """Streams H = (2/n) X^T X for every Dense layer of `module`.

  Args:
    module: a Linen module.
    variables: its variables ({'params': ...}).
    batches: argument tuples for `module.apply`, one per batch.
    prefix: prepended to every path (the block's name in a larger tree).

  Returns:
    ({kernel path: H [in, in]}, [the module's output for each batch]).
  """
  sums, outputs = {}, []
  for args in batches:
    out, stats = _capture_jit(module, variables, tuple(args))
    outputs.append(out)
    for path, s in _flatten(stats).items():
      xtx, rows = sums.get(path, (0.0, 0.0))
      sums[path] = (xtx + s["xtx"], rows + s["rows"])
  pre = f"{prefix}/" if prefix else ""
  return {pre + p: 2.0 * xtx / rows for p, (xtx, rows) in sums.items()}, outputs


class BlockModel(NamedTuple):
  """How to run a model block by block.

  embed(params, batch) -> activations entering the first block (params:
    the top-level entries that are not blocks);
  blocks: the parameter names of the blocks, in order;
  block_module: the Linen module of every block, unless `modules` names
    one for it (models whose blocks differ, e.g. MobileNetV2);
  block_args(batch) -> the extra arguments of a block after x;
  collections: {block: {collection: tree}}, non-parameter variables a
    block needs (e.g. BatchNorm's 'batch_stats').
  """

  embed: Callable[[Any, Any], jax.Array]
  blocks: tuple[str, ...]
  block_module: nn.Module | None
  block_args: Callable[[Any], tuple]
  modules: dict | None = None
  collections: dict | None = None

  def module(self, name: str) -> nn.Module:
    if self.modules and name in self.modules:
      return self.modules[name]
    return self.block_module

  def variables(self, name: str, params) -> dict:
    return {"params": params, **(self.collections or {}).get(name, {})}


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
):
  """qjax.quantize with calibration, block by block (GPTQ's sequential mode).

  Leaves outside the blocks (embeddings, final norm) are quantized by the
  recipe without statistics (so a 'gptq' rule must not reach them). When a
  rule asks for MagR on the last sample (magr_statistics='last_sample'),
  the Gram matrix of the last `last_tokens` calibration tokens (the authors'
  one 2048-token sample) is captured too.

  `params` may be any Mapping of top-level names (qjax.convert reads each
  block from disk on access): each block is read once, and `model.embed`
  sees only the leaves outside the blocks. With `emit`, every quantized
  block (then every other top-level entry) is passed to emit(name,
  quantized tree, float tree) as soon as it is ready and not kept; the
  function then returns {}.

  Raises:
    ValueError: no batches, or fewer than `last_tokens` tokens when the
      last sample is needed.
  """
  if not batches:
    raise ValueError("quantize_sequential needs at least one calibration batch")
  rest = {k: params[k] for k in params if k not in model.blocks}
  xs = [model.embed(rest, b) for b in batches]
  out = {}
  bar = tqdm(
    model.blocks, desc="calibrate+quantize", disable=not progress, leave=False
  )
  for index, name in enumerate(bar):
    block = params[name]
    module = model.module(name)
    variables = model.variables(name, block)
    calls = [
      (x, *model.block_args(b)) for x, b in zip(xs, batches, strict=True)
    ]
    hessians, _ = dense_hessians(module, variables, calls, prefix=name)
    grams = None
    if recipe.needs_last_sample:
      grams, _ = dense_hessians(
        module,
        variables,
        _last_calls(calls, last_tokens),
        prefix=name,
      )
    qblock = api.quantize(
      {name: block},
      recipe,
      key=None if key is None else jax.random.fold_in(key, index),
      hessians=hessians,
      grams=grams,
      report_unused=False,
    )[name]
    deq = model.variables(name, api.dequantize(qblock))
    # The next block sees what the quantized block produces.
    xs = [module.apply(deq, *c) for c in calls]
    if emit is None:
      out[name] = qblock
    else:
      emit(name, qblock, block)
    del block, variables, qblock, deq, module
  qrest = api.quantize(rest, recipe, key=key, report_unused=False)
  if emit is None:
    return {**out, **qrest}
  for name, tree in qrest.items():
    emit(name, tree, rest[name])
  return {}
