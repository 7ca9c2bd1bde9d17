"""run(config, workdir): quantize one model with one recipe, evaluate, save.

A run writes into `workdir`:
  metrics.json            float vs quantized quality, bytes, bits per weight,
                          per layer: SQNR, the method's seconds and, for
                          calibrated methods, the loss tr(D^T H D) / 2
                          (also logged, one absl line per layer).
  results.csv             one row per run (appended: a sweep shares it).
  quality_vs_bits.png     every row of results.csv, one panel per model.
  checkpoint/             the quantized tree (qjax.checkpoint), if asked.
  resume/                 with config.resume, the finished blocks of a
                          calibrated run (qjax.io.resume) until it ends.
"""

import csv
import dataclasses
import json
import pathlib
import shutil
import time

from absl import logging

import qjax
from configs import common
from experiments import tasks
from qjax import activations as act
from qjax import formats
from qjax import metrics as qmetrics
from qjax.io import checkpoint, resume

# The config's method names (configs/common.py) and the stages they run.
METHODS = {
  "rtn": ("rtn",),
  "gptq": ("gptq",),
  "magr+rtn": ("magr", "rtn"),
  "magr+gptq": ("magr", "gptq", "cd"),
  "pipe": ("rtn", "pipe"),
  "magr+pipe": ("magr", "rtn", "pipe"),
  "gptq+pipe": ("gptq", "pipe"),
  "ed": ("ed",),
  "gpfq": ("gpfq",),
  "qaf": ("qaf",),
  "ftq": ("ftq",),
}
FACTORIZED = ("qaf", "ftq")
# Pre-transforms that go in front of any method above ('hadamard+gptq').
PRE_TRANSFORMS = ("hadamard", "smoothquant")
CSV_FIELDS = (
  "name",
  "model",
  "method",
  "format",
  "bits_per_weight",
  "float_bytes",
  "quantized_bytes",
  "quality",
  "float_quality",
  "quantized_quality",
)


def format_name(config) -> str:
  """config.format, or intN / uintN from bits and zero_point."""
  kind = "uint" if config.zero_point else "int"
  return config.format or f"{kind}{config.bits}"


def _grid(config) -> tuple[int, int | None]:
  """(element bits, block size or None) of the config's grid."""
  name = format_name(config)
  if formats.is_block_format(name):
    fmt, scaling = formats.block_format(name)
    return fmt.bits, scaling.sizes[0]
  return formats.get(name).bits, config.block or None


def _stages(config) -> tuple[str, ...]:
  """The stages of config.method: pre-transforms, then a METHODS entry."""
  parts = config.method.split("+")
  pre = []
  while parts and parts[0] in PRE_TRANSFORMS:
    pre.append(parts.pop(0))
  rest = "+".join(parts)
  if rest not in METHODS or len(set(pre)) != len(pre):
    raise ValueError(
      f"unknown method {config.method!r}; choices: {', '.join(METHODS)}, "
      f"each optionally after {' / '.join(p + '+' for p in PRE_TRANSFORMS)}"
    )
  if pre and rest in FACTORIZED:
    raise ValueError(
      f"method {config.method!r}: {rest} factorizes the kernel and takes "
      "no pre-transform"
    )
  return (*pre, *METHODS[rest])


def stage_options(config) -> dict:
  """{stage: options} for the config's method, MagR's and coordinate
  descent's authors' defaults filled in for the grid.

  MagR: alpha 1e-3 per channel / 1e-4 per group, 200 / 150 iterations, the
  l-inf per group of the quantizer's group size (a short last group where
  it does not divide), grid step shrunk by beta = 0.8 / 0.9 / 1.0 at 2 / 3
  / >= 4 bits; magr+gptq ends in coordinate-descent sweeps (30 at 2 bits,
  else 1). A config value > 0 (sweeps >= 0) overrides each default.
  """
  stages = _stages(config)
  bits, group = _grid(config)
  out = {}
  for stage in stages:
    if stage not in FACTORIZED:
      out[stage] = dict(config[stage].to_dict())
  for stage in ("rtn", "gptq"):
    if stage in out and config.clip_ratios:
      out[stage]["clip_ratios"] = tuple(config.clip_ratios)
  if "magr" in stages:
    m = out["magr"]
    shrink = m.pop("shrink") or {2: 0.8, 3: 0.9}.get(bits, 1.0)
    m["alpha"] = m["alpha"] or (1e-4 if group else 1e-3)
    m["iters"] = m["iters"] or (150 if group else 200)
    m["group_size"] = m["group_size"] or group
    if "pipe" not in stages:  # the expansion's orders refine a full grid
      quantizer = "gptq" if "gptq" in stages else "rtn"
      out[quantizer]["shrink"] = shrink
  if "cd" in stages and out["cd"]["sweeps"] < 0:
    out["cd"]["sweeps"] = 30 if bits == 2 else 1
  for stage in FACTORIZED:
    if stage in stages:
      out[stage] = dict(config[stage].to_dict())
  return out


def _rule(pattern, fmt, scaling, method, options, ragged=None) -> dict:
  rule = {"pattern": pattern, "format": fmt, "method": method}
  if scaling is not None:
    rule["scaling"] = scaling
  if ragged is not None:
    rule["ragged"] = ragged
  stages = method.split("+")
  rule["options"] = options[stages[0]] if len(stages) == 1 else options
  return rule


def recipe_config(config) -> dict:
  """The recipe the config's fields describe, as qjax.Recipe.from_config
  reads it (config.recipe, when set, is returned instead)."""
  if config.get("recipe"):
    return (
      config.recipe.to_dict()
      if hasattr(config.recipe, "to_dict")
      else dict(config.recipe)
    )
  stages = _stages(config)
  method = "+".join(stages)
  options = stage_options(config)
  name = format_name(config)
  if config.method in FACTORIZED:
    # One scale per CP factor (the authors' grid); no blocks, no RTN rule.
    return {
      "rules": [_rule(config.factor_pattern, name, None, method, options)]
    }
  axis = config.block_axis
  pattern = config.get("pattern", "kernel")
  data_free = config.rtn_pattern if config.method != "rtn" else ""
  rtn_options = {"rtn": {"clip_ratios": tuple(config.clip_ratios)}}
  rules = []
  if formats.is_block_format(name):
    # A channel count that is no multiple of the block (MobileNetV2's 16
    # and 24) ends in a short block, as the MX spec's zero padding would.
    main = {
      **_rule(pattern, name, None, method, options, config.ragged),
      "axis": axis,
    }
    if data_free:
      # Layers a calibrated method cannot see (a CNN's 3x3 and depthwise
      # convs, whose input axis of 3 or 1 channels holds no block) take the
      # block format's elements with one float32 scale per output channel,
      # for every method (RTN too, so the comparison stays fair).
      element, _ = formats.block_format(name)
      channel = {"mode": "channel", "axes": (-1,)}
      rules.append(_rule(data_free, element, channel, "rtn", rtn_options))
    return {"rules": [*rules, main]}
  if config.block:
    scaling = {
      "mode": "block",
      "axes": (axis,),
      "sizes": (config.block,),
      "ragged": config.ragged,
    }
  else:
    scaling = {"mode": "channel", "axes": (-1,)}
  scaling["scale_format"] = config.scale_format
  scaling["zero_point"] = name.startswith("uint")
  if data_free:
    rules.append(_rule(data_free, name, scaling, "rtn", rtn_options))
  return {"rules": [*rules, _rule(pattern, name, scaling, method, options)]}


def recipe_from_config(config) -> qjax.Recipe:
  """The config's recipe (qjax.Recipe.from_config of recipe_config)."""
  return qjax.Recipe.from_config(recipe_config(config))


def act_recipe_from_config(config, task=None):
  """The config's activation rules (qjax.activations.ActRecipe), or None
  when activations stay float: config.act_recipe when set, else one rule
  for the layer inputs act.pattern matches ('' = the task's act_pattern)
  and, with act.kv_format, one per-token rule for the KV-cache taps."""
  if config.get("act_recipe"):
    return act.ActRecipe.from_config(config.act_recipe)
  a = config.get("act")
  if a is None or not (a.format or a.kv_format):
    return None
  task = task or tasks.get(config.model)
  rules = []
  if a.kv_format:
    if not hasattr(task, "kv_pattern"):
      raise ValueError(
        f"act.kv_format={a.kv_format!r}: {task.name!r} has no KV cache"
      )
    rules.append(act.act_rule(task.kv_pattern, a.kv_format, "token"))
  if a.format:
    options = {}
    if a.granularity == "block" or a.block_size:
      options["block_size"] = a.block_size or None
    if a.static:
      options.update(static=True, observer=a.observer)
      if a.observer == "percentile":
        options["percentile"] = a.percentile
    if a.rotate >= 0:
      options["rotate"] = a.rotate
    pattern = a.pattern or task.act_pattern
    rules.append(act.act_rule(pattern, a.format, a.granularity, **options))
  return act.ActRecipe(tuple(rules))


def calibration_rules(recipe, config):
  """The activation rules weight calibration runs under (act.weights_see).
  A kernel the 'hadamard' stage will rotate is float while it calibrates,
  so the rules rotate the input themselves with the stage's R (its block
  and seed), as the Rotated leaf will at inference. Every input a rule
  matches is rotated, also of a layer the stage does not reach (a
  depthwise conv kept on RTN): there the statistics see a rotation that
  inference will not apply."""
  if "hadamard" not in _stages(config):
    return recipe
  rules = []
  for r in recipe.rules:
    q = r.quant
    if q is not None and q.rotate is None:
      q = dataclasses.replace(
        q, rotate=config.hadamard.block, rotate_seed=config.hadamard.seed
      )
    rules.append(dataclasses.replace(r, quant=q))
  return act.ActRecipe(tuple(rules))


def _act_name(config) -> str:
  if config.get("act_recipe"):
    return "_actrecipe"
  a = config.get("act")
  if a is None or not (a.format or a.kv_format):
    return ""
  out = ""
  if a.format:
    out += f"_a{a.format}"
    if a.granularity != "token":
      out += f"-{a.granularity}{a.block_size or ''}"
    if a.static:
      out += f"-{a.observer}"
      if a.observer == "percentile":
        out += f"{a.percentile:g}"
    if a.rotate >= 0:
      out += f"-rot{a.rotate or ''}"
    if a.pattern:
      out += "-custom"
  if a.kv_format:
    out += f"_kv{a.kv_format}"
  if a.weights_see:
    out += "_aware"
  return out


def run_name(config) -> str:
  """config.name, or one derived from every field a run depends on."""
  if config.name:
    return config.name
  stages = _stages(config)
  name = format_name(config)
  out = f"{config.model}_{config.method}_{name}"
  if config.block and not formats.is_block_format(name):
    out += f"_g{config.block}"
  if config.scale_format != "float32":
    out += f"_{config.scale_format}"
  if "pipe" in stages:
    out += f"_o{config.pipe.order}"
    if config.pipe.keep < 1:
      out += f"_k{config.pipe.keep:g}"
  if "ed" in stages and config.ed.adjust != "lstsq":
    out += f"_{config.ed.adjust}"
  if "gpfq" in stages and config.gpfq.scales != "weights":
    out += f"_{config.gpfq.scales}"
  for stage in FACTORIZED:
    if stage in stages:
      out += f"_rate{config[stage].rate:g}"
  if config.clip_ratios:
    out += "_clip"
  if "smoothquant" in stages:
    out += f"_sq{config.smoothquant.alpha:g}"
  if "hadamard" in stages:
    out += "_had"
  out += _act_name(config)
  if "magr" in stages:
    if config.magr.statistics == "last_sample":
      out += "_last"
    if config.magr.shrink:
      out += f"_beta{config.magr.shrink:g}"
  if "cd" in stages and config.cd.sweeps >= 0:
    out += f"_cd{config.cd.sweeps}"
  # Any other method knob off its default names itself.
  defaults = common.base_config(config.model)
  handled = {
    ("smoothquant", "alpha"),
    ("pipe", "order"),
    ("pipe", "keep"),
    ("ed", "adjust"),
    ("gpfq", "scales"),
    ("qaf", "rate"),
    ("ftq", "rate"),
    ("magr", "statistics"),
    ("magr", "shrink"),
    ("cd", "sweeps"),
  }
  for stage in stages:
    for key, value in config[stage].items():
      if (stage, key) not in handled and value != defaults[stage][key]:
        out += f"_{stage}-{key}{value}"
  if config.layers:
    out += f"_layers{config.layers}"
  subset = config.get("calib", {}).get("subset", 0)
  if subset:
    out += f"_calib{subset}"
  return out


_FLOAT_CACHE = {}


def _float_scores(task, params, config):
  key = (
    task.name,
    config.layers,
    json.dumps(config.eval.to_dict(), sort_keys=True),
  )
  if key not in _FLOAT_CACHE:
    reference = task.reference(params, config)
    _FLOAT_CACHE[key] = (reference, task.score(params, config, reference))
  return _FLOAT_CACHE[key]


def _act_scales(task, params, qparams, config, recipe):
  """Static activation scales, observed on the quantized model's inputs
  (qjax.activations.calibrate), or None for dynamic rules."""
  if recipe is None or not recipe.static:
    return None
  if not hasattr(task, "calibration_batches"):
    raise ValueError(
      f"static activation scales need calibration batches, which "
      f"{task.name!r} has none of; use dynamic scales (act.static=False)"
    )
  batches = task.calibration_batches(config)[: config.act.calib_batches]
  variables = {"params": qparams, **task.collections()}
  return act.calibrate(task.module(params), variables, batches, recipe)


def run(config, workdir) -> dict:
  """Quantizes config.model with the config's recipe; returns the metrics."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  task = tasks.get(config.model)
  recipe = recipe_from_config(config)
  act_recipe = act_recipe_from_config(config, task)
  weights_see = bool(config.get("act", {}).get("weights_see", False))
  if weights_see and act_recipe is None:
    raise ValueError("act.weights_see needs act.format (or act_recipe)")
  if weights_see and not recipe.needs_calibration:
    raise ValueError(
      f"act.weights_see: method {config.method!r} is not calibrated"
    )
  params = task.load(config)
  reference, float_scores = _float_scores(task, params, config)
  records = []  # one per quantized leaf (qjax.quantize's layer_log)
  start = time.perf_counter()
  if recipe.needs_calibration:
    if not hasattr(task, "block_model"):
      raise ValueError(
        f"calibrated methods are not wired for {task.name!r} yet; choices: "
        + ", ".join(
          t.name for t in tasks.TASKS.values() if hasattr(t, "block_model")
        )
      )
    calib = (task.block_model(params), task.calibration_batches(config))
    # ED/GPFQ rules take the two-stream driver (float32 only), the others
    # GPTQ's sequential mode (qjax.quantize dispatches).
    precision = config.get("calib", {}).get("precision", "float32")
    if recipe.needs_two_streams:
      precision = "float32"
    extra = {}
    if config.get("resume"):
      extra["resume"] = resume.BlockLog(workdir / "resume")
    if weights_see:
      # Static scales come from the float model here: the quantized one
      # does not exist yet.
      extra["activations"] = calibration_rules(act_recipe, config)
      extra["act_scales"] = _act_scales(
        task, params, params, config, act_recipe
      )
    qparams = qjax.quantize(
      params,
      recipe,
      calib=calib,
      progress=True,
      calib_precision=precision,
      layer_log=records,
      **extra,
    )
  else:
    qparams = qjax.quantize(params, recipe, progress=True, layer_log=records)
  seconds = time.perf_counter() - start
  if act_recipe is None:
    q_scores = task.score(qjax.dequantize(qparams), config, reference)
  else:
    # The quantized tree itself: a Hadamard or SmoothQuant kernel brings its
    # input transform to the activation rule (qjax.activations.hooks).
    scales = _act_scales(task, params, qparams, config, act_recipe)
    q_scores = task.score(
      qparams, config, reference, activations=act_recipe, act_scales=scales
    )
  layer_stats = {
    p: s for p, s in qjax.stats(qparams, params).items() if s["quantized"]
  }
  for r in records:
    logging.info(
      "%s: %s, %.2f s, SQNR %.2f dB%s",
      r["path"],
      r["method"],
      r["seconds"],
      r["sqnr_db"],
      f", loss {r['loss']:.4g}" if "loss" in r else "",
    )
    if r["path"] in layer_stats:
      layer_stats[r["path"]]["seconds"] = r["seconds"]
      if "loss" in r:
        layer_stats[r["path"]]["loss"] = r["loss"]
  metrics = {
    "name": run_name(config),
    "model": config.model,
    "method": config.method,
    "format": format_name(config),
    "recipe": repr(recipe),
    "activations": None if act_recipe is None else repr(act_recipe),
    "float": float_scores,
    "quantized": q_scores,
    "quality_metric": task.quality,
    "bits_per_weight": qmetrics.quantized_bits_per_weight(qparams),
    "float_bytes": qmetrics.model_bytes(params),
    "quantized_bytes": qmetrics.model_bytes(qparams),
    "quantize_seconds": seconds,
    "layers": layer_stats,
  }
  (workdir / "metrics.json").write_text(json.dumps(metrics, indent=1))
  _append_csv(workdir / "results.csv", metrics, task)
  plot_results(workdir / "results.csv", workdir / "quality_vs_bits.png")
  target = workdir / "checkpoint"
  if target.exists():  # never leave an earlier run's tree next to these
    shutil.rmtree(target)
  if config.save_checkpoint:
    checkpoint.save(target, qparams, recipe=recipe)
  shutil.rmtree(workdir / "resume", ignore_errors=True)  # the run is done
  return metrics


def _append_csv(path, m, task):
  new = not path.exists()
  with open(path, "a", newline="") as f:
    w = csv.DictWriter(f, CSV_FIELDS)
    if new:
      w.writeheader()
    w.writerow(
      {
        "name": m["name"],
        "model": m["model"],
        "method": m["method"],
        "format": m["format"],
        "bits_per_weight": f"{m['bits_per_weight']:.4f}",
        "float_bytes": m["float_bytes"],
        "quantized_bytes": m["quantized_bytes"],
        "quality": task.quality,
        "float_quality": f"{m['float'][task.quality]:.6g}",
        "quantized_quality": f"{m['quantized'][task.quality]:.6g}",
      }
    )


def read_results(path) -> list[dict]:
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def plot_results(csv_path, png_path) -> None:
  """Quality against bits per weight, one panel per model."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = read_results(csv_path)
  models = sorted({r["model"] for r in rows})
  fig, axes = plt.subplots(
    1, len(models), figsize=(5 * len(models), 4), squeeze=False
  )
  for ax, model in zip(axes[0], models, strict=True):
    mine = sorted(
      (r for r in rows if r["model"] == model),
      key=lambda r: float(r["bits_per_weight"]),
    )
    xs = [float(r["bits_per_weight"]) for r in mine]
    ys = [float(r["quantized_quality"]) for r in mine]
    ax.plot(xs, ys, "o-", label="quantized")
    for x, y, r in zip(xs, ys, mine, strict=True):
      ax.annotate(
        r["format"],
        (x, y),
        fontsize=7,
        xytext=(3, 3),
        textcoords="offset points",
      )
    ax.axhline(
      float(mine[0]["float_quality"]), color="gray", ls="--", label="float"
    )
    ax.set_xlabel("bits per weight (codes + scales)")
    ax.set_ylabel(mine[0]["quality"])
    if mine[0]["quality"] == "perplexity":
      ax.set_yscale("log")
    ax.set_title(model)
    ax.legend()
  fig.tight_layout()
  fig.savefig(png_path, dpi=110)
  plt.close(fig)


def summary_table(metrics: dict) -> str:
  """A Markdown table of one run: float vs quantized."""
  q = metrics["quality_metric"]
  fb, qb = metrics["float_bytes"], metrics["quantized_bytes"]
  return "\n".join(
    [
      f"| {metrics['model']} | {q} | model bytes | bits/weight (quantized "
      "leaves) |",
      "|---|---|---|---|",
      f"| float32 | {metrics['float'][q]:.4f} | {fb:,} | 32 |",
      f"| {metrics['name']} | {metrics['quantized'][q]:.4f} | {qb:,} "
      f"({qb / fb:.3f}x) | {metrics['bits_per_weight']:.3f} |",
    ]
  )
