"""Run a PIPE-expanded MiniLM as a member ensemble on 8 simulated devices.

  python -m experiments.pipe_ensemble \
    --config=configs/minilm.py:method=pipe,bits=4,order=4,keep=0.5,block=0 \
    --groups=0/1/2/3 --workdir=workdir/pipe_ensemble

`--groups` partitions the orders (zero-based) into members: '0/1/2/3' is
four members of one order each, '0,1/2,3' two members of two. Members run
under shard_map on a ('member', 'data') mesh of the 8 CPU devices, combined
per layer (exact) and at the output (PIPE's ensemble, our reading; see
qjax.ensemble). Writes ensemble.json: each result against its single-device
computation, the embedding cosine to the float model, and per-member bytes
and MACs.
"""

import json
import pathlib

import jax
from absl import app, flags
from ml_collections import config_flags


def parse_groups(text: str) -> tuple[tuple[int, ...], ...]:
  """'0,1/2,3' -> ((0, 1), (2, 3))."""
  return tuple(
    tuple(int(k) for k in member.split(",")) for member in text.split("/")
  )


def run(config, groups, workdir) -> dict:
  import numpy as np

  import qjax
  from experiments import run_lib, tasks
  from qjax import metrics as qmetrics
  from qjax.linen import ensemble
  from qjax.models import minilm

  if config.model != "minilm" or not config.method.endswith("pipe"):
    raise ValueError(
      f"pipe_ensemble runs MiniLM with a pipe method; got {config.model!r} "
      f"with {config.method!r}"
    )
  task = tasks.get("minilm")
  params = task.load(config)
  q = qjax.quantize(params, run_lib.recipe_from_config(config))
  ids, mask = task._batch(config.eval.sentences)
  layers = sum(k.startswith("layer_") for k in params)
  model = minilm.MiniLM(minilm.Config(layers=layers))

  def embed(p, ids, mask):
    states = model.apply({"params": p}, ids, mask)
    return minilm.sentence_embedding(states, mask)

  members = ensemble.split_params(q, groups)
  mesh = ensemble.member_mesh(len(groups))
  stacked = ensemble.stack(members)
  modules = ensemble.split_modules(q)
  reference = np.asarray(jax.jit(embed)(params, ids, mask))
  out = {"groups": [list(g) for g in groups], "devices": jax.device_count()}
  for combine in ensemble.COMBINE:
    parallel = np.asarray(
      ensemble.apply(
        embed,
        stacked,
        ids,
        mask,
        mesh=mesh,
        modules=modules,
        combine=combine,
      )
    )
    single = np.asarray(
      ensemble.apply_sequential(embed, members, ids, mask, combine=combine)
    )
    out[combine] = {
      "max_abs_diff_parallel_vs_single": float(np.abs(parallel - single).max()),
      "cosine_to_float": float(
        qmetrics.cosine_similarity(parallel, reference).mean()
      ),
    }
  first = np.asarray(jax.jit(embed)(qjax.dequantize(members[0]), ids, mask))
  out["member0_alone_cosine"] = float(
    qmetrics.cosine_similarity(first, reference).mean()
  )
  out["members"] = []
  for m in members:
    s = [v for v in qjax.stats(m).values() if v["quantized"]]
    out["members"].append(
      {
        "kernel_bytes": sum(v["bytes"] for v in s),
        "macs_per_token": sum(v["macs"] for v in s),
      }
    )
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "ensemble.json").write_text(json.dumps(out, indent=1))
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  jax.config.update("jax_num_cpu_devices", 8)  # before the backend starts
  f = flags.FLAGS
  out = run(f.config, parse_groups(f.groups), f.workdir)
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  # Defined here, not at import: tests import several experiment modules.
  config_flags.DEFINE_config_file(
    "config", None, "a configs/minilm.py config with method=pipe"
  )
  flags.DEFINE_string("groups", "0/1/2/3", "members' orders")
  flags.DEFINE_string("workdir", "workdir/pipe_ensemble", "output folder")
  app.run(main)
