"""MobileNetV2 (ImageNet): top-1 agreement and KL to the float model.

  python -m experiments.quantize --config=configs/mobilenet_v2.py:bits=8 \
    --workdir=workdir/mobilenet_v2
  python -m experiments.quantize --config=configs/mobilenet_v2.py:bits=4

Every conv and Dense kernel is quantized; default one scale per output
channel (block=0). Images: the scikit-image photos, `crops_per_photo` crops
each (the first is the centre crop). Calibrated methods:
  python -m experiments.quantize \
    --config=configs/mobilenet_v2.py:method=ed,format=mxfp4
with calib_images crops of other photos (mobilenet_v2.calibration_images).
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(
    arg,
    {
      **common.DEFAULTS,
      "block": 0,
      "crops_per_photo": 4,
      "calib_images": 64,
      "act_order": False,
    },
  )
  c = common.base_config("mobilenet_v2", args)
  c.eval = {"crops_per_photo": args["crops_per_photo"]}
  # Calibrated methods (gptq, magr+*, ed, gpfq) see the pointwise convs and
  # the classifier; the stem and depthwise 3x3 convs take RTN on the same
  # grid. Calibration crops come from other photos than the evaluation's.
  c.calib = {"images": args["calib_images"], "batch": 16}
  c.rtn_pattern = r"(stem|depthwise)/conv/kernel"
  # qaf / ftq factorize the stem and the pointwise convs (README, QAF).
  c.factor_pattern = r"(stem|expand|project|head)/conv/kernel$"
  c.act_order = args["act_order"]
  return c
