"""SmolLM2-135M on KJV perplexity.

  python -m experiments.quantize --config=configs/smollm2.py \
    --workdir=workdir/smollm2          # the main job: GPTQ, uint4, g128
  python -m experiments.quantize --config=configs/smollm2.py:method=rtn
  python -m experiments.quantize \
    --config=configs/smollm2.py:method=magr+gptq,bits=3
  python -m experiments.quantize \
    --config=configs/smollm2.py:method=rtn,format=mxfp4

Arguments: method (rtn, gptq, magr+rtn, magr+gptq; default gptq), bits
(default 4), zero_point (default true: uintN asymmetric grids; false: intN
symmetric), format (overrides bits: int3, nf4, mxfp4, ...), block (0 = per
channel), scale_format, clip_ratios (1/0.9/0.8), layers, windows
(evaluation windows of `window` tokens from the start of the text); for
calibrated methods calib_windows (windows from the end of the text,
disjoint from evaluation) and act_order; for MagR magr_statistics, shrink
and cd_sweeps (see configs/common.py).
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(
    arg,
    {
      **common.DEFAULTS,
      # The main job's recipe: GPTQ on an asymmetric 4-bit grid in groups
      # of 128, the best measured method that fits 10 minutes on 2 cores
      # (MagR+GPTQ takes about 11 and scores worse at 4 bits; README).
      "method": "gptq",
      "zero_point": True,
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
