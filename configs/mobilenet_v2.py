"""MobileNetV2 (ImageNet): top-1 agreement and KL to the float model.

  python -m experiments.quantize --config=configs/mobilenet_v2.py:bits=8 \
    --workdir=workdir/mobilenet_v2
  python -m experiments.quantize --config=configs/mobilenet_v2.py:bits=4

Every conv and Dense kernel is quantized; default one scale per output
channel (block=0). Images: the scikit-image photos, `crops_per_photo` crops
each (the first is the centre crop).
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(
    arg, {**common.DEFAULTS, "block": 0, "crops_per_photo": 4}
  )
  c = common.base_config("mobilenet_v2", args)
  c.eval = {"crops_per_photo": args["crops_per_photo"]}
  return c
