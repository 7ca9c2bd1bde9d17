"""Running a Flax NNX model from a quantized parameter state.

`apply(model, qparams, *inputs)` calls `model` with its parameters replaced
by `qparams` (what qjax.quantize returns for nnx.state(model, nnx.Param)),
without writing to `model`:

  nnx.Linear, mode='qmatmul'    y = qjax.kernels.qmatmul(x, kernel) + bias.
  nnx.Linear, mode='dequantize' y = x @ kernel.dequantize() + bias.
  any other module whose own 'kernel' is packed (LinearGeneral, Einsum,
  Conv, a user's layer)         its own code runs with the kernel
                                dequantized for that call only.

Packed leaves not named 'kernel' (an embedding) are dequantized up front.
Everything runs inside the caller's jit (jax.jit(lambda q, x: apply(model,
q, x))), so one layer's float weight exists at a time in XLA's schedule.
"""

import contextlib

import jax
import jax.numpy as jnp
from flax import nnx

from qjax import intercept, kernels, qtensor
from qjax.activations import hooks
from qjax.paths import path_str

MODES = ("qmatmul", "dequantize")


def _packed_kernel(module):
  kernel = getattr(module, "kernel", None)
  if not isinstance(kernel, nnx.Variable):
    return None
  value = kernel.get_value()
  return value if qtensor.is_quantized(value) else None


def _linear(module, x, kernel, mode):
  if mode == "qmatmul" and qtensor.is_qtensor(kernel):
    y = kernels.qmatmul(x, kernel, out_dtype=jnp.float32)
  else:
    y = jnp.matmul(
      x.astype(jnp.float32),
      kernel.dequantize(jnp.float32),
      precision=jax.lax.Precision.HIGHEST,
    )
  if module.bias is not None:
    y = y + module.bias.get_value()
  return y.astype(module.dtype or jnp.result_type(x.dtype, jnp.float32))


def apply(
  model: nnx.Module,
  qparams,
  *inputs,
  mode: str = "qmatmul",
  activations=None,
  act_scales=None,
  **kw,
):
  """model(*inputs, **kw) with the quantized parameters `qparams`.

  Args:
    model: the float NNX model (its structure and non-parameter state are
      used; it is not modified).
    qparams: nnx.State of its parameters with quantized leaves.
    *inputs, **kw: the model's inputs.
    mode: one of MODES (see the module docstring).
    activations, act_scales: an ActRecipe and its static scales: the
      matched layer inputs are fake-quantized (qjax.activations).

  Raises:
    ValueError: an unknown mode.
  """
  if mode not in MODES:
    raise ValueError(f"unknown mode {mode!r}; known: {MODES}")
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)

  def up_front(path, v):
    if qtensor.is_quantized(v) and not path_str(path).endswith("kernel"):
      return v.dequantize(jnp.float32)
    return v

  qparams = jax.tree_util.tree_map_with_path(
    up_front, qparams, is_leaf=qtensor.is_quantized
  )
  live = nnx.merge(graphdef, qparams, rest)

  def layer(module, next_fun, args, kwargs):
    kernel = _packed_kernel(module)
    if isinstance(module, nnx.Linear):
      return _linear(module, args[0], kernel, mode)
    module.kernel.set_value(kernel.dequantize(jnp.float32))
    try:
      return next_fun(*args, **kwargs)
    finally:
      module.kernel.set_value(kernel)

  with contextlib.ExitStack() as stack:
    stack.enter_context(
      intercept.nnx_calls(live, layer, lambda m: _packed_kernel(m) is not None)
    )
    # NNX patches nest the other way: entered last, seen first.
    stack.enter_context(hooks.maybe(activations, act_scales, root=live))
    return live(*inputs, **kw)
