"""PIPE results table and plot from a sweep's run folders.

  python -m experiments.pipe_table --workdir=workdir/pipe_minilm \
    --plot=docs/pipe_minilm.png

Reads <workdir>/*/metrics.json of `pipe` runs (orders 1..4, keep 1 and
< 1) and `rtn` runs (intN per channel) and prints a markdown table: one row
per (term format, keep), one column per order, each cell the quality and
bits per weight; RTN at N bits is the row below. The plot puts both against
bits per weight: for MobileNetV2 the KL to the float model, for MiniLM
1 - embedding cosine (lower is better in both, log scale).
"""

import json
import pathlib
import re

from absl import app, flags

_NAME = re.compile(r"_(pipe|rtn)_int(\d+)(?:_o(\d+))?(?:_k([\d.]+))?$")


def load(workdir) -> list[dict]:
  """One dict per run: method, bits, order, keep, bpw, quality, error."""
  rows = []
  for path in sorted(pathlib.Path(workdir).glob("*/metrics.json")):
    m = json.loads(path.read_text())
    match = _NAME.search(m["name"])
    if not match:
      continue
    method, bits, order, keep = match.groups()
    q = m["quantized"]
    if "kl" in q:
      quality, error = f"{q['top1_agreement']:.2f} / {q['kl']:.3g}", q["kl"]
    else:
      quality, error = f"{q['cosine_mean']:.4f}", 1 - q["cosine_mean"]
    rows.append(
      {
        "model": m["model"],
        "method": method,
        "bits": int(bits),
        "order": int(order or 1),
        "keep": float(keep or 1.0),
        "bpw": m["bits_per_weight"],
        "quality": quality,
        "error": error,
      }
    )
  return rows


def table(rows) -> str:
  pipe = [r for r in rows if r["method"] == "pipe"]
  rtn = sorted(
    (r for r in rows if r["method"] == "rtn"), key=lambda r: r["bits"]
  )
  orders = sorted({r["order"] for r in pipe})
  lines = [
    "| terms | keep | " + " | ".join(f"order {k}" for k in orders) + " |",
    "|---|---|" + "---|" * len(orders),
  ]
  for bits in sorted({r["bits"] for r in pipe}, reverse=True):
    for keep in sorted({r["keep"] for r in pipe}, reverse=True):
      cells = []
      for k in orders:
        hit = [
          r
          for r in pipe
          if r["bits"] == bits
          and r["order"] == k
          and (r["keep"] == keep or k == 1)
        ]
        cells.append(
          f"{hit[0]['quality']} ({hit[0]['bpw']:.2f})" if hit else "not run"
        )
      lines.append(f"| int{bits} | {keep:g} | " + " | ".join(cells) + " |")
  if rtn:
    lines += [
      "",
      "| RTN | " + " | ".join(f"int{r['bits']}" for r in rtn) + " |",
      "|---|" + "---|" * len(rtn),
      "| quality (bits/weight) | "
      + " | ".join(f"{r['quality']} ({r['bpw']:.2f})" for r in rtn)
      + " |",
    ]
  return "\n".join(lines)


def plot(rows, path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  pipe = [r for r in rows if r["method"] == "pipe"]
  for bits in sorted({r["bits"] for r in pipe}, reverse=True):
    for keep in sorted({r["keep"] for r in pipe}, reverse=True):
      pts = sorted(
        (r["bpw"], r["error"])
        for r in pipe
        if r["bits"] == bits and (r["keep"] == keep or r["order"] == 1)
      )
      style = "-" if keep == 1 else "--"
      ax.plot(
        *zip(*pts, strict=True),
        style,
        marker="o",
        label=f"PIPE int{bits} keep {keep:g}",
      )
  rtn = sorted((r["bpw"], r["error"]) for r in rows if r["method"] == "rtn")
  if rtn:
    ax.plot(
      *zip(*rtn, strict=True), ":", marker="s", color="k", label="RTN intN"
    )
  ax.set_yscale("log")
  ax.set_xlabel("bits per weight (codes, scales, indices)")
  model = rows[0]["model"]
  ax.set_ylabel("KL to float" if model == "mobilenet_v2" else "1 - cosine")
  ax.set_title(f"{model}: PIPE orders 1-4 against RTN")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  rows = load(flags.FLAGS.workdir)
  if not rows:
    raise app.UsageError(f"no pipe/rtn runs under {flags.FLAGS.workdir}")
  print(table(rows))
  if flags.FLAGS.plot:
    plot(rows, flags.FLAGS.plot)
    print(f"\nwrote {flags.FLAGS.plot}")


if __name__ == "__main__":
  # Defined here, not at import: tests import several experiment modules.
  flags.DEFINE_string("workdir", None, "a sweep's workdir")
  flags.DEFINE_string("plot", "", "where to write the PNG")
  flags.mark_flag_as_required("workdir")
  app.run(main)
