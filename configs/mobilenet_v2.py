"""MobileNetV2 (ImageNet): top-1 agreement and KL to the float model.

  python -m experiments.quantize --config=configs/mobilenet_v2.py:bits=8 \
    --workdir=workdir/mobilenet_v2
  python -m experiments.quantize --config=configs/mobilenet_v2.py:bits=4

Every conv and Dense kernel is quantized; default one scale per output
channel (block=0). Images: the scikit-image photos, eval.crops_per_photo
crops each (the first is the centre crop). Calibrated methods:
  python -m experiments.quantize \
    --config=configs/mobilenet_v2.py:method=ed,format=mxfp4
with calib.images crops of other photos (mobilenet_v2.calibration_images).
"""

from configs import common


def get_config(arg=None):
  c = common.base_config("mobilenet_v2")
  c.block = 0
  c.eval = {"crops_per_photo": 4}
  # Calibrated methods (gptq, magr+*, ed, gpfq) see the pointwise convs and
  # the classifier; the stem and depthwise 3x3 convs take RTN on the same
  # grid. Calibration crops come from other photos than the evaluation's.
  c.calib = {"images": 64, "batch": 16}
  c.rtn_pattern = r"(stem|depthwise)/conv/kernel"
  # qaf / ftq factorize the stem and the pointwise convs (docs/qaf.md).
  c.factor_pattern = r"(stem|expand|project|head)/conv/kernel$"
  return common.apply_arg(c, arg)
