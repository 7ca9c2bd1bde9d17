"""SmolLM2-135M on KJV perplexity.

  python -m experiments.quantize --config=configs/smollm2.py \
    --workdir=workdir/smollm2   # the main job: GPTQ (act-order), uint4, g128
  python -m experiments.quantize --config=configs/smollm2.py:method=rtn
  python -m experiments.quantize \
    --config=configs/smollm2.py:method=magr+gptq,bits=3
  python -m experiments.quantize \
    --config=configs/smollm2.py:method=rtn,format=mxfp4
  python -m experiments.quantize --config=configs/smollm2.py \
    --config.method=gptq --config.gptq.act_order=False
  python -m experiments.quantize \
    --config=configs/smollm2.py:method=hadamard+gptq,bits=8,act=int8
                                # W8A8: int8 inputs per token, rotated
  python -m experiments.quantize \
    --config=configs/smollm2.py:act=nvfp4,kv=int8 --config.act.weights_see=True
                                # GPTQ calibrated on nvfp4 inputs

Fields as configs/common.py, plus eval.windows / eval.window (evaluation
windows from the start of the text), eval.text (a UTF-8 file to evaluate on
instead of the KJV), calib.windows (calibration windows
from its end, disjoint from evaluation) and calib.precision ('float64':
calibration forward passes in float64).
"""

from configs import common


def get_config(arg=None):
  c = common.base_config("smollm2")
  # The main job's recipe: GPTQ with act-order (configs/common.py) on an
  # asymmetric 4-bit grid in groups of 128, the best measured method that
  # fits 10 minutes on 2 cores (MagR+GPTQ takes about 11 and scored worse
  # at 4 bits; docs/gptq_magr.md).
  c.method = "gptq"
  c.zero_point = True
  # eval.text: '' = the KJV; or a UTF-8 file of your own (docs/models.md).
  c.eval = {"windows": 8, "window": 512, "text": ""}
  # calib.subset k > 0: the k-th run of 16 windows before the last one.
  # calib.precision: the calibration forward passes and H in float64, so
  # that GPTQ's codes (and the main job's perplexity) do not depend on the
  # machine's cores or instruction set (README); ED and GPFQ use float32.
  c.calib = {"windows": 16, "window": 512, "subset": 0, "precision": "float64"}
  return common.apply_arg(c, arg)
