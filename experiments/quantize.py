"""Quantize a real model with a config-driven recipe; report quality, size.

  python -m experiments.quantize --config=configs/smollm2.py \
    --workdir=workdir/smollm2
  python -m experiments.quantize --config=configs/minilm.py:format=mxfp4 \
    --config.eval.sentences=32 --workdir=workdir/minilm
"""

import pathlib

from absl import app, flags
from ml_collections import config_flags

from experiments import run_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/smollm2.py")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/main", "output folder")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  metrics = run_lib.run(_CONFIG.value, _WORKDIR.value)
  print(run_lib.summary_table(metrics))
  saved = (pathlib.Path(_WORKDIR.value) / "checkpoint").exists()
  print(
    f"\nwrote {_WORKDIR.value}/metrics.json, results.csv, "
    "quality_vs_bits.png" + (", checkpoint/" if saved else "")
  )


if __name__ == "__main__":
  app.run(main)
