"""all-MiniLM-L6-v2: cosine of sentence embeddings to the float model.

  python -m experiments.quantize --config=configs/minilm.py:bits=4
  python -m experiments.quantize --config=configs/minilm.py:format=nvfp4

Fields as configs/common.py, plus eval.sentences (KJV verses from the start,
for evaluation) and calib.sentences (verses from the end, for calibrated
methods, in batches of calib.batch).
"""

from configs import common


def get_config(arg=None):
  c = common.base_config("minilm")
  c.eval = {"sentences": 64}
  c.calib = {"sentences": 256, "batch": 32}
  return common.apply_arg(c, arg)
