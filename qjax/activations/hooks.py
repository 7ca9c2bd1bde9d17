"""Applying activation rules to a model's layer inputs, by interception.

  with quantized_inputs(recipe, scales):            # Linen
    model.apply(variables, x)
  with quantized_inputs(recipe, scales, root=model):  # NNX
    model(x)

replaces the input of every layer a rule matches by its fake-quant before
the layer runs (qjax.apply(..., activations=recipe) does this for quantized
weights). The layers seen are those qjax can view as a matrix product
(qjax.linear_layers: Dense/Linear, DenseGeneral, Einsum, Conv) and Tap
modules, which mark a tensor that is not a layer input (a KV cache).

A kernel stored in another basis brings its input transform along: for a
SmoothQuant kernel (diag(s) W) the rule quantizes x / s, for a Hadamard one
(R^T W) x R, and the layer receives the quantized value mapped back.

The rules act when the model is traced: call (or jit) the model inside the
context. A function jitted earlier, outside it, replays its old trace.

Block granularity runs along the input's last axis: a layer that contracts
another axis (DenseGeneral with axis != -1, an Einsum whose contracted
label is not last) is an error naming its path.
"""

import contextlib

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qjax import intercept, linear_layers
from qjax.activations import quantizer
from qjax.transforms import hadamard, rotated, smoothquant


class Tap(nn.Module):
  """Identity (Linen): marks a tensor that activation rules can quantize,
  such as the keys or values written to a KV cache."""

  @nn.compact
  def __call__(self, x):
    return x


class NnxTap(nnx.Module):
  """Identity (NNX): the NNX form of Tap."""

  def __call__(self, x):
    return x


def is_hooked(module) -> bool:
  """Whether activation rules can see this module's input."""
  return isinstance(module, (Tap, NnxTap)) or linear_layers.is_linear(module)


def _contracts_last_axis(module, args, kwargs) -> bool:
  kind = linear_layers.kind(module)
  if kind == "dense_general":
    axis = getattr(module, "axis", -1)
    axes = axis if isinstance(axis, tuple) else (axis,)
    return tuple(a % args[0].ndim for a in axes) == (args[0].ndim - 1,)
  if kind == "einsum":
    eq = kwargs.get("einsum_str") or (args[1] if len(args) > 1 else None)
    eq = (eq or module.einsum_str).replace(" ", "")
    lhs, out = eq.split("->")
    x_labels, k_labels = lhs.split(",")
    return x_labels[-1] in k_labels and x_labels[-1] not in out
  return True


def _check(module, path, quant, args, kwargs):
  along_k = quant.scaling.mode == "block" or quant.rotate is not None
  if along_k and not _contracts_last_axis(module, args, kwargs):
    raise ValueError(
      f"layer {path!r}: {quant.spec()} blocks or rotates along the "
      "input's last axis, which this layer does not contract; use "
      "granularity 'tensor' or 'token' without rotation for it"
    )


def _kernel_leaf(module):
  if isinstance(module, nnx.Module):
    kernel = getattr(module, "kernel", None)
    return kernel.get_value() if isinstance(kernel, nnx.Variable) else None
  if not module.has_variable("params", "kernel"):
    return None
  return module.get_variable("params", "kernel")


def _rotation(block, seed):
  def step(x, back):
    return hadamard.rotate_last(x, block, transpose=back, seed=seed)

  return step


def _smoothing(s):
  def step(x, back):
    x = x.astype(jnp.float32)
    return x * s if back else x / s

  return step


def _input_transforms(module, path, quant):
  """What the input meets before the stored kernel, outermost first: the
  kernel leaf's own pre-transforms (Smoothed: x / s; Rotated: x R), or the
  rule's rotation for a float kernel. Each step(x, back) applies it, or with
  back=True undoes it (after fake-quant)."""
  steps, leaf, rotated_leaf = [], _kernel_leaf(module), False
  while isinstance(leaf, (smoothquant.Smoothed, rotated.Rotated)):
    if isinstance(leaf, smoothquant.Smoothed):
      steps.append(_smoothing(leaf.s.astype(jnp.float32)))
    else:
      steps.append(_rotation(leaf.block, leaf.seed))
      rotated_leaf = True
    leaf = leaf.inner
  if quant.rotate is not None:
    if rotated_leaf:
      raise ValueError(
        f"layer {path!r}: its kernel is stored Hadamard-rotated, which "
        "rotates the input already; drop `rotate` from the activation rule"
      )
    steps.append(_rotation(quant.rotate, quant.rotate_seed))
  return steps


def _scale_of(scales, path, quant):
  if not quant.static:
    return None
  if scales is None or path not in scales:
    raise ValueError(
      f"layer {path!r}: {quant.spec()} is static and has no calibrated "
      "scale; run qjax.activations.calibrate with this recipe first"
    )
  return scales[path]


def handler(recipe, scales=None, observe=None, prefix=""):
  """The interception handler: fake-quant (or, with `observe(path, quant,
  x)`, observation of the float input) of every matched layer input.
  `prefix` is joined in front of each module path (a block run by itself
  during calibration: 'layer_3' + 'attn/q')."""

  def run(module, next_fun, args, kwargs):
    path = "/".join(p for p in (prefix, intercept.path(module)) if p)
    quant = recipe.match(path)
    if quant is None or not args:
      return next_fun(*args, **kwargs)
    _check(module, path, quant, args, kwargs)
    steps = _input_transforms(module, path, quant)
    x = args[0]
    for step in steps:
      x = step(x, False)
    if observe is not None:  # calibration: observe, change nothing
      observe(path, quant, x)
      return next_fun(*args, **kwargs)
    x = quantizer.fake_quant(x, quant, _scale_of(scales, path, quant))
    for step in reversed(steps):
      x = step(x, True)
    return next_fun(x, *args[1:], **kwargs)

  return run


def quantized_inputs(
  recipe, scales=None, *, root=None, observe=None, prefix=""
):
  """A context in which the matched layer inputs are fake-quantized.

  Args:
    recipe: a qjax.activations.ActRecipe.
    scales: {layer path: stored static scale} from calibrate (static rules).
    root: the NNX model that will be called (None for Linen).
    observe: calibration only (see handler).
    prefix: the path of the called module inside the whole model, when a
      part of it runs by itself (rules and scales name whole-model paths).
  """
  run = handler(recipe, scales, observe, prefix)
  if root is None:
    return intercept.calls(run, is_hooked)
  if not isinstance(root, nnx.Module):
    raise TypeError(f"root must be an nnx.Module, got {type(root).__name__}")
  return intercept.nnx_calls(root, run, is_hooked)


def calibration_hook(recipe, scales=None):
  """hook(prefix, root) -> quantized_inputs(recipe, scales, root=root,
  prefix=prefix): what qjax.quantize(..., activations=) hands the
  calibration drivers (qjax.calibration.blocks)."""

  def hook(prefix, root=None):
    return quantized_inputs(recipe, scales, root=root, prefix=prefix)

  # what a resumable run's fingerprint records (qjax.io.resume)
  hook.rules = (
    recipe,
    None
    if scales is None
    else sorted((k, np.asarray(v).tolist()) for k, v in scales.items()),
  )
  return hook


def maybe(recipe, scales=None, *, root=None):
  """quantized_inputs, or a no-op for recipe None."""
  if recipe is None:
    if scales:
      raise ValueError("act_scales given without an activation recipe")
    return contextlib.nullcontext()
  return quantized_inputs(recipe, scales, root=root)
