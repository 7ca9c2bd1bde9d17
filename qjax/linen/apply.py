"""Running a Flax Linen model from a quantized tree.

`apply(model, variables, *inputs)` is `model.apply(variables, *inputs)`
for variables (params plus any other collections, e.g. BatchNorm's
'batch_stats'; a bare params tree works too) whose kernels are QTensors
(or PreparedWeights from qjax.kernels.prepare_tree, or composite leaves).
Every module call whose own 'kernel' is packed is intercepted
(qjax.intercept):

  nn.Dense, mode='qmatmul'
                     y = qjax.kernels.qmatmul(x, kernel) + bias: the Pallas
                     kernel on GPU/TPU reads the packed codes; on CPU the
                     XLA reference decodes one layer's weight at a time.
  nn.Dense, mode='dequantize'
                     y = x @ kernel.dequantize() + bias.
  any other module (DenseGeneral, Einsum, Conv of any kind, a user's own
  layer)             its own code runs on its parameters with the packed
                     ones dequantized, one layer at a time.

The float weight of one layer exists while that layer runs, never the whole
model's. Packed leaves not named 'kernel' (an embedding, which `attend`
reads too) are dequantized up front, inside the caller's jit.
"""

import contextlib
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from qjax import intercept, kernels, qtensor
from qjax.activations import hooks
from qjax.kernels import layout

MODES = ("qmatmul", "dequantize")


def _is_packed(x) -> bool:
  return qtensor.is_quantized(x) or isinstance(x, layout.PreparedWeight)


def _dense_weight(kernel, dtype):
  if isinstance(kernel, layout.PreparedWeight):
    return layout.dequantize(kernel).astype(dtype)
  return kernel.dequantize(dtype)


def _dense(module: nn.Dense, x, kernel, mode, impl, interpret):
  dtype = module.dtype or jnp.result_type(x.dtype, jnp.float32)
  if mode == "qmatmul" and isinstance(
    kernel, (qtensor.QTensor, layout.PreparedWeight)
  ):
    y = kernels.qmatmul(
      x, kernel, impl=impl, interpret=interpret, out_dtype=jnp.float32
    )
  else:
    y = jnp.matmul(
      x.astype(jnp.float32),
      _dense_weight(kernel, jnp.float32),
      precision=jax.lax.Precision.HIGHEST,
    )
  if module.use_bias:
    y = y + module.get_variable("params", "bias")
  return y.astype(dtype)


def _own_params(module) -> dict:
  """The module's own parameters (its children's are sub-dicts)."""
  if not module.has_variable("params", "kernel"):
    return {}
  return module.variables.get("params", {})


def _run_dequantized(module, next_fun, args, kwargs):
  """The module's own code on its variables with packed leaves dequantized."""
  del next_fun
  variables = dict(module.variables)
  variables["params"] = {
    k: (_dense_weight(v, jnp.float32) if _is_packed(v) else v)
    for k, v in variables["params"].items()
  }
  return module.clone(parent=None).apply(variables, *args, **kwargs)


def apply(
  model: nn.Module,
  variables,
  *inputs,
  mode: str = "qmatmul",
  impl: str = "auto",
  interpret: bool = False,
  method=None,
  activations=None,
  act_scales=None,
  **kwargs,
):
  """model.apply(variables, *inputs) from a quantized tree.

  Args:
    model: a Flax Linen module.
    variables: {'params': quantized tree, other collections...}, or the
      quantized params tree alone.
    *inputs: the model's inputs.
    mode: one of MODES (see the module docstring).
    impl, interpret: passed to qjax.kernels.qmatmul.
    method, **kwargs: passed to model.apply.
    activations: a qjax.activations.ActRecipe: the matched layer inputs
      are fake-quantized before the layer (quantized or float) runs.
    act_scales: its static scales (qjax.activations.calibrate).

  Raises:
    ValueError: an unknown mode.
  """
  if mode not in MODES:
    raise ValueError(f"unknown mode {mode!r}; known: {MODES}")
  if not (isinstance(variables, Mapping) and "params" in variables):
    variables = {"params": variables}

  def layer(module, next_fun, args, kw):
    kernel = _own_params(module).get("kernel")
    if not _is_packed(kernel):
      return next_fun(*args, **kw)
    if isinstance(module, nn.Dense):
      return _dense(module, args[0], kernel, mode, impl, interpret)
    return _run_dequantized(module, next_fun, args, kw)

  with contextlib.ExitStack() as stack:
    # Entered first, seen first: inputs are quantized before the layer.
    stack.enter_context(hooks.maybe(activations, act_scales))
    stack.enter_context(intercept.calls(layer))
    return model.apply(
      {**variables, "params": _dequantize_non_kernels(variables["params"])},
      *inputs,
      method=method,
      **kwargs,
    )


def _dequantize_non_kernels(params):
  """Dequantizes packed leaves not named 'kernel' (embeddings): no layer
  call is intercepted for them. Runs inside the caller's jit, so XLA fuses
  each decode into its single use."""

  def visit(path, v):
    if not _is_packed(v) or getattr(path[-1], "key", None) == "kernel":
      return v
    return _dense_weight(v, jnp.float32)

  return jax.tree_util.tree_map_with_path(visit, params, is_leaf=_is_packed)


def greedy_generate(
  logits_fn, prompt: jax.Array, steps: int, *, pad_id: int = 0
) -> jax.Array:
  """Greedy decoding with a fixed-shape causal forward (one compile).

  Args:
    logits_fn: ids [1, T] -> logits [1, T, vocab], causal (a position never
      sees later ones, so padding after it changes nothing).
    prompt: int32 [P] token ids.
    steps: tokens to generate.
    pad_id: the id that fills positions not yet generated.

  Returns:
    int32 [steps] generated ids.
  """
  p = prompt.shape[0]
  ids = jnp.full((1, p + steps), pad_id, jnp.int32).at[0, :p].set(prompt)
  step = jax.jit(
    lambda ids, t: jnp.argmax(logits_fn(ids)[0, t - 1]).astype(jnp.int32)
  )
  for t in range(p, p + steps):
    ids = ids.at[0, t].set(step(ids, t))
  return ids[0, p:]
