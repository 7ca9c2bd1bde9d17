"""How a calibration driver walks a model block by block.

A walk (BlockModel, written by hand for a model, or one that
qjax.calibration.discover finds in any Linen or NNX model) answers:

  names                        the blocks' '/'-joined paths in the tree;
  first_calls(params, batches) block 0's calls, one (args, kwargs) per
                               batch;
  next_calls(i, outputs, params, batches)
                               block i's calls given block i-1's outputs
                               (and the whole tree as this stream has it,
                               for a model whose glue between blocks is not
                               a plain chain);
  run(name, block, call)       the block's output;
  hessians(name, block, calls) {kernel path inside the block: (2/n) X^T X};
  layer_order(name, block, call)
                               the block's linear layers, in call order;
  layer_stats(name, layer, float block, quantized block, float call,
              quantized call)  (G, C, sum X, sum X~, rows) of one layer.

Activation rules (qjax.quantize(..., activations=)): a driver runs the
quantized model's passes inside `input_hook(hook)`, and the walks run every
block (and every re-run of the model) inside `under_hook(block name,
root)`, so the block's matched layer inputs are fake-quantized under their
whole-model paths; a walk's statistics then see those quantized inputs.
layer_stats applies the hook to the quantized call only: the float stream
is the target. A walk that does this sets `applies_input_hook = True`.
"""

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax

from qjax.calibration import capture

# hook(prefix, root) -> a context manager; see the module docstring.
_INPUT_HOOK = contextvars.ContextVar(
  "qjax_calibration_input_hook", default=None
)


@contextlib.contextmanager
def input_hook(hook):
  """Runs the block walks inside under the activation rules of `hook`
  (qjax.activations.hooks.calibration_hook; None: no rules)."""
  token = _INPUT_HOOK.set(hook)
  try:
    yield
  finally:
    _INPUT_HOOK.reset(token)


def current_hook():
  """The hook of the enclosing `input_hook`, or None."""
  return _INPUT_HOOK.get()


@dataclasses.dataclass(frozen=True)
class Enter:
  """enter(root) -> the hook's context for the block named `prefix`.
  Equal for equal (hook, prefix), so as a static jit argument every batch
  and every call for one block of one run reuses one compilation."""

  hook: Callable
  prefix: str

  def __call__(self, root=None):
    return self.hook(self.prefix, root)


def hook_for(prefix: str) -> Enter | None:
  """The active hook for a block named `prefix`, or None without rules."""
  hook = _INPUT_HOOK.get()
  return None if hook is None else Enter(hook, prefix)


def under_hook(prefix: str, root=None):
  """The active rules' context for a run of block `prefix` (root: the NNX
  module run), or a no-op."""
  enter = hook_for(prefix)
  return contextlib.nullcontext() if enter is None else enter(root)


class BlockModel(NamedTuple):
  """How to run a model block by block, written by hand.

  embed(params, batch) -> activations entering the first block (params:
    the top-level entries that are not blocks);
  blocks: the parameter names of the blocks, in order;
  block_module: the Linen module of every block, unless `modules` names
    one for it (models whose blocks differ, e.g. MobileNetV2);
  block_args(batch) -> the extra arguments of a block after x;
  collections: {block: {collection: tree}}, non-parameter variables a
    block needs (e.g. BatchNorm's 'batch_stats').

  qjax.quantize(..., calib=(model, batches)) finds the blocks of most
  models by itself (qjax.calibration.discover); a BlockModel is for a model
  whose blocks need cutting another way.
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

  def calls(self, xs, batches) -> list[tuple]:
    """Each block call's arguments: (x, *block_args(batch)) per batch."""
    return [(x, *self.block_args(b)) for x, b in zip(xs, batches, strict=True)]

  # The walk (see the module docstring); calls are (args, kwargs) pairs.
  # The embedding runs outside the rules (a BlockModel's embed is a plain
  # function): they reach the blocks' layers.

  applies_input_hook = True

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(self.blocks)

  def first_calls(self, params, batches) -> list:
    rest = {k: params[k] for k in params if k not in self.blocks}
    xs = [self.embed(rest, b) for b in batches]
    return [(c, {}) for c in self.calls(xs, batches)]

  def next_calls(self, index, outputs, params, batches) -> list:
    del index, params
    return [(c, {}) for c in self.calls(outputs, batches)]

  def run(self, name, block, call):
    args, kwargs = call
    enter = hook_for(name)
    if enter is not None:  # jitted: eager fake-quant compiles every op
      return capture.apply_under(
        self.module(name), self.variables(name, block), args, kwargs, enter
      )
    return self.module(name).apply(self.variables(name, block), *args, **kwargs)

  def hessians(self, name, block, calls, absmax_out=None) -> dict:
    h, _ = capture.dense_hessians(
      self.module(name),
      self.variables(name, block),
      [args for args, _ in calls],
      absmax_out=absmax_out,
      enter=hook_for(name),
    )
    return h

  def layer_order(self, name, block, call) -> list:
    extra = self.variables(name, None)
    extra.pop("params")
    return capture.linear_order(self.module(name), block, call[0], extra)

  def layer_stats(self, name, layer, p_float, p_quant, call_f, call_q):
    extra = self.variables(name, None)
    extra.pop("params")
    return capture.two_stream_stats(
      self.module(name),
      layer,
      p_float,
      p_quant,
      extra,
      call_f[0],
      call_q[0],
      enter_quant=hook_for(name),
    )
