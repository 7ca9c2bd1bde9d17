"""The one interception helper: calibration, quantized inference, the CP
layers and the ensemble all reach a model's layers through it.

Linen:

  with intercept.calls(handler, select):
    model.apply(variables, x)

runs handler(module, next_fun, args, kwargs) in place of every `__call__` of
a module for which select(module) holds; the handler calls
next_fun(*args, **kwargs) to run the layer as written. A module's calls
made while its handler runs (a subclass's super().__call__) go straight
through, so a user's subclass of nn.Dense is handled once per call.
Nested `calls` blocks compose: the one entered first sees a call first.

NNX modules are Python objects with no interception hook, so

  with intercept.nnx_calls(model, handler, select):
    model(x)

patches `__call__` of the selected modules' classes for the duration of the
block (only the selected instances of `model` are routed to the handler;
other instances, and every instance after the block, run as written).
`path(module)` gives the module's path in the model, Linen or NNX.
"""

import contextlib
import functools
from collections.abc import Callable

import flax.linen as nn
from flax import nnx

Handler = Callable[..., object]
_NNX_PATHS: dict[int, str] = {}


def calls(
  handler: Handler,
  select: Callable[[nn.Module], bool] | None = None,
  method_name: str = "__call__",
):
  """A context manager that routes the selected modules' calls to handler."""

  active = set()  # modules inside the handler: a subclass's super() call

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (
      context.method_name == method_name
      and id(module) not in active
      and (select is None or select(module))
    ):
      active.add(id(module))
      try:
        return handler(module, next_fun, args, kwargs)
      finally:
        active.discard(id(module))
    return next_fun(*args, **kwargs)

  return nn.intercept_methods(interceptor)


def stack(*handlers: tuple[Handler, Callable | None]):
  """Several (handler, select) pairs; the first sees a call first."""
  stack_ = contextlib.ExitStack()
  for handler, select in handlers:
    stack_.enter_context(calls(handler, select))
  return stack_


def nnx_modules(root: nnx.Module) -> list[tuple[str, nnx.Module]]:
  """('/'-joined path, module) of every module under root (root: '')."""
  return [("/".join(str(k) for k in p), m) for p, m in nnx.iter_modules(root)]


@contextlib.contextmanager
def nnx_calls(
  root: nnx.Module,
  handler: Handler,
  select: Callable[[nnx.Module], bool] | None = None,
):
  """Routes the `__call__` of the selected modules under root to handler
  (the NNX form of `calls`)."""
  modules = nnx_modules(root)
  chosen = {id(m): p for p, m in modules if select is None or select(m)}
  classes = {type(m) for _, m in modules if id(m) in chosen}
  originals = {cls: cls.__call__ for cls in classes}
  owned = {cls: "__call__" in cls.__dict__ for cls in classes}

  active = set()  # instances inside the handler: a subclass's super() call

  def wrap(original):
    @functools.wraps(original)
    def routed(self, *args, **kwargs):
      if id(self) in chosen and id(self) not in active:
        active.add(id(self))
        try:
          return handler(self, functools.partial(original, self), args, kwargs)
        finally:
          active.discard(id(self))
      return original(self, *args, **kwargs)

    return routed

  saved = dict(_NNX_PATHS)
  _NNX_PATHS.update(chosen)
  for cls, original in originals.items():
    cls.__call__ = wrap(original)
  try:
    yield
  finally:
    for cls, original in originals.items():
      if owned[cls]:
        cls.__call__ = original
      else:
        delattr(cls, "__call__")
    _NNX_PATHS.clear()
    _NNX_PATHS.update(saved)


def path(module) -> str:
  """The module's '/'-joined path inside the applied model (Linen), or
  inside the root of the enclosing `nnx_calls` (NNX)."""
  if isinstance(module, nnx.Module):
    return _NNX_PATHS[id(module)]
  return "/".join(module.scope.path)
