"""all-MiniLM-L6-v2: cosine of sentence embeddings to the float model.

  python -m experiments.quantize --config=configs/minilm.py:bits=4
  python -m experiments.quantize --config=configs/minilm.py:format=nvfp4

Arguments as configs/smollm2.py, plus sentences (KJV verses, from the start).
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, {**common.DEFAULTS, "sentences": 64})
  c = common.base_config("minilm", args)
  c.eval = {"sentences": args["sentences"]}
  return c
