"""Checkpoint conversion (experiments/convert_checkpoint.py).

  python -m experiments.convert_checkpoint \
    --config=configs/convert.py:source=smollm2 --output=/tmp/smollm2_mxfp4
  python -m experiments.convert_checkpoint \
    --config=configs/convert.py:source=/data/ckpt,format=uint4,zero_point=1 \
    --output=/data/ckpt_uint4

Arguments: source (minilm or smollm2 for the packaged files, or a path: an
orbax checkpoint directory, a .safetensors or a .gguf file), layout (auto,
raw, minilm, smollm2; see qjax.sources.open_source), part_kb (orbax part
size; 0: the largest leaf's size; the writer holds at most one part), and
the recipe fields of
configs/common.py: method rtn (default) or pipe stream leaf by leaf on any
number of processes; gptq, magr+rtn and magr+gptq (source minilm or
smollm2; calib_windows/window or calib_sentences) stream block by block in
one process. Format mxfp4 by default, blocks along the input axis.
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(
    arg,
    {
      **common.DEFAULTS,
      "format": "mxfp4",
      "source": "minilm",
      "layout": "auto",
      "part_kb": 0,
      "calib_windows": 16,
      "window": 512,
      "calib_sentences": 256,
      "act_order": False,
    },
  )
  c = common.base_config("convert", args)
  c.source = args["source"]
  c.layout = args["layout"]
  c.part_kb = args["part_kb"]
  # Calibrated methods: the same disjoint calibration text as the
  # smollm2/minilm configs (windows from the end of KJV; verses from its
  # end in batches of 32).
  c.calib = {
    "windows": args["calib_windows"],
    "window": args["window"],
    "sentences": args["calib_sentences"],
    "batch": 32,
  }
  c.act_order = args["act_order"]
  return c
