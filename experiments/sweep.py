"""Run several configs and print one comparison table (and plot).

  python -m experiments.sweep --workdir=workdir/sweep
  python -m experiments.sweep --configs=configs/minilm.py:bits=8,\
configs/minilm.py:bits=4 --workdir=workdir/sweep_minilm

Each entry of --configs is `file` or `file:arg`; separate entries with
commas when no arg has commas, otherwise repeat --configs. Runs go to
workdir/<name>/; the table, results.csv and quality_vs_bits.png go to workdir.
"""

import importlib.util
import pathlib

import jax
from absl import app, flags

from experiments import run_lib

DEFAULT_SWEEP = [
  f"configs/{model}.py:method=rtn,zero_point=false,bits={bits}"
  for model in ("smollm2", "minilm")
  for bits in (8, 4, 3)
]
_CONFIGS = flags.DEFINE_multi_string(
  "configs", DEFAULT_SWEEP, "config files with optional ':arg'"
)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/sweep", "output folder")
_CHECKPOINTS = flags.DEFINE_bool(
  "checkpoints", False, "save each run's quantized checkpoint"
)


def load_config(entry: str):
  """'configs/smollm2.py:bits=3' -> the ConfigDict get_config('bits=3')."""
  from experiments import cli

  path, _, arg = cli.resolve_config(entry).partition(":")
  if not pathlib.Path(path).exists():
    raise ValueError(
      f"config file {path!r} does not exist (packaged configs: "
      f"{', '.join(cli.packaged_configs())})"
    )
  spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def _split(entries):
  out = []
  for e in entries:
    # "a.py:bits=8,b.py:bits=4" -> two entries; "a.py:bits=8,block=64" -> one
    parts, current = [], ""
    for piece in e.split(","):
      if piece.endswith(".py") or ".py:" in piece:
        if current:
          parts.append(current)
        current = piece
      else:
        current += "," + piece
    parts.append(current)
    out += parts
  return out


def sweep(entries, workdir, checkpoints=False) -> list[dict]:
  workdir = pathlib.Path(workdir)
  results = []
  for entry in entries:
    config = load_config(entry)
    config.save_checkpoint = checkpoints
    name = run_lib.run_name(config)
    print(f"== {entry} -> {name}", flush=True)
    metrics = run_lib.run(config, workdir / name)
    run_lib._append_csv(
      workdir / "results.csv", metrics, run_lib.tasks.get(config.model)
    )
    results.append(metrics)
    # Each run's executables stay mapped until released; hundreds of runs
    # would reach the kernel's cap on memory maps (tests/conftest.py).
    jax.clear_caches()
  run_lib.plot_results(workdir / "results.csv", workdir / "quality_vs_bits.png")
  return results


def table(results) -> str:
  lines = [
    "| run | metric | float | quantized | bits/weight | model bytes |",
    "|---|---|---|---|---|---|",
  ]
  for m in results:
    q = m["quality_metric"]
    lines.append(
      f"| {m['name']} | {q} | {m['float'][q]:.4f} | {m['quantized'][q]:.4f} "
      f"| {m['bits_per_weight']:.3f} | {m['quantized_bytes']:,} |"
    )
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  results = sweep(_split(_CONFIGS.value), _WORKDIR.value, _CHECKPOINTS.value)
  print(table(results))
  print(f"\nwrote {_WORKDIR.value}/results.csv and quality_vs_bits.png")


if __name__ == "__main__":
  app.run(main)
