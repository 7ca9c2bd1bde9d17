"""run(config, workdir): quantize one model with one recipe, evaluate, save.

A run writes into `workdir`:
  metrics.json            float vs quantized quality, bytes, bits per weight,
                          per-layer SQNR.
  results.csv             one row per run (appended: a sweep shares it).
  quality_vs_bits.png     every row of results.csv, one panel per model.
  checkpoint/             the quantized tree (qjax.checkpoint), if asked.
"""

import csv
import json
import pathlib
import shutil
import time

import qjax
from experiments import tasks
from qjax import checkpoint, formats
from qjax import eval as qeval
from qjax import recipe as recipe_lib

# Every recipe method but 'skip' (a config quantizes all kernels one way).
METHODS = tuple(m for m in recipe_lib.METHODS if m != "skip")
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


def magr_options(config) -> dict:
  """MagR's defaults from the authors' code, by bit width and granularity.

  alpha 1e-3 per channel / 1e-4 per group, 200 / 150 iterations, the
  l-inf per group of the quantizer's group size (a short last group where
  it does not divide), grid step shrunk by beta = 0.8 / 0.9 / 1.0 at 2 / 3
  / >= 4 bits, and for magr+gptq coordinate-descent sweeps after GPTQ (30 at
  2 bits, else 1). Config fields shrink (> 0) and cd_sweeps (>= 0)
  override; magr_statistics picks 'hessian' or 'last_sample'.
  """
  if formats.is_block_format(config.format):
    fmt, scaling = formats.block_format(config.format)
    bits, group = fmt.bits, scaling.sizes[0]
  else:
    bits, group = formats.get(config.format).bits, config.block or None
  options = {
    "magr_alpha": 1e-4 if group else 1e-3,
    "magr_iters": 150 if group else 200,
    "magr_group_size": group,
    "magr_statistics": config.get("magr_statistics", "hessian"),
    "shrink": {2: 0.8, 3: 0.9}.get(bits, 1.0),
  }
  if config.get("shrink", 0.0) > 0:
    options["shrink"] = float(config.shrink)
  if config.method == "magr+gptq":
    sweeps = config.get("cd_sweeps", -1)
    options["cd_sweeps"] = sweeps if sweeps >= 0 else (30 if bits == 2 else 1)
  return options


def recipe_from_config(config) -> qjax.Recipe:
  """The config's explicit recipe, or one rule for every Dense/conv kernel."""
  if config.get("recipe"):
    return qjax.Recipe.from_config(config.recipe)
  if config.method not in METHODS:
    raise ValueError(
      f"unknown method {config.method!r}; choices: {', '.join(METHODS)}"
    )
  if config.method in recipe_lib.FACTORIZED:
    # One scale per CP factor (the authors' grid); no blocks, no RTN rule.
    options = {"rate": float(config.rate)}
    if config.method == "qaf":
      options.update(sweeps=int(config.qaf_sweeps), inner=int(config.qaf_inner))
    return qjax.Recipe(
      (
        qjax.rule(
          config.get("factor_pattern", "kernel"),
          config.format,
          method=config.method,
          **options,
        ),
      )
    )
  options = {}
  if config.clip_ratios:
    options["clip_ratios"] = tuple(config.clip_ratios)
  if "gptq" in config.method:
    options["act_order"] = bool(config.get("act_order", False))
  if config.method == "ed":
    options["adjust"] = config.get("adjust", "lstsq")
  if config.method == "gpfq":
    options["scales"] = config.get("gpfq_scales", "weights")
  if config.method.endswith("pipe"):
    options["pipe_order"] = int(config.order)
    options["pipe_keep"] = float(config.keep)
  if config.method.startswith("magr+"):
    options.update(magr_options(config))
    if config.method.endswith("pipe"):
      options.pop("shrink")  # the expansion's orders refine a full grid
  axis = config.get("block_axis", -2)
  # Layers a calibrated method cannot see (a CNN's 3x3 and depthwise convs)
  # take RTN on the same grid, ahead of the main rule. Their input axis (3
  # or 1 channels) holds no 32-element block: with a block format they take
  # its elements with one float32 scale per output channel, for every
  # method (RTN too, so the comparison stays fair).
  data_free = config.get("rtn_pattern", "")
  clip = (
    {"clip_ratios": options["clip_ratios"]} if "clip_ratios" in options else {}
  )
  if formats.is_block_format(config.format):
    element, scaling = formats.block_format(config.format, axis)
    if config.get("ragged", False):
      # A channel count that is no multiple of the block (MobileNetV2's 16
      # and 24) ends in a short block, as the MX spec's zero padding would.
      scaling = formats.Scaling(**{**scaling.to_dict(), "ragged": True})
    rule = qjax.rule(
      "kernel", element, scaling, method=config.method, **options
    )
    first = (
      (qjax.rule(data_free, element, formats.per_channel(-1), **clip),)
      if data_free
      else ()
    )
    return qjax.Recipe((*first, rule))
  if config.method == "rtn":
    data_free = ""
  if config.block:
    scaling = formats.per_block(
      config.block,
      axis=axis,
      scale_format=config.scale_format,
      ragged=config.ragged,
    )
  else:
    scaling = formats.per_channel(-1, scale_format=config.scale_format)
  if config.format.startswith("uint"):
    scaling = formats.Scaling(**{**scaling.to_dict(), "zero_point": True})
  rule = qjax.rule(
    "kernel", config.format, scaling, method=config.method, **options
  )
  first = (
    (qjax.rule(data_free, config.format, scaling, **clip),) if data_free else ()
  )
  return qjax.Recipe((*first, rule))


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


def run(config, workdir) -> dict:
  """Quantizes config.model with the config's recipe; returns the metrics."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  task = tasks.get(config.model)
  recipe = recipe_from_config(config)
  params = task.load(config)
  reference, float_scores = _float_scores(task, params, config)
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
    # ED/GPFQ rules take the two-stream driver, the others GPTQ's
    # sequential mode (qjax.quantize dispatches).
    qparams = qjax.quantize(params, recipe, calib=calib, progress=True)
  else:
    qparams = qjax.quantize(params, recipe, progress=True)
  seconds = time.perf_counter() - start
  q_scores = task.score(qjax.dequantize(qparams), config, reference)
  layer_stats = {
    p: s for p, s in qjax.stats(qparams, params).items() if s["quantized"]
  }
  metrics = {
    "name": config.name,
    "model": config.model,
    "method": config.method,
    "format": config.format,
    "recipe": repr(recipe),
    "float": float_scores,
    "quantized": q_scores,
    "quality_metric": task.quality,
    "bits_per_weight": qeval.quantized_bits_per_weight(qparams),
    "float_bytes": qeval.model_bytes(params),
    "quantized_bytes": qeval.model_bytes(qparams),
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
