"""qmatmul speed against a bf16 matmul and XLA dequantize-then-dot, one run.

  .venv/bin/python -m benchmarks.qmatmul             # this backend's kernel
  .venv/bin/python -m benchmarks.qmatmul --quick     # CPU-sized smoke run
  .venv/bin/python -m benchmarks.qmatmul --check     # kernel vs reference,
                                                     # ragged shapes, no timing

For each format, M in --m and [K, N] in --shapes (4096 x 4096 and SmolLM2's
576 x 1536, 1536 x 576 and 576 x 49152 by default), three times per call:
  qmatmul   the backend's kernel (Triton on GPU, Mosaic on TPU; on CPU the
            XLA reference, which is what qmatmul runs there) on a weight
            prepared once (qjax.kernels.prepare);
  bf16      x @ w with w stored in bfloat16, float32 accumulation;
  deq+dot   XLA: dequantize the QTensor to bfloat16, then the same dot.
Ratios are baseline / qmatmul (above 1: qmatmul is faster). Bandwidth is the
weight bytes each call reads (the prepared planes, scales and zero points;
2 K N for bf16) per second, and the fraction of the device's peak.

Timing: --sets distinct weights per variant (so that, summed, they overflow
the GPU's L2 cache and every call reads HBM), each called --reps times
inside one jitted loop; seconds per call = median wall time over --repeats
such programs / (sets * reps). Activations x are bfloat16.
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from qjax import formats, kernels
from qjax.formats.scaling import Scaling
from qjax.kernels import layout
from qjax.quantizers import rtn

# Nominal HBM bandwidth (bytes/s) by device kind, from the vendors' specs.
PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}


def _scaled(name, axis_block=None, **kw):
  fmt = formats.get(name)
  if axis_block:
    return fmt, Scaling("block", (0,), (axis_block,), ragged=True, **kw)
  return fmt, Scaling("channel", (-1,), **kw)


FORMATS = {
  "int4_pc": lambda: _scaled("int4"),
  "int4_g128": lambda: _scaled("int4", 128),
  "mxfp4": lambda: formats.block_format("mxfp4"),
  "nvfp4": lambda: formats.block_format("nvfp4"),
  "int8_pc": lambda: _scaled("int8"),
  "e4m3_pc": lambda: _scaled("float8_e4m3fn"),
  "mxfp8": lambda: formats.block_format("mxfp8_e4m3"),
  "int3_pc": lambda: _scaled("int3"),
  "int2_pc": lambda: _scaled("int2"),
  "int4_g32": lambda: _scaled("int4", 32),
  "int4_g64": lambda: _scaled("int4", 64),
  "uint4_g128": lambda: _scaled("uint4", 128, zero_point=True),
}
SHAPES = ((4096, 4096), (576, 1536), (1536, 576), (576, 49152))


def _peak(device) -> float | None:
  kind = getattr(device, "device_kind", "")
  return next((v for k, v in PEAK_BANDWIDTH.items() if k in kind), None)


def _weights(k, n, sets, fmt_name, seed=0):
  fmt, scaling = FORMATS[fmt_name]()
  qts, dense = [], []
  for s in range(sets):
    w = jax.random.normal(jax.random.PRNGKey(seed + s), (k, n)) * 0.02
    qts.append(rtn.rtn(w, fmt, scaling))
    dense.append(w.astype(jnp.bfloat16))
  return qts, dense


def _time_per_call(fn, operands, x, reps, repeats) -> float:
  """Seconds per fn(x, w) call, over len(operands) weights x reps."""

  @jax.jit
  def program(x, operands):
    def body(_, acc):
      # Sum whole outputs: a slice of a dot could be simplified to a smaller
      # dot by XLA.
      return acc + sum(jnp.sum(fn(x, w), dtype=jnp.float32) for w in operands)

    return jax.lax.fori_loop(0, reps, body, jnp.float32(0))

  jax.block_until_ready(program(x, operands))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(program(x, operands))
    times.append(time.perf_counter() - start)
  return statistics.median(times) / (len(operands) * reps)


def _copy_bandwidth(repeats) -> float:
  """Read+write bytes per second of an on-device 1 GiB copy (x + 1)."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2**28,), jnp.float32)
  add_one = jax.jit(lambda x: x + 1)
  jax.block_until_ready(add_one(x))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(add_one(x))
    times.append(time.perf_counter() - start)
  return 2 * x.nbytes / statistics.median(times)


def bench(args) -> list[dict]:
  impl = kernels.default_impl()
  device = jax.devices()[0]
  peak = _peak(device)
  rows = []
  bf16_seconds = {}  # (m, k, n) -> s: the same for every format

  def deq_dot(x, qt):
    return jnp.dot(
      x, qt.dequantize(jnp.bfloat16), preferred_element_type=jnp.float32
    )

  def bf16_dot(x, w):
    return jnp.dot(x, w, preferred_element_type=jnp.float32)

  def qmm(x, pw):
    return kernels.qmatmul(x, pw, out_dtype=jnp.float32)

  for shape in args.shapes:
    k, n = shape
    for fmt_name in args.formats:
      qts, dense = _weights(k, n, args.sets, fmt_name)
      prepared = [kernels.prepare(q, impl) for q in qts]
      wbytes = (
        prepared[0].nbytes
        if isinstance(prepared[0], layout.PreparedWeight)
        else qts[0].nbytes
      )
      for m in args.m:
        x = (jax.random.normal(jax.random.PRNGKey(m), (m, k))).astype(
          jnp.bfloat16
        )
        t_q = _time_per_call(qmm, prepared, x, args.reps, args.repeats)
        if (m, k, n) not in bf16_seconds:
          bf16_seconds[m, k, n] = _time_per_call(
            bf16_dot, dense, x, args.reps, args.repeats
          )
        t_b = bf16_seconds[m, k, n]
        t_d = _time_per_call(deq_dot, qts, x, args.reps, args.repeats)
        err = _relative_error(qmm(x, prepared[0]), kernels.reference(x, qts[0]))
        row = dict(
          format=fmt_name,
          m=m,
          k=k,
          n=n,
          impl=impl,
          qmatmul_us=t_q * 1e6,
          bf16_us=t_b * 1e6,
          deq_dot_us=t_d * 1e6,
          vs_bf16=t_b / t_q,
          vs_deq_dot=t_d / t_q,
          weight_bytes=wbytes,
          bandwidth=wbytes / t_q,
          bf16_bandwidth=2 * k * n / t_b,
          peak_fraction=wbytes / t_q / peak if peak else None,
          rel_error=err,
        )
        rows.append(row)
        print(_line(row), flush=True)
        if args.json:  # after every row: a cut-off run keeps what it measured
          with open(args.json, "w") as f:
            json.dump(dict(device=device.device_kind, rows=rows), f, indent=1)
  return rows


def _relative_error(out, ref) -> float:
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def _line(r) -> str:
  frac = f"{r['peak_fraction']:.0%}" if r["peak_fraction"] else "n/a"
  return (
    f"| {r['format']} | {r['m']} | {r['k']}x{r['n']} | {r['qmatmul_us']:.1f} "
    f"| {r['bf16_us']:.1f} | {r['deq_dot_us']:.1f} | {r['vs_bf16']:.2f}x "
    f"| {r['vs_deq_dot']:.2f}x | {r['bandwidth'] / 1e9:.0f} GB/s ({frac}) "
    f"| {r['rel_error']:.1e} |"
  )


def check(args) -> bool:
  """Compiled kernel vs the float64-accumulated reference, ragged shapes."""
  impl = args.impl if args.impl != "auto" else kernels.default_impl()
  ok = True
  for fmt_name in args.formats:
    for k, n in ((576, 300),):  # ragged: K and N divide no tile
      qts, _ = _weights(k, n, 1, fmt_name, seed=7)
      for m in (1, 300):
        x = jax.random.normal(jax.random.PRNGKey(m), (m, k), jnp.float32)
        for dtype in (jnp.float32, jnp.bfloat16):
          xd = x.astype(dtype)
          out = kernels.qmatmul(
            xd,
            qts[0],
            impl=impl,
            out_dtype=jnp.float32,
            interpret=args.interpret,
          )
          ref = kernels.reference(xd, qts[0])
          err = _relative_error(out, ref)
          tol = 1e-5 if dtype == jnp.float32 else 1e-2
          good = err < tol and bool(jnp.all(jnp.isfinite(out)))
          ok &= good
          print(
            f"check {impl} {fmt_name} m={m} k={k} n={n} "
            f"{jnp.dtype(dtype).name}: rel err {err:.2e} "
            f"{'ok' if good else 'FAIL'}",
            flush=True,
          )
  return ok


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="small CPU-sized run")
  p.add_argument("--check", action="store_true", help="correctness only")
  p.add_argument("--formats", default=",".join(FORMATS))
  p.add_argument("--m", default="1,16,256")
  p.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
  p.add_argument("--sets", type=int, default=8)
  p.add_argument("--reps", type=int, default=8)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--json", help="write the rows here")
  p.add_argument("--gemv", help="Triton M = 1 loop: reduce or accumulate")
  p.add_argument("--impl", default="auto", help="--check: kernel to check")
  p.add_argument(
    "--interpret", action="store_true", help="--check: Pallas interpret mode"
  )
  args = p.parse_args()
  args.formats = args.formats.split(",")
  args.m = [int(v) for v in args.m.split(",")]
  args.shapes = [
    tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")
  ]
  if args.quick:
    args.shapes, args.m = [(1024, 1024)], [1, 16]
    args.sets, args.reps, args.repeats = 2, 2, 3
  if args.gemv:
    from qjax.kernels import pallas_gpu

    pallas_gpu.GEMV = args.gemv
  device = jax.devices()[0]
  print(
    f"device: {device.device_kind} ({jax.default_backend()}), "
    f"jax {jax.__version__}, "
    f"qmatmul impl: {kernels.default_impl()}",
    flush=True,
  )
  if args.check:
    raise SystemExit(0 if check(args) else 1)
  if jax.default_backend() == "gpu":
    print(
      f"measured copy bandwidth: {_copy_bandwidth(args.repeats) / 1e9:.0f}"
      " GB/s",
      flush=True,
    )
  print(
    "| format | M | K x N | qmatmul us | bf16 us | deq+dot us | vs bf16 "
    "| vs deq+dot | qmatmul weight bandwidth | rel err |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|")
  rows = bench(args)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(
        dict(device=device.device_kind, jax=jax.__version__, rows=rows),
        f,
        indent=1,
      )


if __name__ == "__main__":
  main()
