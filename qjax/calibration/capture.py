"""Statistics of a block's linear layers (Dense, pointwise convs), captured
by interception (qjax.intercept) and accumulated in float32 (HIGHEST
precision) batch by batch, so the whole X never exists.

  dense_hessians    H = (2/n) X^T X per layer (GPTQ, MagR).
  linear_order      the linear layers a block calls, in execution order.
  two_stream_stats  G = X~^T X~, C = X~^T X and both input sums of one layer
                    under the float and the quantized parameters.
"""

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from qjax import intercept

_HI = jax.lax.Precision.HIGHEST


def _add(a, b):
  return a + b


def _zero():
  return 0.0


def _sow_gram(module, next_fun, args, kwargs):
  x = args[0].reshape(-1, args[0].shape[-1]).astype(jnp.float32)
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
  with intercept.calls(_sow_gram, intercept.is_linear):
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
  """Streams H = (2/n) X^T X for every linear layer of `module`.

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


def linear_order(module: nn.Module, params, call: tuple, extra=None) -> list:
  """'/'-joined module paths of the linear layers (Dense, pointwise Conv)
  `module` calls, in order; '' when the module itself is one."""
  order = []

  def record(layer, next_fun, args, kwargs):
    order.append(intercept.path(layer))
    return next_fun(*args, **kwargs)

  with intercept.calls(record, intercept.is_linear):
    jax.eval_shape(
      lambda p, c: module.apply({"params": p, **(extra or {})}, *c),
      params,
      call,
    )
  return list(dict.fromkeys(order))


def _inputs_of(module, target, params, extra, call):
  """Rows [n, in] entering the layer at `target` when module runs on call."""

  def sow_input(layer, next_fun, args, kwargs):
    if intercept.path(layer) == target:
      layer.sow("ed_inputs", "x", args[0])
    return next_fun(*args, **kwargs)

  with intercept.calls(sow_input, intercept.is_linear):
    _, state = module.apply(
      {"params": params, **extra}, *call, mutable=["ed_inputs"]
    )
  xs = jax.tree.leaves(state["ed_inputs"])
  return jnp.concatenate(
    [x.reshape(-1, x.shape[-1]).astype(jnp.float32) for x in xs]
  )


@functools.partial(jax.jit, static_argnums=(0, 1))
def two_stream_stats(
  module, target, p_float, p_quant, extra, call_float, call_quant
):
  """(G, C, sum X, sum X~, rows) of the layer at `target` for one batch:
  X from the float parameters on the float call, X~ from the quantized
  parameters on the quantized call."""
  x = _inputs_of(module, target, p_float, extra, call_float)
  xq = _inputs_of(module, target, p_quant, extra, call_quant)
  g = jnp.matmul(xq.T, xq, precision=_HI)
  c = jnp.matmul(xq.T, x, precision=_HI)
  return g, c, x.sum(0), xq.sum(0), jnp.float32(x.shape[0])
