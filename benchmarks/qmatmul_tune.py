"""Sweep the Triton kernel's launch parameters on one shape (GPU only).

  python -m benchmarks.qmatmul_tune --format int4_g128 --m 1 --seconds 120

Times pallas_gpu.matmul alone (prepared weights, --sets of them so the sum
overflows L2) for tile_n x target programs x warps x stages, prints one row
per setting, fastest last. Used to choose the defaults in
qjax/kernels/pallas_gpu.py and qjax/kernels/qmatmul.py.
"""

import argparse
import itertools
import time

import jax
import jax.numpy as jnp

from benchmarks.qmatmul import FORMATS, _time_per_call
from qjax.kernels import layout, pallas_gpu
from qjax.quantizers import rtn


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--format", default="int4_g128")
  p.add_argument("--m", type=int, default=1)
  p.add_argument("--shape", default="4096x4096")
  p.add_argument("--sets", type=int, default=8)
  p.add_argument("--seconds", type=float, default=120)
  args = p.parse_args()
  k, n = (int(v) for v in args.shape.split("x"))
  fmt, scaling = FORMATS[args.format]()
  x = jax.random.normal(jax.random.PRNGKey(0), (args.m, k)).astype(jnp.bfloat16)
  start = time.perf_counter()
  results = []
  weights = [
    rtn.rtn(jax.random.normal(jax.random.PRNGKey(s), (k, n)), fmt, scaling)
    for s in range(args.sets)
  ]
  for programs, tile_n in itertools.product((264, 1056), (128, 256, 512)):
    pws = [layout.prepare(q, tile_n=tile_n) for q in weights]
    wbytes = pws[0].nbytes
    for warps, stages, gemv in (
      (4, 3, "reduce"),
      (4, 3, "accumulate"),
      (8, 3, "accumulate"),
    ):
      if time.perf_counter() - start > args.seconds:
        break

      def fn(x, pw, programs=programs, warps=warps, stages=stages, gemv=gemv):
        return pallas_gpu.matmul(
          x,
          pw,
          target_programs=programs,
          num_warps=warps,
          num_stages=stages,
          gemv=gemv,
        )

      try:
        t = _time_per_call(fn, pws, x, 8, 5)
      except Exception as e:  # a setting that does not compile
        print(
          f"tile_n={tile_n} programs={programs} warps={warps} "
          f"stages={stages}: {type(e).__name__}",
          flush=True,
        )
        continue
      results.append((t, tile_n, programs, warps, stages, gemv, wbytes / t))
      print(
        f"tile_n={tile_n} programs={programs} warps={warps} stages={stages} "
        f"{gemv}: "
        f"{t * 1e6:.1f} us, {wbytes / t / 1e9:.0f} GB/s",
        flush=True,
      )
  for r in sorted(results, reverse=True)[-5:]:
    print("best:", r, flush=True)


if __name__ == "__main__":
  main()
