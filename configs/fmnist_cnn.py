"""The Fashion-MNIST CNN qjax trained: test accuracy after quantization.

  python -m experiments.quantize --config=configs/fmnist_cnn.py:bits=4 \
    --workdir=workdir/fmnist
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, {**common.DEFAULTS, "block": 0})
  c = common.base_config("fmnist_cnn", args)
  c.eval = {}
  return c
