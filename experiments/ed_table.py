"""Error Diffusion comparison table (methods x block formats) from sweeps.

  python -m experiments.ed_table --csv=/tmp/runs/ed_minilm/results.csv \
      --plot=docs/ed_minilm.png

Rows: rtn, gptq, ed (lstsq), ed_rescale, ed_bias, gpfq; columns: the block
formats present. Cells: the quantized score (cosine or perplexity).
"""

import csv
import math

from absl import app, flags

ROWS = ("rtn", "gptq", "ed", "ed_rescale", "ed_bias", "gpfq")
ADJUSTS = ("rescale", "bias")


def row_label(r: dict) -> str:
  for adjust in ADJUSTS:
    if r["method"] == "ed" and r["name"].endswith(f"_{adjust}"):
      return f"ed_{adjust}"
  return r["method"]


def table(rows: list[dict]) -> tuple[str, dict]:
  formats = list(dict.fromkeys(r["format"] for r in rows))
  digits = ".5f" if rows and rows[0].get("quality") == "cosine_mean" else ".4g"
  cells = {
    (row_label(r), r["format"]): float(r["quantized_quality"]) for r in rows
  }
  bits = {r["format"]: float(r["bits_per_weight"]) for r in rows}
  lines = [
    "| method | " + " | ".join(formats) + " |",
    "|---|" + "---|" * len(formats),
  ]
  for label in ROWS:
    if not any((label, f) in cells for f in formats):
      continue
    values = [cells.get((label, f)) for f in formats]
    lines.append(
      f"| {label} | "
      + " | ".join("not run" if v is None else f"{v:{digits}}" for v in values)
      + " |"
    )
  lines.append(
    "| bits/weight | " + " | ".join(f"{bits[f]:.3f}" for f in formats) + " |"
  )
  return "\n".join(lines), cells


def plot(cells: dict, metric: str, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

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
        ys.append(1 - v if metric == "cosine_mean" else math.log10(v))
    ax.bar(xs, ys, width, label=label)
  ax.set_xticks([j + 0.4 - width / 2 for j in range(len(formats))], formats)
  ax.set_ylabel(
    "1 - cosine to float (lower is better)"
    if metric == "cosine_mean"
    else "log10 perplexity (lower is better)"
  )
  if metric == "cosine_mean":
    ax.set_yscale("log")
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
  text, cells = table(rows)
  print(text)
  if FLAGS.plot:
    plot(cells, rows[0]["quality"], FLAGS.plot)


if __name__ == "__main__":
  flags.DEFINE_multi_string("csv", [], "results.csv files of sweeps")
  flags.DEFINE_string("plot", "", "write a PNG here")
  FLAGS = flags.FLAGS
  app.run(main)
