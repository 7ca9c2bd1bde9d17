"""QAF on whole models: factorized layers, BatchNorm recalibration, and the
baselines at equal bytes, in one run.

  python -m experiments.qaf_models --models=fmnist_cnn,mobilenet_v2 \
    --rates=2,4 --bits=4,8 --csv=docs/results/qaf_models.csv \
    --plot=docs/qaf_models.png

For each model, compression rate and factor bit width it scores:
  cp    float CP-ALS factors (the start QAF and factorize-then-quantize share)
  ftq   factorize-then-quantize: that start, each factor rounded once
  qaf   QAF (qjax.transforms.factorize.cp_quantized)
  rtn   no factorization: the same layers rounded per output channel to
        int(bits / rate) bits, the factorized layers' bytes (int2 when that
        is 1 bit: qjax has no 1-bit format, so that RTN cell stores 2x)
Layers: the Fashion-MNIST CNN's conv2 and dense1 (conv1 and the 10-way
classifier stay float, as the authors keep ResNet's stem and fc);
MobileNetV2's stem 3x3 conv and every pointwise conv (expand, project,
head). Depthwise convs (grouped; QAF's mapping is for ungrouped convs) and
the classifier stay float. With --act (e.g. int8: the paper's A8) each arm's
tree is also scored with every layer input fake-quantized (arm 'qaf@aint8';
per token, dynamic scales; the values between a factorized layer's factors
stay float). MobileNetV2's BatchNorm
statistics are
recalibrated on `--calib_images` crops of photos the evaluation never sees;
every MobileNetV2 arm is scored without (`arm`) and with (`arm+bn`) it.
"""

import csv
import time
from contextlib import nullcontext

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import qjax
from qjax import activations
from qjax import metrics as qmetrics
from qjax.formats.scaling import per_channel
from qjax.linen import factorized as cp_layers
from qjax.models import fmnist_cnn, mobilenet_v2

if __name__ == "__main__":
  flags.DEFINE_string("models", "fmnist_cnn,mobilenet_v2", "models")
  flags.DEFINE_string("rates", "2,4", "compression rates")
  flags.DEFINE_string("bits", "4,8", "bit widths of the factors (intN)")
  flags.DEFINE_integer("sweeps", 20, "QAF ALS sweeps cap")
  flags.DEFINE_integer("inner", 60, "QAF ADMM steps cap per factor step")
  flags.DEFINE_integer("calib_images", 64, "BatchNorm recalibration images")
  flags.DEFINE_integer("crops_per_photo", 4, "MobileNetV2 evaluation crops")
  flags.DEFINE_string("arms", "cp,ftq,qaf,rtn", "arms to score")
  flags.DEFINE_string(
    "pattern", "", "override the factorized layers' regex (one model)"
  )
  flags.DEFINE_string(
    "label", "", "names the layer set in the rows (e.g. 'head' with --pattern)"
  )
  flags.DEFINE_boolean(
    "bn_columns", True, "tables show the recalibrated (+bn) arms too"
  )
  flags.DEFINE_string("csv", "", "write the rows here")
  flags.DEFINE_string(
    "from_csv", "", "only print the table (and plot) of these CSVs (,-joined)"
  )
  flags.DEFINE_string("plot", "", "write a PNG here")
  flags.DEFINE_string(
    "act",
    "",
    "quantize every layer input too: an element format (per-token dynamic "
    "scales, e.g. int8 for the paper's A8); '' keeps activations float",
  )

PATTERNS = {
  "fmnist_cnn": r"^(conv2|dense1)/kernel$",
  "mobilenet_v2": r"(stem|expand|project|head)/conv/kernel$",
}


def _act_recipe(fmt):
  """Every layer input at `fmt`, per token (pixel) with dynamic scales."""
  if not fmt:
    return None
  return activations.recipe(activations.act_rule("", fmt, "token"))


def _forward(model, recipe):
  """A jitted forward with `recipe`'s activation rules (traced inside)."""

  def run(variables, x):
    rules = activations.quantized_inputs(recipe) if recipe else nullcontext()
    with rules:
      return cp_layers.apply(model, variables, x)

  return jax.jit(run)


class FashionMnist:
  quality = "accuracy"

  def __init__(self, calib_images, crops_per_photo, act=""):
    del calib_images, crops_per_photo
    self.params = fmnist_cnn.load_params()
    self.x, self.y = fmnist_cnn.load_split("test")
    model = fmnist_cnn.CNN()
    self._float = _forward(model, None)
    self.act = act
    self._run = _forward(model, _act_recipe(act))
    self.ref = np.asarray(
      self._float({"params": self.params}, jnp.asarray(self.x))
    )

  def score(self, params, recalibrate=True, act=False):
    del recalibrate  # no BatchNorm in this CNN
    run = self._run if act else self._float
    out = np.asarray(run({"params": params}, jnp.asarray(self.x)))
    return {
      "accuracy": qmetrics.accuracy(out, self.y),
      "kl": qmetrics.kl_divergence(self.ref, out),
    }


class MobileNet:
  quality = "top1_agreement"

  def __init__(self, calib_images, crops_per_photo, act=""):
    variables = mobilenet_v2.load_variables()
    self.params, self.stats = variables["params"], variables["batch_stats"]
    self.images = jnp.asarray(mobilenet_v2.photos(crops_per_photo))
    self.calib = jnp.asarray(mobilenet_v2.calibration_images(calib_images))
    self.model = mobilenet_v2.MobileNetV2()
    self.act = act
    self._act_forward = _forward(self.model, _act_recipe(act))
    self._forward = _forward(self.model, None)
    self._recal = jax.jit(
      lambda v, x: cp_layers.recalibrate_batchnorm(self.model, v, x)
    )
    self.ref = np.asarray(self._forward(self._vars(self.params), self.images))

  def _vars(self, params, stats=None):
    return {
      "params": params,
      "batch_stats": self.stats if stats is None else stats,
    }

  def score(self, params, recalibrate=True, act=False):
    stats = self._recal(self._vars(params), self.calib) if recalibrate else None
    run = self._act_forward if act else self._forward
    out = np.asarray(run(self._vars(params, stats), self.images))
    return {
      "top1_agreement": qmetrics.top1_agreement(self.ref, out),
      "kl": qmetrics.kl_divergence(self.ref, out),
    }


MODELS = {"fmnist_cnn": FashionMnist, "mobilenet_v2": MobileNet}


def layer_bytes(tree, pattern) -> int:
  """Bytes of the leaves `pattern` selects (CPKernels, QTensors or float)."""
  import re

  stats = qjax.stats(tree)
  return sum(e["bytes"] for p, e in stats.items() if re.search(pattern, p))


def rtn_tree(params, pattern, bits):
  recipe = qjax.Recipe(
    [qjax.rule(pattern, f"int{max(bits, 2)}", per_channel(-1))]
  )
  return qjax.quantize(params, recipe, progress=False)


def run_one(task, name, rate, bits, sweeps, inner, arms, pattern, label=""):
  """Rows for one (model, rate, bits): every arm's quality and bytes."""
  rows = []
  float_bytes = layer_bytes(task.params, pattern)

  def row(arm, tree, seconds, error=None):
    # With --act, the same tree is scored with float and quantized
    # activations (QAF's factors differ run to run in float32).
    for act in (False, True) if task.act else (False,):
      name = f"{arm}@a{task.act}" if act else arm
      if isinstance(task, MobileNet):
        rows_for(name, tree, seconds, error, recalibrate=False, act=act)
      bn = "+bn" if isinstance(task, MobileNet) else ""
      rows_for(name + bn, tree, seconds, error, recalibrate=True, act=act)

  def rows_for(arm, tree, seconds, error, recalibrate, act):
    metrics = task.score(tree, recalibrate=recalibrate, act=act)
    nbytes = layer_bytes(tree, pattern)
    rows.append(
      {
        "model": f"{name} ({label})" if label else name,
        "rate": rate,
        "bits": bits,
        "arm": arm,
        "layer_bytes": nbytes,
        "float_layer_bytes": float_bytes,
        "mean_rel_error": "" if error is None else f"{error:.4f}",
        "quality": task.quality,
        **{k: f"{v:.5g}" for k, v in metrics.items()},
        "seconds": f"{seconds:.0f}",
      }
    )
    print(rows[-1], flush=True)

  for method in [a for a in ("cp", "ftq", "qaf") if a in arms]:
    start = time.perf_counter()
    kw = {"sweeps": sweeps, "inner": inner} if method == "qaf" else {}
    tree, report = cp_layers.factorize(
      task.params,
      pattern,
      rate=rate,
      fmt=None if method == "cp" else f"int{bits}",
      method=method,
      **kw,
    )
    seconds = time.perf_counter() - start
    error = float(np.mean([r["error"] for r in report.values()]))
    row(method, tree, seconds, error)
    if method == "qaf":
      hit = sum(r["sweep_cap_hit"] for r in report.values())
      print(f"QAF: {hit}/{len(report)} layers hit the sweep cap {sweeps}")
  if "rtn" not in arms:
    return rows
  start = time.perf_counter()
  rtn_bits = int(bits / rate)
  tree = rtn_tree(task.params, pattern, rtn_bits)
  row(f"rtn_int{max(rtn_bits, 2)}", tree, time.perf_counter() - start)
  return rows


def plot(rows, path):
  """Quality against stored bits per original weight of the factorized
  layers, one panel per model: accuracy for Fashion-MNIST, KL to float (log
  scale; 20-crop agreement is too coarse) for MobileNetV2. Arms without
  BatchNorm recalibration."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  models = list(dict.fromkeys(r["model"] for r in rows))
  fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.8))
  axes = np.atleast_1d(axes)
  for ax, model in zip(axes, models, strict=True):
    mine = [r for r in rows if r["model"] == model and "+bn" not in r["arm"]]
    metric = "accuracy" if mine[0]["quality"] == "accuracy" else "kl"
    series = [("cp", None, "o-"), ("rtn", None, "o-")] + [
      (c, b, style)
      for c in ("ftq", "qaf")
      for b, style in ((4, "s-"), (8, "^--"))
    ]
    for column, bits, style in series:
      pts = sorted(
        {
          (32 * r["layer_bytes"] / r["float_layer_bytes"], float(r[metric]))
          for r in mine
          if _column(r["arm"]) == column
          and (bits is None or int(r["bits"]) == bits)
        }
      )
      if pts:
        label = column if bits is None else f"{column}, int{bits} factors"
        ax.plot(*zip(*pts, strict=True), style, label=label)
    if metric == "kl":
      ax.set_yscale("log")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("stored bits per original weight (factorized layers)")
    ax.set_ylabel(metric + (" to float" if metric == "kl" else ""))
    ax.set_title(model)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  del argv
  f = flags.FLAGS
  if f.from_csv:
    rows = []
    for path in f.from_csv.split(","):
      with open(path, newline="") as fh:
        rows += list(csv.DictReader(fh))
    for r in rows:
      r["rate"] = float(r["rate"])
      r["layer_bytes"] = int(r["layer_bytes"])
      r["float_layer_bytes"] = int(r["float_layer_bytes"])
    shown = [r for r in rows if f.bn_columns or "+bn" not in r["arm"]]
    print(table(shown))
    if f.plot:
      plot(rows, f.plot)
    return
  rows = []
  for name in f.models.split(","):
    task = MODELS[name](f.calib_images, f.crops_per_photo, f.act)
    base = task.score(task.params, recalibrate=False)
    print(f"{name} float: {base}")
    for rate in (float(r) for r in f.rates.split(",")):
      for bits in (int(b) for b in f.bits.split(",")):
        rows += run_one(
          task,
          name,
          rate,
          bits,
          f.sweeps,
          f.inner,
          f.arms.split(","),
          f.pattern or PATTERNS[name],
          f.label,
        )
        if f.csv:
          with open(f.csv, "w", newline="") as fh:
            w = csv.DictWriter(
              fh, fieldnames=list(rows[0]), extrasaction="ignore"
            )
            w.writeheader()
            w.writerows(rows)
  print(table(rows))
  if f.plot:
    plot(rows, f.plot)


def _parts(arm: str) -> tuple[str, str, bool]:
  """'rtn_int2@aint8+bn' -> ('rtn_int2', '@aint8', True)."""
  bn = arm.endswith("+bn")
  method, at, act = arm.removesuffix("+bn").partition("@")
  return method, at + act, bn


def _column(arm: str) -> str:
  """'rtn_int2@aint8+bn' -> 'rtn@aint8+bn': one RTN column whatever its
  bit width."""
  method, act, bn = _parts(arm)
  if method.startswith("rtn"):
    method = "rtn"
  return method + act + ("+bn" if bn else "")


def table(rows) -> str:
  """One line per (model, rate, bits), one column per arm: quality / KL
  (RTN's cells name its format), and the bytes of the factorized layers
  under QAF and under RTN."""
  order = ["cp", "ftq", "qaf", "rtn"]
  columns = sorted(
    {_column(r["arm"]) for r in rows},
    key=lambda c: (_parts(c)[2], _parts(c)[1], order.index(_parts(c)[0])),
  )
  lines = [
    f"| model | rate | bits | {' | '.join(columns)} | QAF bytes | RTN bytes |",
    "|---|---|---|" + "---|" * (len(columns) + 2),
  ]
  groups = {}
  for r in rows:
    key = (r["model"], r["rate"], int(r["bits"]))
    groups.setdefault(key, {})[_column(r["arm"])] = r
  for (model, rate, bits), by_column in groups.items():
    cells = []
    for c in columns:
      r = by_column.get(c)
      if r is None:
        cells.append("—")
        continue
      cell = f"{float(r[r['quality']]):.4g} / {float(r['kl']):.3g}"
      if c.startswith("rtn"):
        cell += f" ({_parts(r['arm'])[0][4:]})"
      cells.append(cell)
    qaf, rtn = by_column.get("qaf"), by_column.get("rtn")
    lines.append(
      f"| {model} | {rate:g} | {bits} | {' | '.join(cells)} | "
      f"{int(qaf['layer_bytes']):,} | {int(rtn['layer_bytes']):,} |"
      if qaf and rtn
      else f"| {model} | {rate:g} | {bits} | {' | '.join(cells)} | — | — |"
    )
  return "\n".join(lines)


if __name__ == "__main__":
  app.run(main)
