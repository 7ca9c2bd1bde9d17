"""The methods x bits table (and plot) from sweep results.csv files.

  python -m experiments.method_table --csv=workdir/table_smollm2/results.csv \
    --plot=docs/methods_smollm2.png

Rows: rtn, gptq, magr+rtn, magr+gptq; columns: each bit width, per group
(g128) and per channel. Runs that are missing print as "not run".
"""

import csv
import re

from absl import app, flags

_CSV = flags.DEFINE_multi_string("csv", [], "results.csv files of sweeps")
_PLOT = flags.DEFINE_string("plot", "", "write a PNG here")

METHODS = ("rtn", "gptq", "magr+rtn", "magr+gptq")
_NAME = re.compile(r"^(\w+?)_(rtn|gptq|magr\+rtn|magr\+gptq)_uint(\d)(_g\d+)?$")


def read(paths):
  """{(method, bits, group or 0): (quality, bits_per_weight, model, what)}."""
  cells = {}
  for path in paths:
    with open(path) as f:
      for row in csv.DictReader(f):
        m = _NAME.match(row["name"])
        if not m:
          continue  # a variant (e.g. last-sample MagR) reported separately
        models = {v[2] for v in cells.values()} | {row["model"]}
        if len(models) > 1:
          raise ValueError(f"one model per table; got {sorted(models)}")
        group = int(m.group(4)[2:]) if m.group(4) else 0
        cells[(m.group(2), int(m.group(3)), group)] = (
          float(row["quantized_quality"]),
          float(row["bits_per_weight"]),
          row["model"],
          row["quality"],
          float(row["float_quality"]),
        )
  return cells


def table(cells) -> str:
  columns = sorted({(b, g) for _, b, g in cells}, key=lambda c: (-c[0], -c[1]))
  head = [f"{b}-bit {'g' + str(g) if g else 'per channel'}" for b, g in columns]
  lines = [
    "| method | " + " | ".join(head) + " |",
    "|---" * (len(columns) + 1) + "|",
  ]
  for method in METHODS:
    row = []
    for b, g in columns:
      cell = cells.get((method, b, g))
      row.append("not run" if cell is None else f"{cell[0]:.4g}")
    lines.append(f"| {method} | " + " | ".join(row) + " |")
  bpw = []
  for b, g in columns:
    found = [v[1] for (m, bb, gg), v in cells.items() if (bb, gg) == (b, g)]
    bpw.append(f"{found[0]:.3f}" if found else "")
  lines.append("| bits/weight | " + " | ".join(bpw) + " |")
  return "\n".join(lines)


def plot(cells, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  groups = sorted({g for _, _, g in cells}, reverse=True)
  fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4))
  axes = axes if len(groups) > 1 else [axes]
  any_cell = next(iter(cells.values()))
  model, quality, reference = any_cell[2], any_cell[3], any_cell[4]
  for ax, g in zip(axes, groups, strict=True):
    for method in METHODS:
      pts = sorted(
        (v[1], v[0])
        for (m, _, gg), v in cells.items()
        if m == method and gg == g
      )
      if pts:
        ax.plot(*zip(*pts, strict=True), marker="o", label=method)
    ax.axhline(reference, color="gray", ls="--", label="float")
    ax.set_title(f"{model}: {'g' + str(g) if g else 'per channel'}")
    ax.set_xlabel("bits per weight")
    ax.set_ylabel(quality)
    if quality == "perplexity":
      ax.set_yscale("log")
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def main(argv):
  del argv
  cells = read(_CSV.value)
  if not cells:
    raise app.UsageError("no method rows found in --csv files")
  print(table(cells))
  if _PLOT.value:
    plot(cells, _PLOT.value)
    print(f"wrote {_PLOT.value}")


if __name__ == "__main__":
  app.run(main)
