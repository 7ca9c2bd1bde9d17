"""The Fashion-MNIST CNN qjax trained: test accuracy after quantization.

  python -m experiments.quantize --config=configs/fmnist_cnn.py:bits=4 \
    --workdir=workdir/fmnist
  python -m experiments.quantize \
    --config=configs/fmnist_cnn.py:method=qaf,bits=4,rate=2 --workdir=...
"""

from configs import common


def get_config(arg=None):
  c = common.base_config("fmnist_cnn")
  c.block = 0
  c.eval = {}
  # qaf / ftq factorize conv2 and dense1; conv1 and the classifier stay
  # float, as the QAF authors keep ResNet's stem and fc.
  c.factor_pattern = r"^(conv2|dense1)/kernel$"
  return common.apply_arg(c, arg)
