"""Export a qjax checkpoint to a serving format, then read it back and check
that every leaf dequantizes to the checkpoint's values bit for bit.

  # the main job's checkpoint (GPTQ uint4 g128, zero points) for vLLM:
  python -m experiments.export --checkpoint=workdir/main/checkpoint \
    --model=smollm2 --to=compressed-tensors --output=workdir/main/ct
  # int4 g128 with float16 scales is Q4_0 exactly; a complete llama.cpp
  # file (metadata and tokenizer copied from SmolLM2's GGUF):
  python -m experiments.quantize --config=configs/smollm2.py \
    --config.zero_point=False --config.scale_format=float16 \
    --workdir=workdir/smollm2_q4_0
  python -m experiments.export --checkpoint=workdir/smollm2_q4_0/checkpoint \
    --model=smollm2 --to=gguf --output=workdir/smollm2_q4_0/model.gguf

--model names the tensors: 'smollm2' uses llama.cpp's names
(qjax.models.smollm2.gguf_names; for compressed-tensors 'blk.N' reads
'model.layers.N'); '' uses each format's default (docs/export.md). The
check reads GGUF with gguf-py's reader and dequantizer, and
compressed-tensors with qjax.io.compressed_tensors.load.
"""

import json
import pathlib

import numpy as np

TARGETS = ("compressed-tensors", "gguf")

if __name__ == "__main__":
  from absl import app, flags

  _CHECKPOINT = flags.DEFINE_string("checkpoint", None, "qjax checkpoint")
  _TO = flags.DEFINE_enum("to", "compressed-tensors", TARGETS, "format")
  _OUTPUT = flags.DEFINE_string("output", None, "directory or .gguf file")
  _MODEL = flags.DEFINE_string("model", "", "tensor names: 'smollm2' or ''")


def _names(model: str, to: str):
  if not model:
    return None
  if model != "smollm2":
    raise ValueError(f"--model={model!r}: known are 'smollm2' and ''")
  from qjax.models import smollm2

  names = smollm2.gguf_names()
  if to == "compressed-tensors":
    names = {
      p: (n.replace("blk.", "model.layers.", 1), t)
      for p, (n, t) in names.items()
    }
  return names


def _float_bits(x) -> np.ndarray:
  import jax.numpy as jnp

  from qjax import qtensor

  x = x.dequantize(jnp.float32) if qtensor.is_qtensor(x) else x
  return np.asarray(x, np.float32).view(np.uint32)


def _read_gguf(file, names) -> dict:
  """Flax path -> float32 values, through gguf-py alone."""
  import gguf
  from gguf.quants import dequantize

  tensors = {t.name: t for t in gguf.GGUFReader(str(file)).tensors}
  out = {}
  for p, (name, transpose) in names.items():
    t = tensors[name]
    x = np.asarray(dequantize(np.asarray(t.data), t.tensor_type), np.float32)
    out[p] = x.T if transpose else x
  return out


def export(checkpoint, to: str, output, model: str = "") -> dict:
  """Exports, reads back, compares; returns a summary (also printed)."""
  from qjax.io import checkpoint as ckpt
  from qjax.io import compressed_tensors, gguf_io
  from qjax.io.linear_codes import tree_leaves

  tree = ckpt.restore(checkpoint)
  leaves = tree_leaves(tree)
  names = _names(model, to)
  if names is not None:  # a checkpoint of the first blocks only
    present = {p for p, _ in leaves}
    names = {p: v for p, v in names.items() if p in present}
  output = pathlib.Path(output)
  if to == "gguf":
    if names is None:
      raise ValueError("--to=gguf needs --model (GGUF tensor names)")
    from qjax.models import smollm2

    file = gguf_io.export(
      tree, output, names=names, metadata_from=smollm2.gguf_path()
    )
    back = _read_gguf(file, names)
  else:
    file = compressed_tensors.export(tree, output, names=names)
    back = dict(tree_leaves(compressed_tensors.load(output)))
  mismatched = [
    p
    for p, leaf in leaves
    if not np.array_equal(_float_bits(back[p]), _float_bits(leaf))
  ]
  summary = {
    "checkpoint": str(checkpoint),
    "format": to,
    "file": str(file),
    "file_bytes": file.stat().st_size,
    "leaves": len(leaves),
    "quantized_leaves": sum(hasattr(v, "codes") for _, v in leaves),
    "mismatched_leaves": mismatched,
  }
  print(json.dumps(summary, indent=1))
  if mismatched:
    raise SystemExit(f"{len(mismatched)} leaves differ after the round trip")
  return summary


def main(argv):
  del argv
  export(_CHECKPOINT.value, _TO.value, _OUTPUT.value, _MODEL.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["checkpoint", "output"])
  app.run(main)
