"""Formats demo: round a Gaussian weight matrix onto eXmY formats, pack it.

  .venv/bin/python -m experiments.formats_demo

For each format: SQNR of the rounded tensor (after scaling the tensor so its
absolute max maps to the format's max), and bytes after dense bit packing
against float32. Until the model pipeline lands, this is the README's main job.
"""

import jax
import numpy as np
from absl import app, flags

from qjax import formats
from qjax.api import sqnr_db

_SHAPE = flags.DEFINE_list("shape", ["1024", "1024"], "weight shape")
_FORMATS = flags.DEFINE_list(
  "formats",
  [
    "float8_e4m3fn",
    "float8_e5m2",
    "e3m3",
    "float6_e3m2fn",
    "float6_e2m3fn",
    "e2m2",
    "e3m1",
    "float4_e2m1fn",
    "e1m2",
    "e2m0",
  ],
  "format names",
)


def main(argv):
  del argv
  shape = tuple(int(s) for s in _SHAPE.value)
  w = jax.random.normal(jax.random.key(0), shape)
  w_np = np.asarray(w)
  print(f"Gaussian weight {shape}, float32: {w_np.nbytes} bytes\n")
  print("| format | bits | max | SQNR dB | packed bytes | vs float32 |")
  print("|---|---|---|---|---|---|")
  for name in _FORMATS.value:
    fmt = formats.get(name)
    scale = float(np.abs(w_np).max()) / fmt.max
    codes = fmt.encode(w / scale)
    packed = formats.pack(codes, fmt.bits)
    back = np.asarray(fmt.decode(formats.unpack(packed, fmt.bits, shape[-1])))
    print(
      f"| {name} | {fmt.bits} | {fmt.max:g} | "
      f"{sqnr_db(w_np, back * scale):.2f} | {packed.nbytes} | "
      f"{packed.nbytes / w_np.nbytes:.4f} |"
    )


if __name__ == "__main__":
  app.run(main)
