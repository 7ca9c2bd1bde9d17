"""Checkpoint conversion (experiments/convert_checkpoint.py).

  python -m experiments.convert_checkpoint \
    --config=configs/convert.py:source=smollm2 --output=/tmp/smollm2_mxfp4
  python -m experiments.convert_checkpoint \
    --config=configs/convert.py:source=/data/ckpt,format=uint4,zero_point=1 \
    --output=/data/ckpt_uint4

Fields: source (minilm or smollm2 for the packaged files, or a path: an
orbax checkpoint directory, a .safetensors or a .gguf file), layout (auto,
raw, minilm, smollm2; see qjax.io.sources.open_source), part_kb (orbax part
size; 0: the largest leaf's size; the writer holds at most one part), and
the recipe fields of configs/common.py: data-free methods (rtn, the
default, or pipe) stream leaf by leaf on any number of processes; gptq,
magr+rtn and magr+gptq (source minilm or smollm2; calib.windows /
calib.window or calib.sentences) stream block by block in one process.
Format mxfp4 by default, blocks along the input axis.
"""

from configs import common


def get_config(arg=None):
  c = common.base_config("convert")
  c.format = "mxfp4"
  c.source = "minilm"
  c.layout = "auto"
  c.part_kb = 0
  # A recipe that quantizes no leaf of the source is an error (it would
  # write a float copy); True writes it anyway.
  c.allow_unquantized = False
  # Calibrated methods: the same disjoint calibration text as the
  # smollm2/minilm configs (windows from the end of KJV; verses from its
  # end in batches of 32).
  c.calib = {"windows": 16, "window": 512, "sentences": 256, "batch": 32}
  return common.apply_arg(c, arg)
