"""`qjax.apply`: quantized inference for any Linen or NNX model (see
qjax.linen.apply and qjax.nnx_apply for what each layer kind runs)."""

from flax import nnx

from qjax import linen, nnx_apply


def apply(model, variables, *inputs, mode: str = "qmatmul", **kwargs):
  """Runs `model` from quantized variables.

  Linen: `variables` is {'params': quantized tree, other collections} (or
  the params tree alone); kwargs go to model.apply (method=, impl=,
  interpret=, ...). NNX: `variables` is the quantized nnx.State of the
  model's parameters; kwargs go to the model's call.

  Equals running the model on `qjax.dequantize(variables)` (up to float
  summation order in mode='qmatmul').
  """
  if isinstance(model, nnx.Module):
    return nnx_apply.apply(model, variables, *inputs, mode=mode, **kwargs)
  return linen.apply(model, variables, *inputs, mode=mode, **kwargs)
