"""QAF against factorize-then-quantize on real kernels, layer by layer.

  python -m experiments.qaf_layers --layers=fmnist:conv2,mobilenet_v2:stem \
    --rates=2,4 --bits=4,8 --sweeps=30 --inner=100

Prints the relative Frobenius error ||W - [[A, B, C]]|| / ||W|| of the float
CP-ALS start, of factorize-then-quantize (that start, each factor rounded
once) and of QAF, at the same rank, bits and quantizer (one MSE scale per
factor matrix). Layer replacement and accuracy are not here yet.
"""

import time
import warnings

import jax.numpy as jnp
from absl import app, flags

from qjax import formats
from qjax.transforms import factorize as fz

if __name__ == "__main__":
  flags.DEFINE_string("layers", "fmnist:conv2", "model:param path,...")
  flags.DEFINE_string("rates", "2,4", "compression rates")
  flags.DEFINE_string("bits", "4,8", "integer bit widths of the factors")
  flags.DEFINE_integer("sweeps", 30, "ALS sweeps cap")
  flags.DEFINE_integer("inner", 100, "ADMM steps cap per factor")


def kernel(spec: str):
  model, path = spec.split(":")
  if model == "fmnist":
    from qjax.models import fmnist_cnn

    tree = fmnist_cnn.load_params()
  elif model == "mobilenet_v2":
    from qjax.models import mobilenet_v2

    tree = mobilenet_v2.load_variables()["params"]
  else:
    raise ValueError(f"unknown model {model!r}; choices: fmnist, mobilenet_v2")
  for k in path.split("/"):
    tree = tree[k]
  return jnp.asarray(tree["kernel"] if isinstance(tree, dict) else tree)


def rel(a, w) -> float:
  return float(jnp.linalg.norm(a - w) / jnp.linalg.norm(w))


def main(argv):
  del argv
  f = flags.FLAGS
  print(
    "| layer | shape | rate | rank | bits | float CP | factorize+quantize "
    "| QAF | sweeps | seconds |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|")
  for spec in f.layers.split(","):
    w = kernel(spec)
    for rate in (float(r) for r in f.rates.split(",")):
      rank = fz.cp_rank(w.shape, rate)
      for bits in (int(b) for b in f.bits.split(",")):
        fmt = formats.get(f"int{bits}")
        start = time.perf_counter()
        with warnings.catch_warnings():
          warnings.simplefilter("ignore")  # the sweep cap is reported below
          out = fz.cp_quantized(w, rank, fmt, sweeps=f.sweeps, inner=f.inner)
        seconds = time.perf_counter() - start
        ftq = fz.kernel_from_factors(fz.cp_then_quantize(w, rank, fmt), w.shape)
        print(
          f"| {spec} | {tuple(w.shape)} | {rate:g} | {rank} | {bits} | "
          f"{float(out.info.init_error):.4f} | {rel(ftq, w):.4f} | "
          f"{rel(out.dequantize(), w):.4f} | {int(out.info.sweeps)} | "
          f"{seconds:.0f} |",
          flush=True,
        )


if __name__ == "__main__":
  app.run(main)
