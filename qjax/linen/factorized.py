"""Factorized layers: CP kernels in a Flax parameter tree, run as the
sequence of small layers the QAF authors use (../shared/papers/qaf.md).

A factorized kernel is a `CPKernel` leaf (qjax.transforms.cp_kernel) in
place of a conv or Dense `kernel`. `apply(model, variables, x)` intercepts
every `nn.Conv` / `nn.Dense` call whose kernel is a CPKernel and computes,
for factors A [Cout, R], B [Cin, R] and, for a k×k conv, C [kh*kw, R]:

  k×k conv:   x -> 1×1 conv Cin->R (B)
                -> depthwise kh×kw conv, R groups (C as [kh, kw, 1, R]),
                   the original stride, padding and dilation
                -> 1×1 conv R->Cout (A^T) + the original bias
  1×1 conv / Dense:
              x -> Cin->R (B; a 1×1 conv keeps its stride and padding)
                -> R->Cout (A^T) + bias

which is the conv with kernel [[A, B, C]] exactly (zero padding commutes
with the bias-free pointwise B). `factorize` writes the CPKernels (QAF,
factorize-then-quantize or float CP), `recalibrate_batchnorm` re-estimates
BatchNorm statistics on calibration images afterwards (as the authors do),
and `macs` counts the multiply-accumulates the rewritten model really runs.

  tree, report = factorized.factorize(params, "conv2", rate=2, fmt="int4")
  logits = factorized.apply(model, {"params": tree}, images)
"""

import math
import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from qjax import formats, intercept, qtensor
from qjax.dispatch import path_str
from qjax.transforms import factorize as fz
from qjax.transforms.cp_kernel import METHODS, CPKernel, factorize_kernel, is_cp

__all__ = [
  "CPKernel",
  "apply",
  "factorize",
  "is_cp",
  "macs",
  "recalibrate_batchnorm",
]
_HI = jax.lax.Precision.HIGHEST


def factorize(
  params,
  pattern: str,
  *,
  rate: float,
  fmt=None,
  method: str = "qaf",
  progress: bool = True,
  **solver,
):
  """Replaces every kernel whose '/'-joined path matches `pattern`
  (re.search) by a CPKernel of rank factorize.cp_rank(shape, rate).

  Args:
    params: a Flax 'params' tree.
    pattern: regex over paths such as 'block_3/expand/conv/kernel'.
    rate: compression rate (the authors' rank formula).
    fmt: the factors' element format (name or object); not for 'cp'.
    method: 'qaf' (factorize.cp_quantized), 'ftq' (float CP-ALS start, each
      factor rounded once: factorize.cp_then_quantize) or 'cp' (the float
      CP-ALS start itself, float32 factors).
    progress: a progress bar over the matched kernels.
    **solver: keywords of cp_quantized (sweeps, inner, init_sweeps, ...);
      'ftq' takes init_sweeps, candidates and key; 'cp' init_sweeps and
      key. Any other keyword is an error, not silently ignored.

  Returns:
    (tree, report): the new tree, and per path {'rank', 'error'} with the
    relative error ||W - [[A,B,C]]|| / ||W|| (and QAF's 'sweeps').

  Raises:
    ValueError: an unknown method, a pattern that matches nothing, a rate
      that gives rank 0 (naming the parameter).
  """
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; choices: {METHODS}")
  if method != "cp" and fmt is None:
    raise ValueError(f"method {method!r} needs a factor format fmt=")
  fmt = None if fmt is None else formats.get(fmt)
  leaves = jax.tree_util.tree_leaves_with_path(params)
  chosen = [(p, w) for p, w in leaves if re.search(pattern, path_str(p))]
  if not chosen:
    raise ValueError(f"pattern {pattern!r} matches no parameter")
  new, report = {}, {}
  for p, w in tqdm(chosen, desc=f"factorize ({method})", disable=not progress):
    name = path_str(p)
    try:
      rank = fz.cp_rank(np.shape(w), rate)
      leaf, info = factorize_kernel(jnp.asarray(w), rank, fmt, method, **solver)
    except ValueError as e:
      raise ValueError(f"parameter {name!r}: {e}") from e
    for message in info.pop("warnings", ()):  # e.g. QAF's sweep cap
      warnings.warn(f"parameter {name!r}: {message}", stacklevel=2)
    w32 = jnp.asarray(w, jnp.float32)
    err = jnp.linalg.norm(leaf.dequantize(jnp.float32) - w32)
    report[name] = {
      "rank": rank,
      "error": float(err / jnp.linalg.norm(w32)),
      **info,
    }
    new[name] = leaf
  tree = jax.tree_util.tree_map_with_path(
    lambda p, w: new.get(path_str(p), w), params
  )
  return tree, report


def _factorized_call(module, x, kernel: CPKernel):
  """One intercepted nn.Conv / nn.Dense call computed from its factors."""
  fs = kernel.float_factors()
  a, b = fs[0], fs[1]
  dtype = module.dtype or jnp.result_type(x.dtype, jnp.float32)
  x = x.astype(jnp.float32)
  if isinstance(module, nn.Dense):
    y = jnp.matmul(x, b, precision=_HI)
  else:
    if module.feature_group_count != 1:
      raise ValueError(
        f"{'/'.join(module.path)}: a grouped conv cannot run a CPKernel "
        "(QAF's mapping is for ungrouped convs)"
      )
    kh, kw = kernel.shape[:2]
    if kh * kw == 1:  # the 1×1 conv keeps its stride and padding
      y = _conv(module, x, b[None, None], groups=1)
    else:
      y = jnp.matmul(x, b, precision=_HI)
      depthwise = fs[2].reshape(kh, kw, 1, kernel.rank)
      y = _conv(module, y, depthwise, groups=kernel.rank)
  y = jnp.matmul(y, a.T, precision=_HI)
  if module.use_bias:
    y = y + module.get_variable("params", "bias")
  return y.astype(dtype)


def _conv(module: nn.Conv, x, kernel, groups: int):
  """`module`'s conv geometry (stride, padding, dilation) with another
  kernel, on NHWC input."""
  from flax.linen import linear

  padding = linear.canonicalize_padding(module.padding, 2)
  if isinstance(padding, str) and padding not in ("SAME", "VALID"):
    raise ValueError(
      f"{'/'.join(module.path)}: padding {padding!r} is not supported in a "
      "factorized conv (SAME, VALID or explicit pads)"
    )

  def pair(v):
    return (1, 1) if v is None else ((v, v) if isinstance(v, int) else tuple(v))

  return jax.lax.conv_general_dilated(
    x,
    kernel,
    window_strides=pair(module.strides),
    padding=padding,
    lhs_dilation=pair(module.input_dilation),
    rhs_dilation=pair(module.kernel_dilation),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=groups,
    precision=_HI,
  )


def _factorized_layer(module, next_fun, args, kwargs):
  if module.has_variable("params", "kernel"):
    kernel = module.get_variable("params", "kernel")
    if is_cp(kernel):
      return _factorized_call(module, args[0], kernel)
  return next_fun(*args, **kwargs)


def _conv_or_dense(module) -> bool:
  return isinstance(module, (nn.Conv, nn.Dense))


def apply(model: nn.Module, variables, *inputs, method=None, **kwargs):
  """model.apply(variables, *inputs) for a tree holding CPKernels: each
  factorized conv / Dense runs as its sequence of small layers; other
  quantized leaves (QTensors) are dequantized first. kwargs (e.g. mutable)
  go to model.apply."""
  return _apply(model, variables, inputs, (), method=method, **kwargs)


def _apply(model, variables, inputs, outer, **kwargs):
  """`apply` with extra (handler, select) pairs that see a call before the
  factorized-layer one."""
  variables = dict(variables)
  variables["params"] = jax.tree.map(
    lambda x: x if is_cp(x) or not qtensor.is_quantized(x) else x.dequantize(),
    variables["params"],
    is_leaf=lambda x: is_cp(x) or qtensor.is_quantized(x),
  )
  with intercept.stack(*outer, (_factorized_layer, _conv_or_dense)):
    return model.apply(variables, *inputs, **kwargs)


def _batchnorm_handler(momentum: float):
  def recalibrate(module, next_fun, args, kwargs):
    x = args[0].astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))  # features last (nn.BatchNorm's default)
    if module.axis not in (-1, x.ndim - 1):
      raise ValueError(f"{'/'.join(module.path)}: features must be last")
    mean = x.mean(axes)
    var = jnp.mean(jnp.square(x - mean), axes)
    old_mean = module.get_variable("batch_stats", "mean")
    old_var = module.get_variable("batch_stats", "var")
    module.put_variable(
      "batch_stats", "mean", (1 - momentum) * old_mean + momentum * mean
    )
    module.put_variable(
      "batch_stats", "var", (1 - momentum) * old_var + momentum * var
    )
    y = (x - mean) * jax.lax.rsqrt(var + module.epsilon)
    if module.use_scale:
      y = y * module.get_variable("params", "scale")
    if module.use_bias:
      y = y + module.get_variable("params", "bias")
    return y.astype(module.dtype or args[0].dtype)

  return recalibrate


def recalibrate_batchnorm(
  model: nn.Module, variables, images, *, momentum: float = 1.0, **kwargs
):
  """New BatchNorm statistics for a (factorized) model on calibration
  images, as the QAF authors recalibrate after factorizing.

  Every nn.BatchNorm runs in train mode: it normalises with the mean and
  (biased) variance of its input over `images` and stores
  (1 - momentum) * old + momentum * new. All images form one batch, so with
  the default momentum 1 the statistics are the calibration set's exact
  ones, each layer seeing inputs already normalised by the recalibrated
  layers before it. (The authors run PyTorch train mode, momentum 0.1,
  over about 2048 training images in batches; ours is the one-batch limit.)

  Args:
    model, variables: as for `apply` (with a 'batch_stats' collection).
    images: the calibration batch, [n, ...].
    momentum: weight of the new statistics.
    **kwargs: passed to model.apply.

  Returns:
    the new 'batch_stats' collection.
  """
  _, updates = _apply(
    model,
    variables,
    (images,),
    ((_batchnorm_handler(momentum), lambda m: isinstance(m, nn.BatchNorm)),),
    mutable=["batch_stats"],
    **kwargs,
  )
  return updates["batch_stats"]


def macs(model: nn.Module, variables, *inputs, **kwargs) -> dict:
  """Multiply-accumulates per example of every nn.Conv / nn.Dense call in
  one forward of `inputs` (shapes only: run under jax.eval_shape), keyed by
  the module path. A CPKernel counts its sequence as `apply` runs it (B at
  the input resolution of a strided conv); a float kernel counts the conv.
  """
  counts = {}

  def count(module, next_fun, args, kw):
    out = next_fun(*args, **kw)
    x = args[0]
    k = module.get_variable("params", "kernel")
    out_pos = math.prod(out.shape[1:-1]) if out.ndim > 2 else 1
    in_pos = math.prod(x.shape[1:-1]) if x.ndim > 2 else 1
    if is_cp(k):
      r = k.rank
      cout, cin = k.shape[-1], k.shape[-2]
      if len(k.shape) == 4 and k.shape[0] * k.shape[1] > 1:
        total = in_pos * cin * r + out_pos * (
          k.shape[0] * k.shape[1] * r + r * cout
        )
      else:
        total = out_pos * (cin * r + r * cout)
    else:
      total = out_pos * math.prod(np.shape(k))
    counts["/".join(module.path)] = int(total)
    return out

  def run(variables, *inputs):
    return _apply(
      model, variables, inputs, ((count, _conv_or_dense),), **kwargs
    )

  jax.eval_shape(run, variables, *inputs)
  return counts
