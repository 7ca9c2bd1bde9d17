"""Error Diffusion comparison table (methods x block formats) from sweeps.

  python -m experiments.ed_table --csv=/tmp/runs/ed_minilm/results.csv \
      --plot=docs/ed_minilm.png

Rows: rtn, gptq, ed (lstsq), ed_rescale, ed_bias, gpfq, gpfq_feedback
(scales from the fed-back values); columns: the block
formats present. Cells: the quantized score (cosine, perplexity, or top-1
agreement / KL to float when the runs' metrics.json hold a KL).
"""

import csv
import json
import pathlib

from absl import app, flags

ROWS = ("rtn", "gptq", "ed", "ed_rescale", "ed_bias", "gpfq", "gpfq_feedback")
ADJUSTS = ("rescale", "bias")


def row_label(r: dict) -> str:
  for adjust in ADJUSTS:
    if r["method"] == "ed" and r["name"].endswith(f"_{adjust}"):
      return f"ed_{adjust}"
  if r["method"] == "gpfq" and r["name"].endswith("_feedback"):
    return "gpfq_feedback"
  return r["method"]


def table(rows: list[dict], kl: dict | None = None) -> tuple[str, dict]:
  """Markdown table and {(row label, format): score}. With `kl` ({run name:
  KL to float}), cells read 'score / KL' (MobileNetV2)."""
  formats = list(dict.fromkeys(r["format"] for r in rows))
  quality = rows[0].get("quality") if rows else None
  digits = {"cosine_mean": ".5f", "top1_agreement": ".2f"}.get(quality, ".4g")
  cells = {
    (row_label(r), r["format"]): float(r["quantized_quality"]) for r in rows
  }
  kls = {
    (row_label(r), r["format"]): kl[r["name"]]
    for r in rows
    if kl and r["name"] in kl
  }
  bits = {r["format"]: float(r["bits_per_weight"]) for r in rows}
  lines = [
    "| method | " + " | ".join(formats) + " |",
    "|---|" + "---|" * len(formats),
  ]
  for label in ROWS:
    if not any((label, f) in cells for f in formats):
      continue
    values = []
    for f in formats:
      v = cells.get((label, f))
      text = "not run" if v is None else f"{v:{digits}}"
      if (label, f) in kls:
        text += f" / {kls[label, f]:.3g}"
      values.append(text)
    lines.append(f"| {label} | " + " | ".join(values) + " |")
  lines.append(
    "| bits/weight | " + " | ".join(f"{bits[f]:.3f}" for f in formats) + " |"
  )
  return "\n".join(lines), cells


def plot(
  cells: dict, metric: str, path: str, reference: float | None = None
) -> None:
  """Grouped bars per format on a log axis; `reference` (the float model's
  perplexity) is drawn as a dashed line."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib import ticker

  formats = list(dict.fromkeys(f for _, f in cells))
  labels = [r for r in ROWS if any((r, f) in cells for f in formats)]
  fig, ax = plt.subplots(figsize=(8, 4))
  width = 0.8 / len(labels)
  for i, label in enumerate(labels):
    xs, ys = [], []
    for j, f in enumerate(formats):
      if (label, f) in cells:
        xs.append(j + i * width)
        v = cells[label, f]
        ys.append(1 - v if metric == "cosine_mean" else v)
    ax.bar(xs, ys, width, label=label)
  ax.set_xticks([j + 0.4 - width / 2 for j in range(len(formats))], formats)
  ax.set_ylabel(
    {
      "cosine_mean": "1 - cosine to float (lower is better)",
      "kl": "KL to float on the photos (lower is better)",
    }.get(metric, "perplexity (lower is better)")
  )
  ax.set_yscale("log")
  if metric == "perplexity":  # spans 6..15, where 10^1 labels say little
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))
  if reference is not None:
    ax.axhline(reference, color="black", linestyle="--", label="float")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


FLAGS = None


def main(argv):
  del argv
  rows = []
  for path in FLAGS.csv:
    with open(path) as f:
      rows += list(csv.DictReader(f))
  kl = {}
  for path in FLAGS.csv:  # each run's metrics.json sits next to the CSV
    for r in rows:
      m = pathlib.Path(path).parent / r["name"] / "metrics.json"
      if m.exists():
        value = json.loads(m.read_text())["quantized"].get("kl")
        if value is not None:
          kl[r["name"]] = value
  text, cells = table(rows, kl)
  print(text)
  if FLAGS.plot:
    if kl:  # agreement on 20 crops is coarse; plot the KL
      cells = {
        (row_label(r), r["format"]): kl[r["name"]]
        for r in rows
        if r["name"] in kl
      }
      plot(cells, "kl", FLAGS.plot)
    else:
      metric = rows[0]["quality"]
      reference = (
        float(rows[0]["float_quality"]) if metric == "perplexity" else None
      )
      plot(cells, metric, FLAGS.plot, reference)


if __name__ == "__main__":
  flags.DEFINE_multi_string("csv", [], "results.csv files of sweeps")
  flags.DEFINE_string("plot", "", "write a PNG here")
  FLAGS = flags.FLAGS
  app.run(main)
