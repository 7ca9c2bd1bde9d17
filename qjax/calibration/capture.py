"""Statistics of a block's linear layers (qjax.linear_layers: Dense,
DenseGeneral, Einsum, convs of any kernel size through their patch matrix),
captured by interception (qjax.intercept) and accumulated in float32
(HIGHEST precision) batch by batch, so the whole X never exists. A conv
with G > 1 feature groups gets statistics per group ([G, d, d]).

  dense_hessians    H = (2/n) X^T X per layer (GPTQ, MagR).
  linear_order      the linear layers a block calls, in execution order.
  two_stream_stats  G = X~^T X~, C = X~^T X and both input sums of one layer
                    under the float and the quantized parameters.
"""

import contextlib
import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from qjax import intercept, linear_layers

_HI = jax.lax.Precision.HIGHEST


def _add(a, b):
  return a + b


def _zero():
  return 0.0


def gram(x):
  """X^T X of rows [n, d], or per group of [G, n, d]."""
  if x.ndim == 2:
    return jnp.matmul(x.T, x, precision=_HI)
  return jnp.einsum("gnd,gne->gde", x, x, precision=_HI)


def cross(a, b):
  """A^T B of rows, as gram."""
  if a.ndim == 2:
    return jnp.matmul(a.T, b, precision=_HI)
  return jnp.einsum("gnd,gne->gde", a, b, precision=_HI)


def _sow_gram(module, next_fun, args, kwargs):
  x = linear_layers.input_rows(module, args[0], args, kwargs)
  module.sow(
    "calibration",
    "xtx",
    gram(x),
    reduce_fn=_add,
    init_fn=_zero,
  )
  module.sow(
    "calibration",
    "rows",
    jnp.float32(x.shape[-2]),
    reduce_fn=_add,
    init_fn=_zero,
  )
  module.sow(  # per input column: SmoothQuant's max |X_j|
    "calibration",
    "absmax",
    jnp.max(jnp.abs(x), axis=-2),
    reduce_fn=jnp.maximum,
    init_fn=_zero,
  )
  return next_fun(*args, **kwargs)


def _capture(module, variables, args, kwargs=None, static=(), enter=None):
  # Activation rules are entered first, so they see each call first and
  # the statistics see the quantized input (qjax.calibration.blocks).
  rules = contextlib.nullcontext() if enter is None else enter(None)
  with rules, intercept.calls(_sow_gram, linear_layers.is_linear):
    out, state = module.apply(
      variables,
      *args,
      **(kwargs or {}),
      **dict(static),
      mutable=["calibration"],
    )
  return out, state.get("calibration", {})  # {} for blocks without a layer


_capture_jit = jax.jit(_capture, static_argnums=(0, 4, 5))


def _apply_under(module, variables, args, arrays, static, enter):
  with enter(None):
    return module.apply(variables, *args, **arrays, **dict(static))


_apply_under_jit = jax.jit(_apply_under, static_argnums=(0, 4, 5))


def apply_under(module, variables, args, kwargs, enter):
  """module.apply under the activation rules of `enter`
  (qjax.calibration.blocks.hook_for), jitted: run op by op, the fake-quant
  of every layer input would compile each op for each batch shape."""
  arrays, static = split_kwargs(kwargs or {})
  return _apply_under_jit(module, variables, tuple(args), arrays, static, enter)


def split_kwargs(kwargs) -> tuple[dict, tuple]:
  """(array-valued kwargs, the rest as a hashable tuple): arrays are traced,
  flags and other Python values are static jit arguments."""
  arrays = {k: v for k, v in kwargs.items() if hasattr(v, "shape")}
  static = tuple(sorted((k, v) for k, v in kwargs.items() if k not in arrays))
  return arrays, static


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
  kwargs: bool = False,
  absmax_out: dict | None = None,
  enter=None,
) -> tuple[dict[str, jax.Array], list]:
  """Streams H = (2/n) X^T X for every linear layer of `module`.

  Args:
    module: a Linen module.
    variables: its variables ({'params': ...}).
    batches: argument tuples for `module.apply`, one per batch, or
      (args, kwargs) pairs when `kwargs` is True.
    prefix: prepended to every path (the block's name in a larger tree).
    kwargs: whether each batch is an (args, kwargs) pair.
    absmax_out: if given, filled with {kernel path: max |X| per input
      column [in]} over all batches (SmoothQuant's statistic).
    enter: enter(None) -> the activation rules' context the passes run in
      (qjax.calibration.blocks.hook_for), or None.

  Returns:
    ({kernel path: H [in, in], or [G, d, d] for a grouped conv},
     [the module's output for each batch]).
  """
  sums, outputs = {}, []
  for call in batches:
    if kwargs:
      args, kw = call
      arrays, static = split_kwargs(kw)
      out, stats = _capture_jit(
        module, variables, tuple(args), arrays, static, enter
      )
    else:
      out, stats = _capture_jit(module, variables, tuple(call), None, (), enter)
    outputs.append(out)
    for path, s in _flatten(stats).items():
      xtx, rows, amax = sums.get(path, (0.0, 0.0, 0.0))
      sums[path] = (
        xtx + s["xtx"],
        rows + s["rows"],
        jnp.maximum(amax, s["absmax"]),
      )
  pre = f"{prefix}/" if prefix else ""
  if absmax_out is not None:
    absmax_out.update({pre + p: a for p, (_, _, a) in sums.items()})
  return {
    pre + p: 2.0 * xtx / rows for p, (xtx, rows, _) in sums.items()
  }, outputs


def linear_order(
  module: nn.Module, params, call: tuple, extra=None, kwargs=None
) -> list:
  """'/'-joined module paths of the linear layers (qjax.linear_layers)
  `module` calls, in order; '' when the module itself is one."""
  order = []

  def record(layer, next_fun, args, kwargs):
    order.append(intercept.path(layer))
    return next_fun(*args, **kwargs)

  with intercept.calls(record, linear_layers.is_linear):
    jax.eval_shape(
      lambda p, c, kw: module.apply({"params": p, **(extra or {})}, *c, **kw),
      params,
      call,
      kwargs or {},
    )
  return list(dict.fromkeys(order))


def _inputs_of(module, target, params, extra, call, kwargs=None, static=()):
  """Rows [n, d] (or [G, n, d]) entering the layer at `target` when module
  runs on call."""

  def sow_input(layer, next_fun, args, kw):
    if intercept.path(layer) == target:
      layer.sow(
        "ed_inputs", "x", linear_layers.input_rows(layer, args[0], args, kw)
      )
    return next_fun(*args, **kw)

  with intercept.calls(sow_input, linear_layers.is_linear):
    _, state = module.apply(
      {"params": params, **extra},
      *call,
      **(kwargs or {}),
      **dict(static),
      mutable=["ed_inputs"],
    )
  xs = jax.tree.leaves(state["ed_inputs"])
  return jnp.concatenate(xs, axis=-2)


@functools.partial(jax.jit, static_argnums=(0, 1, 9, 10))
def two_stream_stats(
  module,
  target,
  p_float,
  p_quant,
  extra,
  call_float,
  call_quant,
  kw_float=None,
  kw_quant=None,
  static=(),
  enter_quant=None,
):
  """(G, C, sum X, sum X~, rows) of the layer at `target` for one batch:
  X from the float parameters on the float call, X~ from the quantized
  parameters on the quantized call (per group for a grouped conv), the
  latter under the activation rules of `enter_quant` (see dense_hessians)
  when given."""
  x = _inputs_of(module, target, p_float, extra, call_float, kw_float, static)
  rules = contextlib.nullcontext() if enter_quant is None else enter_quant(None)
  with rules:
    xq = _inputs_of(
      module, target, p_quant, extra, call_quant, kw_quant, static
    )
  return gram(xq), cross(xq, x), x.sum(-2), xq.sum(-2), jnp.float32(x.shape[-2])
