"""SmolLM2-135M on KJV perplexity.

  python -m experiments.quantize --config=configs/smollm2.py \
    --workdir=workdir/smollm2
  python -m experiments.quantize --config=configs/smollm2.py:bits=3,block=64
  python -m experiments.quantize --config=configs/smollm2.py:format=mxfp4
  python -m experiments.quantize --config=configs/smollm2.py:method=gptq,bits=3

Arguments: method (rtn, gptq), bits, format (overrides bits: int3, nf4,
mxfp4, ...), block (0 = per channel), scale_format, clip_ratios
(1/0.9/0.8), layers, windows (evaluation windows of `window` tokens from the
start of the text); for gptq, calib_windows (windows from the end of the
text, disjoint from evaluation) and act_order.
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(
    arg,
    {
      **common.DEFAULTS,
      "windows": 8,
      "window": 512,
      "calib_windows": 16,
      "act_order": False,
    },
  )
  c = common.base_config("smollm2", args)
  c.eval = {"windows": args["windows"], "window": args["window"]}
  c.calib = {"windows": args["calib_windows"], "window": args["window"]}
  c.act_order = args["act_order"]
  return c
