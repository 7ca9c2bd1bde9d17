"""BlockModel: how to run a model block by block (GPTQ's sequential mode and
the two-stream driver walk it)."""

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax


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

  def calls(self, xs, batches) -> list[tuple]:
    """Each block call's arguments: (x, *block_args(batch)) per batch."""
    return [(x, *self.block_args(b)) for x, b in zip(xs, batches, strict=True)]
