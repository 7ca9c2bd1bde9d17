"""Convert a float checkpoint into a quantized qjax checkpoint, streamed
leaf by leaf and sharded over every device of every process.

One process (all local devices):
  python -m experiments.convert_checkpoint \
    --config=configs/convert.py:source=smollm2 --output=/tmp/smollm2_mxfp4

Several processes (here: 2 x 4 simulated CPU devices, as on CI; on a pod
each host runs the same command with --distributed, see
scripts/convert_on_pod.sh):
  for i in 0 1; do python -m experiments.convert_checkpoint \
    --config=configs/convert.py:source=minilm --output=/tmp/minilm_mxfp4 \
    --coordinator_address=localhost:12355 --num_processes=2 \
    --process_id=$i --local_devices=4 & done; wait

The inverse, a float orbax checkpoint for tools that cannot read qjax:
  python -m experiments.convert_checkpoint --dequantize \
    --input=/tmp/smollm2_mxfp4 --output=/tmp/smollm2_float

Prints the totals and the lowest-SQNR layers; the per-leaf summary is
written to <output>.summary.json (process 0). A calibrated conversion with
--config.resume=True records its finished blocks in <output>.resume and,
killed and started again, goes on after the last one (deleted at the end).
"""

import json
import pathlib
import shutil

from absl import app, flags
from ml_collections import config_flags

if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/convert.py")
  _OUTPUT = flags.DEFINE_string("output", None, "output directory")
  _INPUT = flags.DEFINE_string("input", None, "--dequantize: qjax checkpoint")
  _DEQUANTIZE = flags.DEFINE_bool(
    "dequantize", False, "write the float tree of --input to --output"
  )
  _DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "jax.distributed.initialize() with the cluster's auto-detection (pods)",
  )
  _COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (explicit cluster)"
  )
  _NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "processes")
  _PROCESS_ID = flags.DEFINE_integer("process_id", 0, "this process")
  _LOCAL_DEVICES = flags.DEFINE_integer(
    "local_devices", 0, "simulated CPU devices per process (0: default)"
  )


def initialize(
  *,
  distributed=False,
  coordinator=None,
  num_processes=1,
  process_id=0,
  local_devices=0,
):
  """Sets up devices and jax.distributed before any computation."""
  import jax

  if local_devices:
    jax.config.update("jax_num_cpu_devices", local_devices)
  if coordinator:
    # CPU processes exchange shards through gloo (TPU/GPU use their own).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      coordinator_address=coordinator,
      num_processes=num_processes,
      process_id=process_id,
    )
  elif distributed:
    jax.distributed.initialize()


def source_path(source: str) -> str:
  from qjax.models import minilm, smollm2

  known = {"minilm": minilm.safetensors_path, "smollm2": smollm2.gguf_path}
  return str(known[source]()) if source in known else source


def run(config, output: str) -> dict:
  """Converts config.source with the config's recipe into `output`.

  Calibrated recipes (gptq, magr+*) need a model qjax knows (the source
  minilm or smollm2, or layout=minilm/smollm2): its calibration text and
  block structure come from experiments.tasks.
  """
  from experiments import run_lib, tasks
  from qjax.io import convert, resume, sources

  recipe = run_lib.recipe_from_config(config)
  source = sources.open_source(source_path(config.source), config.layout)
  part = config.part_kb * 1024 if config.part_kb else None
  allow = bool(config.allow_unquantized)
  import jax

  if jax.process_index() == 0:
    print(convert.plan_report(source, recipe), flush=True)
  if not recipe.needs_calibration:
    return convert.convert(
      source, recipe, output, max_part_bytes=part, allow_unquantized=allow
    )
  model = next(
    (m for m in ("minilm", "smollm2") if m in (config.source, config.layout)),
    None,
  )
  if model is None:
    raise ValueError(
      f"method {config.method!r} needs calibration data; set source or "
      "layout to minilm or smollm2"
    )
  task = tasks.get(model)
  params = convert.LazyParams(source)
  # config.resume: the finished blocks are recorded beside the output, so
  # a killed conversion started again goes on after the last one.
  log = None
  if config.get("resume"):
    out = pathlib.Path(output)
    log = resume.BlockLog(out.with_name(out.name + ".resume"))
  summary = convert.convert_calibrated(
    source,
    recipe,
    output,
    task.block_model(params),
    task.calibration_batches(config),
    max_part_bytes=part,
    allow_unquantized=allow,
    resume=log,
  )
  if log is not None:  # the checkpoint is complete
    shutil.rmtree(log.path, ignore_errors=True)
  return summary


def report(summary: dict) -> str:
  mib = 1 << 20
  lines = [
    f"float bytes      {summary['float_bytes']:,}",
    f"quantized bytes  {summary['bytes']:,} "
    f"({summary['bytes'] / summary['float_bytes']:.3f}x)",
    f"quantized leaves {summary['quantized_leaves']}, "
    f"{summary['bits_per_quantized_weight'] or 0:.3f} bits per weight",
    f"largest leaf     {summary['largest_leaf_bytes'] / mib:.1f} MiB; "
    f"peak RSS {summary['peak_rss_bytes'] / mib:.0f} MiB",
    "lowest SQNR (dB):",
  ]
  worst = sorted(
    (r["sqnr_db"], p) for p, r in summary["leaves"].items() if "sqnr_db" in r
  )[:5]
  lines += [f"  {db:6.2f}  {p}" for db, p in worst]
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _OUTPUT.value:
    raise app.UsageError("--output is required")
  initialize(
    distributed=_DISTRIBUTED.value,
    coordinator=_COORDINATOR.value,
    num_processes=_NUM_PROCESSES.value,
    process_id=_PROCESS_ID.value,
    local_devices=_LOCAL_DEVICES.value,
  )
  import jax

  if _DEQUANTIZE.value:
    from qjax.io import convert

    if not _INPUT.value:
      raise app.UsageError("--dequantize needs --input")
    written = convert.dequantize_checkpoint(_INPUT.value, _OUTPUT.value)
    if jax.process_index() == 0:
      print(f"wrote {len(written)} float leaves to {_OUTPUT.value}")
    return
  summary = run(_CONFIG.value, _OUTPUT.value)
  if jax.process_index() == 0:
    out = pathlib.Path(_OUTPUT.value)
    summary_file = out.with_name(out.name + ".summary.json")
    summary_file.write_text(json.dumps(summary, indent=1))
    print(report(summary))
    print(f"wrote {out} and {summary_file}")


if __name__ == "__main__":
  app.run(main)
