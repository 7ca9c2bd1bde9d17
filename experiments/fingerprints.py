"""SHA-256 fingerprints of quantized codes and scales, per method x format.

A refactor must not move a number: this program quantizes MiniLM (all six
layers) and two SmolLM2 blocks with every method on every format it accepts,
and hashes every array of each quantized tree (codes, scales, zero points,
tensor scales, residual terms, CP factors, corrected biases) in tree order.

  python -m experiments.fingerprints --out=docs/results/fingerprints.json
  python -m experiments.fingerprints --check=docs/results/fingerprints.json

--check recomputes and lists every cell whose hash changed.
"""

import hashlib
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import qjax
from qjax import datasets, formats
from qjax.models import minilm, smollm2

_OUT = flags.DEFINE_string("out", None, "write the fingerprints here")
_CHECK = flags.DEFINE_string("check", None, "compare with this file")
_ONLY = flags.DEFINE_string("only", "", "substring filter on cell names")

MAGR = {"alpha": 1e-4, "iters": 40}
PIPE = {"order": 2, "keep": 0.5}
QAF = {"rate": 2.0, "sweeps": 2, "inner": 8}

# name -> (method, options, data-free?). Options use the protocol's names;
# `recipe_for` turns them into rules.
METHODS = {
  "rtn": ("rtn", {}),
  "rtn_clip": ("rtn", {"clip_ratios": (1.0, 0.9, 0.8)}),
  "gptq": ("gptq", {}),
  "gptq_act_order": ("gptq", {"act_order": True}),
  "magr+rtn": ("magr+rtn", {"magr": MAGR, "rtn": {"shrink": 0.9}}),
  "magr+gptq+cd": (
    "magr+gptq+cd",
    {"magr": MAGR, "gptq": {"shrink": 0.9}, "cd": {"sweeps": 1}},
  ),
  "pipe": ("pipe", {"pipe": PIPE}),
  "magr+pipe": ("magr+pipe", {"magr": MAGR, "pipe": {"order": 2}}),
  "gptq+pipe": ("gptq+pipe", {"pipe": {"order": 2}}),
  "ed_lstsq": ("ed", {"adjust": "lstsq"}),
  "ed_rescale": ("ed", {"adjust": "rescale"}),
  "ed_bias": ("ed", {"adjust": "bias"}),
  "gpfq": ("gpfq", {}),
  "gpfq_feedback": ("gpfq", {"scales": "feedback"}),
  "qaf": ("qaf", QAF),
  "ftq": ("ftq", {"rate": 2.0}),
}


def _formats():
  """name -> (element, scaling) on the input axis (-2) of every kernel."""
  out = {
    "uint4_g128": (
      "uint4",
      formats.per_block(128, axis=-2, ragged=True, zero_point=True),
    ),
    "int3_channel": ("int3", formats.per_channel(-1)),
    "int4_tensor": ("int4", formats.per_tensor()),
  }
  for name in ("mxfp4", "nvfp4", "mxint8"):
    out[name] = formats.block_format(name, -2)
  return out


def recipe_for(method: str, options: dict, fmt, scaling) -> "qjax.Recipe":
  """One rule over every kernel (QAF/FTQ: the attention output only)."""
  from experiments import fingerprint_rules

  return fingerprint_rules.recipe(method, options, fmt, scaling)


def accepts(method: str, fmt_name: str) -> bool:
  if method in ("qaf", "ftq"):
    return fmt_name == "int4_tensor"
  if fmt_name == "int4_tensor":
    return False
  if "pipe" in method and fmt_name in ("uint4_g128", "nvfp4"):
    return False  # residual terms need a symmetric grid, no tensor scale
  return True


def digest(tree) -> str:
  h = hashlib.sha256()
  leaves = jax.tree_util.tree_leaves(tree)
  for x in leaves:
    a = np.ascontiguousarray(np.asarray(x))
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _models():
  verses = [v for v in datasets.kjv_text().split("\n") if v.strip()]
  tok = minilm.tokenizer()
  tail = sorted(verses[-32:], key=len)
  mini = minilm.load_params()
  mini_batches = [minilm.encode(tok, tail[i : i + 16]) for i in (0, 16)]
  smol = smollm2.load_params(layers=2)
  ids = smollm2.tokenizer().encode(datasets.kjv_text()[-6000:]).ids
  smol_batches = [
    jnp.asarray(np.asarray(ids[i * 256 : (i + 1) * 256], np.int32)[None])
    for i in range(2)
  ]
  return {
    "minilm": (mini, minilm.block_model(mini), mini_batches),
    "smollm2_2blocks": (smol, smollm2.block_model(smol), smol_batches),
  }


def compute(only: str = "") -> dict:
  out = {}
  models = _models()
  fmts = _formats()
  for model_name, (params, block_model, batches) in models.items():
    for method_name, (method, options) in METHODS.items():
      for fmt_name, (fmt, scaling) in fmts.items():
        cell = f"{model_name}/{method_name}/{fmt_name}"
        if not accepts(method, fmt_name) or only not in cell:
          continue
        start = time.perf_counter()
        recipe = recipe_for(method, options, fmt, scaling)
        q = qjax.quantize(
          params, recipe, calib=(block_model, batches), progress=False
        )
        out[cell] = digest(q)
        jax.clear_caches()  # see tests/conftest.py: memory-map cap
        print(f"{cell}: {out[cell][:16]} ({time.perf_counter() - start:.1f}s)")
  return out


def main(argv):
  del argv
  got = compute(_ONLY.value)
  if _OUT.value:
    pathlib.Path(_OUT.value).write_text(json.dumps(got, indent=1) + "\n")
  if _CHECK.value:
    want = json.loads(pathlib.Path(_CHECK.value).read_text())
    changed = [k for k in got if want.get(k) != got[k]]
    missing = [k for k in want if k not in got and _ONLY.value in k]
    print(f"{len(got) - len(changed)}/{len(got)} cells unchanged")
    for k in changed:
      print(f"CHANGED {k}")
    for k in missing:
      print(f"MISSING {k}")
    if changed or missing:
      raise SystemExit(1)


if __name__ == "__main__":
  app.run(main)
