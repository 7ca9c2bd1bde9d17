"""Static activation scales: run a model over calibration batches and turn
what the observers saw into one stored scale per matched layer input.

The model runs eagerly (op by op, not under jit), so the observers can
read each layer input as it is produced; its weights may be float or
quantized (qjax.apply), and every layer sees float activations.
"""

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from qjax.activations import observers, quantizer


def _as_args(batch) -> tuple:
  return batch if isinstance(batch, tuple) else (batch,)


def _run_all(model, variables, batches, recipe, observe, desc, progress):
  from qjax import inference  # noqa: PLC0415 (qjax.linen imports hooks)
  from qjax.activations import hooks  # noqa: PLC0415

  is_nnx = isinstance(model, nnx.Module)
  if is_nnx and variables is not None:
    raise ValueError(
      "an NNX model is calibrated with the parameters it holds: pass "
      "variables=None (nnx.update the model first to calibrate on others)"
    )
  for batch in tqdm(batches, desc=desc, disable=not progress):
    args = _as_args(batch)
    root = model if is_nnx else None
    with hooks.quantized_inputs(recipe, root=root, observe=observe):
      if is_nnx:
        model(*args)
      else:
        inference.apply(model, variables, *args, mode="dequantize")


def _eager(path, x):
  if isinstance(x, jax.core.Tracer):
    raise ValueError(
      f"layer {path!r}: calibrate runs the model eagerly; it was called "
      "under a JAX transformation (jit/vmap/grad)"
    )


def calibrate(
  model,
  variables,
  batches,
  recipe,
  *,
  progress: bool = True,
) -> dict[str, jax.Array]:
  """{layer path: stored static scale} for every static rule's inputs.

  Args:
    model: a Flax Linen module, or an NNX module (variables None: its own
      parameters).
    variables: Linen variables or params (float or quantized).
    batches: an iterable of model inputs (an array or a tuple of args);
      iterated twice when a percentile or MSE observer is used.
    recipe: a qjax.activations.ActRecipe.
    progress: show a progress bar per pass.

  Returns:
    Scales for qjax.apply(..., activations=recipe, act_scales=scales).

  Raises:
    ValueError: a static rule matched no layer input.
  """
  batches = list(batches)
  seen: dict[str, list] = {}  # path -> [quant, amax, count]

  def first(path, quant, x):
    _eager(path, x)
    if not quant.static:
      return
    amax, count = observers.amax_and_count(x)
    entry = seen.setdefault(path, [quant, 0.0, 0])
    entry[1] = max(entry[1], amax)
    entry[2] += count

  _run_all(model, variables, batches, recipe, first, "observe", progress)
  if recipe.static and not seen:
    raise ValueError(
      "no layer input matched a static activation rule: "
      + ", ".join(r.pattern for r in recipe.rules if r.quant and r.quant.static)
    )
  second = {p: e for p, e in seen.items() if e[0].observer != "minmax"}
  kept: dict[str, object] = {}

  def again(path, quant, x):
    if path not in second:
      return
    _, amax, count = second[path]
    if quant.observer == "percentile":
      k = observers.keep_count(count, quant.percentile)
      new = observers.largest(x, k)
      kept[path] = observers.merge_largest(kept.get(path), new, k)
    else:
      errors = observers.clip_errors(x, quant, amax).astype(np.float64)
      kept[path] = kept.get(path, 0.0) + errors

  if second:
    _run_all(model, variables, batches, recipe, again, "observe 2", progress)
  scales = {}
  for path, (quant, amax, count) in seen.items():
    if quant.observer == "percentile":
      amax = observers.percentile_of(kept[path], count, quant.percentile)
    elif quant.observer == "mse":
      r = observers.best_ratio(kept[path], quant.mse_ratios)
      amax = float(np.float32(amax) * np.float32(r))
    scales[path] = quantizer.static_scale(np.float32(amax), quant)
  return scales
