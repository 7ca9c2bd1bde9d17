"""Gemma 3 270M (a model qjax calibrates with no model-specific code): RTN,
GPTQ and Error Diffusion on KJV perplexity.

  python -m experiments.gemma3_table --out=docs/results/gemma3.json

Blocks and layers are found by qjax.calibration.discover (no BlockModel).
Evaluation: `eval_windows` windows of a BOS plus 511 tokens from the start
of the KJV text; calibration: `calib_windows` such windows from its end.
Grids: one scale per output (q/k/v kernels [640, heads, 256] take one scale
per (head, column), i.e. per_block(640) along their input axis).
"""

import json
import pathlib
import time
import warnings

import jax.numpy as jnp
import numpy as np
from absl import app, flags

import qjax
from qjax import datasets, formats, metrics
from qjax.models import gemma3

_OUT = flags.DEFINE_string("out", "", "where to write the JSON results")
_BITS = flags.DEFINE_list("formats", ["int8", "int4"], "element formats")
_METHODS = flags.DEFINE_list("methods", ["rtn", "gptq", "ed"], "methods")
_EVAL = flags.DEFINE_integer("eval_windows", 8, "evaluation windows")
_CALIB = flags.DEFINE_integer("calib_windows", 8, "calibration windows")


def windows(text: str, count: int, *, from_end: bool = False) -> np.ndarray:
  ids = gemma3.encode(text)
  w = metrics.token_windows(ids, 511, count, from_end=from_end)
  return np.concatenate([np.full((count, 1), gemma3.BOS, np.int32), w], 1)


def recipe(method: str, fmt: str) -> qjax.Recipe:
  per_output = formats.per_block(gemma3.Config().dim, 0)
  return qjax.Recipe(
    (
      qjax.rule(r"attn/(q|k|v)/kernel", fmt, per_output, method=method),
      qjax.rule("kernel", fmt, method=method),
    )
  )


def main(argv):
  del argv
  text = datasets.kjv_text()
  evaluation = windows(text[: 12 * 512 * _EVAL.value], _EVAL.value)
  calib = windows(text[-12 * 512 * _CALIB.value :], _CALIB.value, from_end=True)
  batches = [jnp.asarray(w[None]) for w in calib]
  params = gemma3.load_params()
  model = gemma3.model_for(params)

  def ppl(p):
    return metrics.perplexity(lambda x: gemma3.logits(p, x), evaluation)

  results = {"float": ppl(params), "runs": []}
  print(f"float perplexity {results['float']:.4f}", flush=True)
  for fmt in _BITS.value:
    for method in _METHODS.value:
      start = time.time()
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank-deficient G (RMSNorm inputs)
        q = qjax.quantize(
          params,
          recipe(method, fmt),
          calib=None if method == "rtn" else (model, batches),
          progress=True,
        )
      seconds = time.time() - start
      stats = qjax.stats(q)
      quantized = [s for s in stats.values() if s["quantized"]]
      run = {
        "format": fmt,
        "method": method,
        "perplexity": ppl(qjax.dequantize(q)),
        "seconds": round(seconds, 1),
        "quantized_leaves": len(quantized),
        "bits_per_weight": 8
        * sum(s["bytes"] for s in quantized)
        / sum(s["bytes"] * 8 / s["bits_per_weight"] for s in quantized),
      }
      results["runs"].append(run)
      print(json.dumps(run), flush=True)
  if _OUT.value:
    pathlib.Path(_OUT.value).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
  app.run(main)
