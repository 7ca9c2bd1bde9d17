"""Weight-and-activation quantization: SmolLM2-135M's KJV perplexity,
MiniLM's embedding cosine and MobileNetV2's top-1 agreement with float.

  python -m experiments.activation_table \
    --out=docs/results/activations_smollm2.json \
    --plot=docs/activations_smollm2.png
  python -m experiments.activation_table --model=minilm \
    --out=docs/results/activations_minilm.json \
    --plot=docs/activations_minilm.png
  python -m experiments.activation_table --model=mobilenet_v2 \
    --out=docs/results/activations_mobilenet_v2.json \
    --plot=docs/activations_mobilenet_v2.png

Every row quantizes the inputs of the 210 Dense layers (q, k, v, o, gate,
up, down; the tied LM head stays float) and, for the KV rows, the keys
(after RoPE) and values a cache would hold, along the head dimension (64).
Weights: RTN, or GPTQ (act-order, calibrated on float activations, float32
calibration); '+H' rows rotate both sides with the randomized Hadamard
matrix of the layer's width (576 or 1536; qjax.Hadamard on the weights, the
same rotation on the inputs); '+SQ' rows apply SmoothQuant (alpha 0.5,
max |X_j| from the calibration windows) before the weight quantizer. Rows
are named W<weight bits>A<activation bits>.

MobileNetV2 follows its config (configs/mobilenet_v2.py): one scale per
output channel (block formats: their own ragged blocks along the input
channels), GPTQ on the pointwise convs and the classifier, RTN on the
same grid for the stem and the depthwise convs, and the pre-transforms on
the pointwise convs and the classifier (a 3x3 conv mixes pixels, so a
channel rotation does not pass through it). Activation rules quantize
every conv's and the classifier's input except the stem's (the image),
per pixel ('token') or in ragged blocks along the channels; the W6A6 rows
are PIPE's published setting (64.20 top-1 against 71.88 for float, on
ImageNet; here: agreement with float on the photos). --rows picks some
(comma-separated names); the JSON keeps every row measured so far and the
table is printed from it.
"""

import dataclasses
import json
import pathlib
import time

import jax
import numpy as np
from absl import app, flags

import qjax
from experiments import run_lib, tasks
from qjax import activations as act
from qjax import metrics as qmetrics
from qjax.models import minilm, smollm2

if __name__ == "__main__":  # flags only for the program (tests import it)
  flags.DEFINE_string("out", "docs/results/activations_smollm2.json", "JSON")
  flags.DEFINE_string("plot", "", "write a PNG here")
  flags.DEFINE_string("rows", "", "only these rows (comma-separated)")
  flags.DEFINE_integer("eval_windows", 8, "evaluation windows of 512")
  flags.DEFINE_integer("layers", 0, "first N blocks only (smoke runs)")
  flags.DEFINE_enum(
    "model", "smollm2", ["smollm2", "minilm", "mobilenet_v2"], "model"
  )
  flags.DEFINE_integer("crops_per_photo", 16, "MobileNetV2 evaluation crops")

# Every Dense layer's input, per model.
LAYERS = {
  "smollm2": r"/(q|k|v|o|gate|up|down)$",
  "minilm": r"/(query|key|value|attn_out|ffn_in|ffn_out)$",
  "mobilenet_v2": tasks.MobileNetV2Task.act_pattern,
}
CACHE = r"/(k_cache|v_cache)$"


def _weights(fmt, method, hadamard=False, smooth=False):
  """A weight recipe for every Dense kernel; method 'rtn' or 'gptq'."""
  if fmt is None:
    return None
  stages = []
  if smooth:
    stages.append(qjax.SmoothQuant(alpha=0.5))
  if hadamard:
    stages.append(qjax.Hadamard())
  stages.append(qjax.GPTQ(act_order=True) if method == "gptq" else qjax.RTN())
  if method == "pipe":  # PIPE: RTN, then a second residual order
    stages.append(qjax.Pipe(order=2))
  options = {}
  if fmt == "uint4_g128":
    fmt, options = (
      "uint4",
      {"scaling": qjax.formats.per_block(128, 0, zero_point=True, ragged=True)},
    )
  return qjax.Recipe(
    (qjax.rule("kernel", fmt, method=qjax.chain(*stages), **options),)
  )


def _acts(fmt, granularity="token", hadamard=False, pattern=None, **kw):
  if fmt is None:
    return None
  rotate = 0 if hadamard else None
  pattern = pattern or LAYERS["smollm2"]
  return act.recipe(
    act.act_rule(pattern, fmt, granularity, rotate=rotate, **kw)
  )


# name -> (weight format, weight method, weight pre-transform, activation
# recipe). Pre-transforms ('H' Hadamard, 'SQ' SmoothQuant) are stored with
# the kernel, which rotates or scales its input itself (qjax.activations).
ROWS = {
  "float": (None, "rtn", "", None),
  "W16A8 int8 token": (None, "rtn", "", _acts("int8")),
  "W16A8 int8 token +H": (None, "rtn", "", _acts("int8", hadamard=True)),
  "W8A16 int8": ("int8", "rtn", "", None),
  "W8A16 fp8 e4m3": ("float8_e4m3fn", "rtn", "", None),
  "W8A16 mxfp8 e4m3": ("mxfp8_e4m3", "rtn", "", None),
  "W8A8 int8 token": ("int8", "rtn", "", _acts("int8")),
  "W8A8 int8 token +H": ("int8", "rtn", "H", _acts("int8")),
  "W8A8 int8 token +SQ": ("int8", "rtn", "SQ", _acts("int8")),
  "W8A8 int8 tensor static minmax": (
    "int8",
    "rtn",
    "",
    _acts("int8", "tensor", static=True),
  ),
  "W8A8 int8 tensor static p99.99": (
    "int8",
    "rtn",
    "",
    _acts("int8", "tensor", static=True, observer="percentile"),
  ),
  "W8A8 fp8 e4m3 token": (
    "float8_e4m3fn",
    "rtn",
    "",
    _acts("float8_e4m3fn"),
  ),
  "W8A8 mxfp8 e4m3": ("mxfp8_e4m3", "rtn", "", _acts("mxfp8_e4m3")),
  "W4A8 GPTQ uint4 g128 int8 token": (
    "uint4_g128",
    "gptq",
    "",
    _acts("int8"),
  ),
}
for _fmt in ("int4", "mxfp4", "nvfp4"):
  for _method in ("rtn", "gptq"):
    for _pre in ("", "H") + (("SQ",) if _fmt == "int4" else ()):
      _name = f"W4A4 {_fmt} {_method.upper()}" + (f" +{_pre}" if _pre else "")
      ROWS[_name] = (_fmt, _method, _pre, _acts(_fmt))
# PIPE: weights expanded to 2 int4 orders; inputs as one term or expanded
# to 2 (ActQuant.orders).
ROWS["W4A4 int4 PIPE o2"] = ("int4", "pipe", "", _acts("int4"))
ROWS["W4A4 int4 PIPE o2 inputs x2"] = (
  "int4",
  "pipe",
  "",
  _acts("int4", orders=2),
)
# GPTQ calibrated on the quantized model's inputs (weights see the
# activation rules of their row).
for _name in (
  "W4A8 GPTQ uint4 g128 int8 token",
  "W4A4 int4 GPTQ +H",
  "W4A4 mxfp4 GPTQ +H",
  "W4A4 nvfp4 GPTQ",
):
  _fmt, _method, _pre, _recipe = ROWS[_name]
  ROWS[_name + " aware"] = (_fmt, _method + "+aware", _pre, _recipe)
for _fmt in ("int8", "float8_e4m3fn", "mxfp4", "nvfp4"):
  ROWS[f"KV {_fmt}"] = (None, "rtn", "", _acts(_fmt, pattern=CACHE))


# PIPE's published CNN setting (MobileNetV2 only).
W6A6 = {
  "W6A6 int6 RTN": ("int6", "rtn", "", _acts("int6")),
  "W6A6 int6 PIPE o2": ("int6", "pipe", "", _acts("int6")),
  "W6A6 int6 PIPE o2 inputs x2": ("int6", "pipe", "", _acts("int6", orders=2)),
}


def _for_model(rule, model):
  """The rule on the model's layers; a CNN's blocks ragged (MobileNetV2's
  16- and 24-channel inputs)."""
  rule = dataclasses.replace(rule, pattern=LAYERS[model])
  q = rule.quant
  if model == "mobilenet_v2" and q is not None and q.scaling.mode == "block":
    scaling = dataclasses.replace(q.scaling, ragged=True)
    rule = dataclasses.replace(
      rule, quant=dataclasses.replace(q, scaling=scaling)
    )
  return rule


def rows_for(model: str) -> dict:
  """ROWS with the model's layer pattern (no KV rows for an encoder or a
  CNN; the W6A6 rows for MobileNetV2)."""
  if model == "smollm2":
    return dict(ROWS)
  rows = dict(ROWS)
  if model == "mobilenet_v2":
    rows.update(W6A6)
  out = {}
  for name, (fmt, method, pre, recipe) in rows.items():
    if name.startswith("KV"):
      continue
    if model == "mobilenet_v2" and name.endswith("+H aware"):
      # its rotation would reach the depthwise convs' inputs too
      # (_calibration_rules rotates every matched input)
      continue
    if recipe is not None:
      recipe = act.ActRecipe(tuple(_for_model(r, model) for r in recipe.rules))
    out[name] = (fmt, method, pre, recipe)
  return out


def _mobilenet_weights(fmt, method, pre):
  """MobileNetV2's recipe for the row, from its config (module docstring)."""
  from configs import mobilenet_v2 as config_module  # noqa: PLC0415

  if fmt is None:
    return None
  config = config_module.get_config()
  prefix = {"": "", "H": "hadamard+", "SQ": "smoothquant+"}[pre]
  config.method = prefix + method
  config.format = "int4" if fmt == "uint4_g128" else fmt
  return run_lib.recipe_from_config(config)


def _apply_fn(model, recipe, scales):
  # A new function per row: jit never reuses a trace made with other rules.
  return jax.jit(
    lambda p, *xs: qjax.apply(
      model,
      {"params": p},
      *xs,
      activations=recipe,
      act_scales=scales,
      mode="dequantize",
    )
  )


def _quality(model_name, params, recipe, scales, config):
  """SmolLM2: KJV perplexity; MiniLM: mean embedding cosine to float;
  MobileNetV2: top-1 agreement and KL to float."""
  if model_name == "mobilenet_v2":
    task = tasks.get(model_name)
    if model_name not in _REFERENCE:
      raise ValueError("measure the float row first")
    return task.score(
      params,
      config,
      _REFERENCE[model_name],
      activations=recipe or act.ActRecipe(()),
      act_scales=scales,
    )
  if model_name == "smollm2":
    fn = _apply_fn(smollm2.model_for(params), recipe, scales)
    windows = tasks.SmolLM2Task._windows(
      config.eval.window, config.eval.windows
    )
    return qmetrics.perplexity(lambda w: fn(params, w), windows)
  task = tasks.get("minilm")
  ids, mask = task._batch(config.eval.sentences)
  layers = sum(k.startswith("layer_") for k in params)
  fn = _apply_fn(minilm.MiniLM(minilm.Config(layers=layers)), recipe, scales)
  emb = np.asarray(minilm.sentence_embedding(fn(params, ids, mask), mask))
  if model_name not in _REFERENCE:
    raise ValueError("measure the float row first")
  return float(qmetrics.cosine_similarity(emb, _REFERENCE[model_name]).mean())


_REFERENCE = {}


def _calibration_rules(recipe, pre):
  """The activation rules GPTQ calibrates under (an 'aware' row). A kernel
  that the Hadamard stage will rotate is float while it calibrates, so its
  rule rotates the input explicitly (the same R: block 0, seed 0), which
  is what the Rotated leaf does at inference."""
  if pre != "H":
    return recipe
  rules = []
  for r in recipe.rules:
    if r.quant is not None:
      r = dataclasses.replace(r, quant=dataclasses.replace(r.quant, rotate=0))
    rules.append(r)
  return act.ActRecipe(tuple(rules))


def _weights_label(model, fmt, method):
  if fmt is None:
    return "float"
  if model == "mobilenet_v2" and fmt == "uint4_g128":
    fmt = "int4/channel"  # the CNN's grid (configs/mobilenet_v2.py)
  return f"{fmt} {method}"


def measure(name, params, config, quantized_cache, model="smollm2"):
  fmt, method, pre, recipe = rows_for(model)[name]
  task = tasks.get(model)
  # 'gptq+aware': GPTQ calibrated under the row's activation rules
  # (qjax.quantize(..., activations=)), dynamic rules only.
  aware = method.endswith("+aware")
  method = method.removesuffix("+aware")
  if model == "mobilenet_v2":
    wrecipe = _mobilenet_weights(fmt, method, pre)
  else:
    wrecipe = _weights(fmt, method, pre == "H", pre == "SQ")
  start = time.perf_counter()
  key = (fmt, method, pre, aware)
  if wrecipe is None:
    weights = params
  elif key in quantized_cache:
    weights = quantized_cache[key]
  else:
    calib = None
    if wrecipe.needs_calibration:
      calib = (task.block_model(params), task.calibration_batches(config))
    extra = {}
    if aware:
      extra["activations"] = _calibration_rules(recipe, pre)
    weights = qjax.quantize(
      params, wrecipe, calib=calib, progress=True, **extra
    )
    quantized_cache[key] = weights
  scales = None
  if recipe is not None and recipe.static:
    batches = task.calibration_batches(config)[:4]
    if model == "smollm2":
      net = smollm2.model_for(params)
    elif model == "minilm":
      layers = sum(k.startswith("layer_") for k in params)
      net = minilm.MiniLM(minilm.Config(layers=layers))
    else:
      net = task.module(params)
    variables = {"params": weights, **task.collections()}
    scales = act.calibrate(net, variables, batches, recipe)
  if model == "minilm" and name == "float":
    _REFERENCE.pop(model, None)
    ids, mask = task._batch(config.eval.sentences)
    states = _apply_fn(
      minilm.MiniLM(
        minilm.Config(layers=sum(k.startswith("layer_") for k in params))
      ),
      None,
      None,
    )(params, ids, mask)
    _REFERENCE[model] = np.asarray(minilm.sentence_embedding(states, mask))
  if model == "mobilenet_v2" and name == "float":
    _REFERENCE[model] = task.reference(params, config)
  quality = _quality(model, weights, recipe, scales, config)
  if isinstance(quality, dict):  # MobileNetV2: agreement and KL
    metrics = quality
  else:
    metrics = {"perplexity" if model == "smollm2" else "cosine_mean": quality}
  return {
    **metrics,
    "weights": _weights_label(model, fmt, method) + (" aware" if aware else ""),
    "pre": {"": "", "H": "Hadamard", "SQ": "SmoothQuant"}[pre],
    "activations": "float" if recipe is None else recipe.rules[0].quant.spec(),
    "seconds": time.perf_counter() - start,
  }


def _metric(results) -> str:
  """'perplexity' (SmolLM2), 'cosine_mean' (MiniLM) or 'top1_agreement'
  (MobileNetV2), from any row."""
  for r in results.values():
    for metric in ("perplexity", "top1_agreement"):
      if metric in r:
        return metric
  return "cosine_mean"


def table(results) -> str:
  metric = _metric(results)
  ref = results.get("float", {}).get(metric)
  lines = [
    f"| row | weights | activations | {metric} | vs float |",
    "|---|---|---|---|---|",
  ]
  for name in {**ROWS, **W6A6}:
    r = results.get(name)
    if r is None:
      continue
    v = r[metric]
    if metric == "perplexity":
      rel = f"{100 * (v / ref - 1):+.2f}%" if ref else ""
      cell = f"{v:.4f}"
    elif metric == "top1_agreement":
      rel, cell = f"KL {r['kl']:.4f}", f"{v:.4f}"
    else:
      rel, cell = f"1 - cos = {1 - v:.2e}", f"{v:.5f}"
    pre = r.get("pre", "Hadamard" if r.get("hadamard") else "")
    w = r["weights"] + (f" ({pre})" if pre else "")
    lines.append(f"| {name} | {w} | {r['activations']} | {cell} | {rel} |")
  return "\n".join(lines)


def plot(
  results, path, title="SmolLM2-135M", layers="all Dense inputs and weights"
):
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(8, 4))
  fmts = ("int4", "mxfp4", "nvfp4")
  kinds = ("RTN", "RTN +H", "GPTQ", "GPTQ +H")
  width = 0.2
  for i, kind in enumerate(kinds):
    ys = [_error(results, results.get(f"W4A4 {f} {kind}")) for f in fmts]
    ax.bar([j + (i - 1.5) * width for j in range(3)], ys, width, label=kind)
  if _metric(results) == "perplexity":
    ref = results["float"]["perplexity"]
    ax.axhline(ref, color="k", lw=1, ls="--", label=f"float {ref:.2f}")
    ax.set_ylabel("KJV perplexity (log scale)")
  elif _metric(results) == "top1_agreement":
    ax.set_ylabel("KL(float || quantized) on the photos (log scale)")
  else:
    ax.set_ylabel("1 - embedding cosine to float (log scale)")
  ax.set_xticks(range(3), fmts)
  ax.set_yscale("log")
  ax.set_title(f"{title}, W4A4 ({layers})")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def _error(results, r) -> float:
  if r is None:
    return float("nan")
  metric = _metric(results)
  if metric == "top1_agreement":
    return r["kl"]
  return r[metric] if metric == "perplexity" else 1 - r[metric]


def main(argv):
  del argv
  import importlib  # noqa: PLC0415

  f = flags.FLAGS
  model = f.model
  config = importlib.import_module(f"configs.{model}").get_config()
  if model == "smollm2":
    config.eval.windows = f.eval_windows
  if model == "mobilenet_v2":
    config.eval.crops_per_photo = f.crops_per_photo
  config.layers = f.layers or None
  out = pathlib.Path(f.out)
  results = json.loads(out.read_text()) if out.exists() else {}
  params = tasks.get(model).load(config)
  rows = rows_for(model)
  wanted = [n.strip() for n in f.rows.split(",") if n.strip()]
  if any("," in n for n in ROWS):
    raise AssertionError("row names must not contain ',' (--rows splits on it)")
  wanted = wanted or list(rows)
  unknown = [n for n in wanted if n not in rows]
  if unknown:
    raise app.UsageError(f"unknown rows {unknown}; known: {list(rows)}")
  if model in ("minilm", "mobilenet_v2") and "float" not in wanted:
    wanted.insert(0, "float")  # the reference embeddings
  cache = {}
  for name in wanted:
    results[name] = measure(name, params, config, cache, model)
    print(f"{name}: {_error(results, results[name]):.6g}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
  print(table(results))
  if f.plot:
    title = {
      "smollm2": "SmolLM2-135M",
      "minilm": "MiniLM-L6",
      "mobilenet_v2": "MobileNetV2",
    }[model]
    layers = "all Dense inputs and weights"
    if model == "mobilenet_v2":
      layers = "every conv and the classifier; the image stays float"
    plot(results, f.plot, title, layers)


if __name__ == "__main__":
  app.run(main)
