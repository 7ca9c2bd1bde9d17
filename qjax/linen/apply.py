"""Running a Flax Linen model from a quantized parameter tree.

`apply(model, qparams, *inputs)` is `model.apply({'params': params},
*inputs)` for a tree whose Dense kernels are QTensors (or PreparedWeights
from qjax.kernels.prepare_tree). Every `nn.Dense` call is intercepted
(qjax.intercept) and computed from its quantized kernel:

  mode='qmatmul'     y = qjax.kernels.qmatmul(x, kernel) + bias: the Pallas
                     kernel on GPU/TPU reads the packed codes; on CPU the
                     XLA reference decodes one layer's weight at a time.
  mode='dequantize'  y = x @ kernel.dequantize() + bias, one layer at a
                     time (the float weight of one layer exists while that
                     layer runs, never the whole model's).

Quantized leaves that no Dense call takes (an embedding, a conv kernel:
anything not a 2-D leaf named 'kernel') are dequantized up front, inside the
caller's jit; a Dense whose kernel is a composite leaf (a PIPE Expansion)
dequantizes it in its call.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from qjax import intercept, kernels, qtensor
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


def apply(
  model: nn.Module,
  params,
  *inputs,
  mode: str = "qmatmul",
  impl: str = "auto",
  interpret: bool = False,
  method=None,
  **kwargs,
):
  """model.apply({'params': params}, *inputs) from a quantized tree.

  Args:
    model: a Flax Linen module whose Dense layers hold the quantized kernels
      (Flax layout [in, out]).
    params: its 'params' collection with QTensor / PreparedWeight /
      composite leaves in place of float arrays.
    *inputs: the model's inputs.
    mode: one of MODES (see the module docstring).
    impl, interpret: passed to qjax.kernels.qmatmul.
    method, **kwargs: passed to model.apply.

  Raises:
    ValueError: an unknown mode.
  """
  if mode not in MODES:
    raise ValueError(f"unknown mode {mode!r}; known: {MODES}")

  def dense(module, next_fun, args, kw):
    if module.has_variable("params", "kernel"):
      kernel = module.get_variable("params", "kernel")
      if _is_packed(kernel):
        return _dense(module, args[0], kernel, mode, impl, interpret)
    return next_fun(*args, **kw)

  with intercept.calls(dense, lambda m: isinstance(m, nn.Dense)):
    return model.apply(
      {"params": _dequantize_non_dense(params)},
      *inputs,
      method=method,
      **kwargs,
    )


def _dequantize_non_dense(params):
  """Dequantizes packed leaves that no Dense call will intercept: those not
  named 'kernel' or not 2-D (embeddings, conv kernels). Runs inside the
  caller's jit, so XLA fuses each decode into its single use."""

  def visit(path, v):
    if not _is_packed(v):
      return v
    name = getattr(path[-1], "key", None)
    if name == "kernel" and len(v.shape) == 2:
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
