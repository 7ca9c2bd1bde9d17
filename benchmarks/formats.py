"""Speed of qjax's format casts and bit packing, as ratios to baselines.

  .venv/bin/python -m benchmarks.formats            # 2^24 elements
  .venv/bin/python -m benchmarks.formats --log2=20  # quicker

Casts: jitted qjax encode+decode against, in the same run, (a) ml_dtypes'
`astype` round trip in NumPy and (b) JAX's own jitted `astype` round trip
where JAX supports the type on this backend (XLA:CPU crashes on float6, and
e3m3 exists nowhere else). Packing: jitted pack, then jitted unpack (two
calls, so XLA cannot fuse or cancel them), of uint8 codes against a plain
NumPy copy of the same codes. Each time is the median of --repeats runs
(--pack_repeats for packing) after one warm-up. Within each repeat, qjax and
its baselines take turns, so that all of them see the same moments of a
noisy machine. Ratios > 1 mean qjax is slower.
"""

import argparse
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from benchmarks.timing import interleaved_median_seconds
from qjax import formats

CASTS = [
  ("float8_e4m3fn", ml_dtypes.float8_e4m3fn, jnp.float8_e4m3fn),
  ("float4_e2m1fn", ml_dtypes.float4_e2m1fn, jnp.float4_e2m1fn),
  ("float6_e3m2fn", ml_dtypes.float6_e3m2fn, None),
  ("e3m3", None, None),
]
PACK_BITS = (3, 4, 5, 6, 7)


def bench_casts(x_np, repeats):
  x = jnp.asarray(x_np)
  rows = []
  for name, ml_type, jax_type in CASTS:
    fmt = formats.get(name)
    qjax_rt = jax.jit(lambda v, f=fmt: f.decode(f.encode(v)))
    fns = [lambda f=qjax_rt: f(x)]
    if ml_type is not None:
      fns.append(lambda t=ml_type: x_np.astype(t).astype(np.float32))
    if jax_type is not None:
      jax_rt = jax.jit(lambda v, t=jax_type: v.astype(t).astype(jnp.float32))
      fns.append(lambda f=jax_rt: f(x))
    t_qjax, *others = interleaved_median_seconds(fns, repeats)
    t_ml = others.pop(0) if ml_type is not None else None
    t_jax = others.pop(0) if jax_type is not None else None
    rows.append((name, t_qjax, t_ml, t_jax))
  return rows


def bench_packing(n, repeats):
  rows = []
  rng = np.random.default_rng(0)
  for bits in PACK_BITS:
    codes_np = rng.integers(0, 2**bits, n, dtype=np.uint8)
    codes = jnp.asarray(codes_np)
    # Two jitted calls, as a user runs them (pack when quantizing, unpack
    # when loading). In one jit XLA could fuse them, or cancel them out.
    pack = jax.jit(lambda c, b=bits: formats.pack(c, b))
    unpack = jax.jit(lambda p, b=bits: formats.unpack(p, b, n))
    packed = pack(codes)
    times = interleaved_median_seconds(
      [
        lambda c=codes, f=pack: f(c),
        lambda p=packed, f=unpack: f(p),
        lambda c=codes, f=pack, g=unpack: g(f(c)),
        lambda c=codes_np: c.copy(),
      ],
      repeats,
    )
    rows.append((bits, *times))
  return rows


def _ms(t):
  return "n/a" if t is None else f"{t * 1e3:.1f}"


def _ratio(a, b):
  return "n/a" if b is None else f"{a / b:.2f}"


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--log2", type=int, default=24)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--pack_repeats", type=int, default=31)
  args = parser.parse_args()
  n = 2**args.log2
  x_np = np.random.default_rng(0).standard_normal(n).astype(np.float32) * 4
  print(
    f"# {n} float32 elements, {os.cpu_count()} CPUs, jax {jax.__version__}, "
    f"{jax.devices()[0].platform}"
  )
  print(
    "\n| cast round trip | qjax ms | ml_dtypes ms | jax astype ms |"
    " qjax / ml_dtypes | qjax / jax |"
  )
  print("|---|---|---|---|---|---|")
  for name, t_q, t_ml, t_jax in bench_casts(x_np, args.repeats):
    print(
      f"| {name} | {_ms(t_q)} | {_ms(t_ml)} | {_ms(t_jax)} | "
      f"{_ratio(t_q, t_ml)} | {_ratio(t_q, t_jax)} |"
    )
  print(
    "\n| codes | pack ms | unpack ms | pack+unpack ms | numpy copy ms |"
    " pack+unpack / copy |"
  )
  print("|---|---|---|---|---|---|")
  for bits, t_p, t_u, t_b, t_c in bench_packing(n, args.pack_repeats):
    print(
      f"| {bits}-bit | {_ms(t_p)} | {_ms(t_u)} | {_ms(t_b)} | {_ms(t_c)} | "
      f"{_ratio(t_b, t_c)} |"
    )


if __name__ == "__main__":
  main()
