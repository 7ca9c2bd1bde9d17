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
configs/common.py. Conversion streams data-free recipes: method rtn
(default) or pipe, format mxfp4 by default, blocks along the input axis.
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
    },
  )
  c = common.base_config("convert", args)
  c.source = args["source"]
  c.layout = args["layout"]
  c.part_kb = args["part_kb"]
  return c
