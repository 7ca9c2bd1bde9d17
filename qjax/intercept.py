"""The one interception helper: calibration, quantized inference, the CP
layers and the ensemble all reach a Linen model's layers through `calls`.

  with intercept.calls(handler, is_linear):
    model.apply(variables, x)

runs handler(module, next_fun, args, kwargs) in place of every `__call__` of
a module for which select(module) holds; the handler calls
next_fun(*args, **kwargs) to run the layer as written. Nested `calls`
blocks compose: the one entered first sees a call first.
"""

import contextlib
from collections.abc import Callable

import flax.linen as nn
import numpy as np

Handler = Callable[..., object]


def calls(
  handler: Handler,
  select: Callable[[nn.Module], bool] | None = None,
  method_name: str = "__call__",
):
  """A context manager that routes the selected modules' calls to handler."""

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == method_name and (
      select is None or select(module)
    ):
      return handler(module, next_fun, args, kwargs)
    return next_fun(*args, **kwargs)

  return nn.intercept_methods(interceptor)


def stack(*handlers: tuple[Handler, Callable | None]):
  """Several (handler, select) pairs; the first sees a call first."""
  stack_ = contextlib.ExitStack()
  for handler, select in handlers:
    stack_.enter_context(calls(handler, select))
  return stack_


def path(module: nn.Module) -> str:
  """The module's '/'-joined path inside the applied model."""
  return "/".join(module.scope.path)


def is_linear(module: nn.Module) -> bool:
  """A layer whose input rows meet the kernel as one matmul: nn.Dense, or a
  1x1 nn.Conv with stride 1 and no groups (MobileNet's pointwise convs;
  its kernel [1, 1, in, out] is quantized as the matrix [in, out])."""
  if isinstance(module, nn.Dense):
    return True
  if not isinstance(module, nn.Conv):
    return False

  def ones(v):
    return v is None or all(int(k) == 1 for k in np.atleast_1d(v))

  return (
    ones(module.kernel_size)
    and ones(module.strides)
    and ones(module.kernel_dilation)
    and module.feature_group_count == 1
  )
