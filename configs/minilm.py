"""all-MiniLM-L6-v2: cosine of sentence embeddings to the float model.

  python -m experiments.quantize --config=configs/minilm.py:bits=4
  python -m experiments.quantize --config=configs/minilm.py:format=nvfp4

Arguments as configs/smollm2.py, plus sentences (KJV verses from the start,
for evaluation) and calib_sentences (verses from the end, for gptq/magr).
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(
    arg,
    {
      **common.DEFAULTS,
      "sentences": 64,
      "calib_sentences": 256,
      "act_order": False,
    },
  )
  c = common.base_config("minilm", args)
  c.eval = {"sentences": args["sentences"]}
  # Calibration verses come from the end of the text, in batches of 32.
  c.calib = {"sentences": args["calib_sentences"], "batch": 32}
  c.act_order = args["act_order"]
  return c
