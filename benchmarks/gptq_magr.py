"""Speed of qjax's jitted GPTQ and MagR, as ratios to baselines in one run.

  .venv/bin/python -m benchmarks.gptq_magr                 # both layers
  .venv/bin/python -m benchmarks.gptq_magr --qwix          # + qwix 0.1.8
  .venv/bin/python -m benchmarks.gptq_magr --memory        # calibration RSS
  .venv/bin/python -m benchmarks.gptq_magr --like_for_like # vs qwix, 4 ways

Layers are [in, out] = 1536 x 576 (SmolLM2's down projection) and 4096 x
4096, with H = (2/n) X^T X from n = 2 * in correlated random rows. Int4 per
output channel (symmetric), as qwix's GPTQ does it.

GPTQ: jitted qjax (median of --repeats after a compile run; the default
  precision='float64', and 'float32' beside it) against
  (a) the slow reference of the tests: NumPy float64, one input row at a
      time with the OBS update of every later row and H^-1 downdate, no
      blocks, no lazy updates;
  (b) qwix==0.1.8 `gptq_core.quantize_weight` (--qwix; `pip install
      .[bench]`), which loops over columns in Python, run once. Its int4 grid
      is absmax / 7.5 with levels -8..7, qjax's is absmax / 7 with -7..7, so
      the layer losses are shown next to RTN's loss on each one's own grid.
MagR: time per proximal-gradient iteration of the jitted solver (pivot and
  sort projections) against a NumPy float64 vectorised version of the same
  iteration (sort-based projection, Eq. 4), as (t(2k) - t(k)) / k with k =
  --magr_iters (a quarter of it, and 3 for NumPy, on the big layer), so
  eigvalsh cancels out.
--like_for_like: GPTQ on the 1536 x 576 layer, qjax (precision='float32',
  qwix's arithmetic, and the default 'float64') against qwix 0.1.8 called
  eagerly and under jax.jit, each cold (the first call after
  jax.clear_caches(), compilation included) and warm (later calls, timed in
  turn so all three see the same moments of the machine); reports each
  condition's median and range, and the ratios to qjax float32.
--memory: peak RSS growth while calibrating SmolLM2 block by block (GPTQ,
  16 x 512-token windows), next to the size of one block's activations and
  of all blocks' activations.
"""

import argparse
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import median_seconds
from qjax import formats
from qjax.quantizers import gptq, rtn
from qjax.transforms import magr

SHAPES = ((1536, 576), (4096, 4096))


def _layer(n_in, n_out, seed=0):
  rng = np.random.default_rng(seed)
  tokens = 2 * n_in
  x = rng.standard_normal((tokens, n_in), dtype=np.float32)
  mix = rng.standard_normal((n_in, n_in), dtype=np.float32) / np.sqrt(n_in)
  x = x + 0.5 * (x @ mix)  # correlated features, as real activations are
  w = (rng.standard_normal((n_in, n_out)) * 0.02).astype(np.float32)
  return w, ((2.0 / tokens) * (x.T @ x)).astype(np.float32)


def _once(fn):
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return time.perf_counter() - start, out


def _loss(w, q, h):
  d = np.asarray(w, np.float64) - np.asarray(q, np.float64)
  return float(np.sum(d * (h.astype(np.float64) @ d)))


def slow_gptq(w, h, scale, damp=0.01):
  """Row by row, float64, explicit H^-1 downdates (the tests' reference)."""
  w = w.astype(np.float64).copy()
  h = h.astype(np.float64).copy()
  n = w.shape[0]
  h += damp * np.mean(np.diag(h)) * np.eye(n)
  h_inv = np.linalg.inv(h)
  q = np.zeros_like(w)
  s = scale.astype(np.float64)
  for i in range(n):
    q[i] = np.clip(np.round(w[i] / s), -8, 7) * s
    e = (w[i] - q[i]) / h_inv[i, i]
    w[i + 1 :] -= np.outer(h_inv[i + 1 :, i], e)
    h_inv[i:, i:] -= np.outer(h_inv[i:, i], h_inv[i, i:]) / h_inv[i, i]
  return q


def _prox_sort_np(v, t):
  a = np.abs(v / t)
  mu = -np.sort(-a, axis=0)
  cums = np.cumsum(mu, axis=0)
  idx = np.arange(1, a.shape[0] + 1)[:, None]
  rho = np.max(np.where(mu > (cums - 1) / idx, idx, 0), axis=0)
  theta = (np.take_along_axis(cums, rho[None] - 1, 0)[0] - 1) / rho
  proj = np.sign(v) * np.maximum(a - theta, 0)
  proj = np.where(a.sum(0) <= 1, v / t, proj)
  return v - t * proj


def numpy_magr(w0, h, alpha, iters):
  w0 = w0.astype(np.float64)
  hn = h.astype(np.float64) / np.linalg.eigvalsh(h.astype(np.float64))[-1]
  w = w0.copy()
  for _ in range(iters):
    w = _prox_sort_np(w - hn @ (w - w0), alpha)
  return w


def bench_gptq(w, h, repeats, with_slow, with_qwix):
  fmt, scaling = formats.get("int4"), formats.per_channel(-1)
  t_fast = median_seconds(lambda: gptq.gptq(w, h, fmt, scaling), repeats)
  t_f32 = median_seconds(
    lambda: gptq.gptq(w, h, fmt, scaling, precision="float32"), repeats
  )
  qt, info = gptq.gptq(w, h, fmt, scaling)
  row = {
    "qjax_s": t_fast,
    "qjax_f32_s": t_f32,
    "qjax_loss": _loss(w, qt.dequantize(), h),
    "rtn_loss": _loss(w, rtn.rtn(w, fmt, scaling).dequantize(), h),
  }
  if with_slow:
    grid = rtn.block_scales(jnp.asarray(w), fmt, scaling)
    scale = np.asarray(grid.scale_full[0])  # one scale per output channel
    t_slow, q = _once(lambda: slow_gptq(w, h, scale))
    row.update(slow_s=t_slow, slow_loss=_loss(w, q, h))
  if with_qwix:
    row.update(_qwix_gptq(w, h))
  return row


def _qwix_gptq(w, h):
  from qwix._src.core import qarray
  from qwix.contrib import gptq_core

  how = qarray.HowToQuantize(qtype=jnp.int4, channelwise_axes=[0])
  wt, ht = jnp.asarray(w.T), jnp.asarray(h)  # qwix: W [out, in]
  t, (qa, _) = _once(lambda: gptq_core.quantize_weight(wt, ht, how))
  deq = np.asarray(qarray.dequantize(qa), np.float64).T
  absmax = np.abs(w).max(0) / 7.5
  rtn_q = np.clip(np.round(w / absmax), -8, 7) * absmax
  return {
    "qwix_s": t,
    "qwix_loss": _loss(w, deq, h),
    "qwix_rtn_loss": (_loss(w, rtn_q, h)),
  }


def like_for_like(w, h, repeats):
  """{way: {'cold': s, 'warm': [s, ...]}} for qjax, qwix eager, qwix jit."""
  from qwix._src.core import qarray
  from qwix.contrib import gptq_core

  fmt, scaling = formats.get("int4"), formats.per_channel(-1)
  how = qarray.HowToQuantize(qtype=jnp.int4, channelwise_axes=[0])
  wj, hj = jnp.asarray(w), jnp.asarray(h)
  wt, ht = jnp.asarray(w.T), jnp.asarray(h)
  qwix_jit = jax.jit(lambda a, b: gptq_core.quantize_weight(a, b, how)[0])
  ways = {
    "qjax float32 (jitted)": lambda: gptq.gptq(
      wj, hj, fmt, scaling, precision="float32"
    )[0],
    "qjax float64 (jitted)": lambda: gptq.gptq(
      wj, hj, fmt, scaling, precision="float64"
    )[0],
    "qwix eager": lambda: gptq_core.quantize_weight(wt, ht, how)[0],
    "qwix jax.jit": lambda: qwix_jit(wt, ht),
  }
  out = {}
  for name, fn in ways.items():
    jax.clear_caches()
    out[name] = {"cold": _once(fn)[0], "warm": []}
  for _ in range(repeats):
    for name, fn in ways.items():
      out[name]["warm"].append(_once(fn)[0])
  return out


def bench_magr(w, h, iters, repeats, numpy_iters):
  """Seconds per iteration: (t(2k iterations) - t(k)) / k, so the one-off
  eigvalsh and transfers cancel out of both sides."""
  row = {}
  for projection in ("pivot", "sort"):
    t1, t2 = (
      median_seconds(
        lambda p=projection, k=k: magr.magr(w, h, iters=k, projection=p),
        repeats,
      )
      for k in (iters, 2 * iters)
    )
    row[f"{projection}_s_per_iter"] = (t2 - t1) / iters
  t1, _ = _once(lambda: numpy_magr(w, h, 1e-3, numpy_iters))
  t2, _ = _once(lambda: numpy_magr(w, h, 1e-3, 2 * numpy_iters))
  row["numpy_s_per_iter"] = (t2 - t1) / numpy_iters
  return row


def _rss_mb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_memory(windows=16, window=512):
  import qjax
  from qjax import calibration, datasets
  from qjax import metrics as qmetrics
  from qjax.models import smollm2

  params = smollm2.load_params()
  ids = smollm2.tokenizer().encode(datasets.kjv_text()[-8 * window * windows :])
  batches = [
    jnp.asarray(w[None])
    for w in qmetrics.token_windows(ids.ids, window, windows, from_end=True)
  ]
  recipe = qjax.Recipe(
    (
      qjax.rule(
        "kernel",
        "int4",
        formats.per_block(128, ragged=True),
        method="gptq",
      ),
    )
  )
  model = smollm2.block_model(params)
  before = _rss_mb()
  calibration.quantize_sequential(
    params, recipe, model, batches, progress=False
  )
  grown = _rss_mb() - before
  hidden, ffn = 576, 1536
  block = windows * window * hidden * 4 / 2**20
  widest = windows * window * ffn * 4 / 2**20
  return {
    "peak_rss_growth_mb": grown,
    "one_block_activations_mb": block,
    "one_block_widest_intermediate_mb": widest,
    "all_blocks_activations_mb": block * len(model.blocks),
  }


def _print_like_for_like(rows):
  import statistics

  q = rows["qjax float32 (jitted)"]
  q_warm = statistics.median(q["warm"])
  print(f"GPTQ int4 per channel, {SHAPES[0][0]}x{SHAPES[0][1]}")
  print(
    "| way | cold s | warm s: median (min-max) | cold / qjax f32 cold "
    "| warm / qjax f32 warm |"
  )
  print("|---|---|---|---|---|")
  for name, r in rows.items():
    warm = statistics.median(r["warm"])
    print(
      f"| {name} | {r['cold']:.2f} | {warm:.3f} ({min(r['warm']):.3f}-"
      f"{max(r['warm']):.3f}) | {r['cold'] / q['cold']:.1f}x | "
      f"{warm / q_warm:.1f}x |"
    )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--magr_iters", type=int, default=20)
  parser.add_argument("--qwix", action="store_true")
  parser.add_argument(
    "--qwix_big", action="store_true", help="qwix on 4096x4096 (~10 min)"
  )
  parser.add_argument("--memory", action="store_true")
  parser.add_argument("--like_for_like", action="store_true")
  parser.add_argument(
    "--skip_gptq", action="store_true", help="only MagR (and --memory)"
  )
  args = parser.parse_args()
  print(f"jax {jax.__version__}, {jax.devices()[0].platform}")
  if args.like_for_like:
    _print_like_for_like(like_for_like(*_layer(*SHAPES[0]), args.repeats))
    return
  print("\nGPTQ int4 per channel")
  print(
    "| layer | qjax s (float64) | qjax s (float32) | slow ref s | ratio | "
    "qwix s | ratio | loss qjax / its RTN | loss qwix / its RTN |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  for n_in, n_out in () if args.skip_gptq else SHAPES:
    w, h = _layer(n_in, n_out)
    big = n_in * n_out > 4_000_000
    with_qwix = args.qwix and (not big or args.qwix_big)
    r = bench_gptq(w, h, args.repeats, True, with_qwix)
    slow = f"{r['slow_s']:.2f} | {r['slow_s'] / r['qjax_s']:.0f}x"
    qwix = "- | -"
    qwix_loss = "-"
    if with_qwix:
      qwix = f"{r['qwix_s']:.1f} | {r['qwix_s'] / r['qjax_s']:.0f}x"
      qwix_loss = f"{r['qwix_loss'] / r['qwix_rtn_loss']:.3f}"
    print(
      f"| {n_in}x{n_out} | {r['qjax_s']:.3f} | {r['qjax_f32_s']:.3f} | "
      f"{slow} | {qwix} | "
      f"{r['qjax_loss'] / r['rtn_loss']:.3f} | {qwix_loss} |"
    )
    if "slow_loss" in r:
      rel = abs(r["slow_loss"] - r["qjax_loss"]) / r["slow_loss"]
      print(f"  (slow reference layer loss differs from qjax by {rel:.1e})")
  print(f"\nMagR, seconds per iteration ({args.magr_iters} iterations)")
  print(
    "| layer | jitted pivot | jitted sort | NumPy f64 sort | NumPy / pivot |"
  )
  print("|---|---|---|---|---|")
  for n_in, n_out in SHAPES:
    w, h = _layer(n_in, n_out)
    big = n_in * n_out > 4_000_000
    iters = max(2, args.magr_iters // 4) if big else args.magr_iters
    r = bench_magr(w, h, iters, args.repeats, 3 if big else iters)
    print(
      f"| {n_in}x{n_out} | {r['pivot_s_per_iter']:.4f} | "
      f"{r['sort_s_per_iter']:.4f} | {r['numpy_s_per_iter']:.4f} | "
      f"{r['numpy_s_per_iter'] / r['pivot_s_per_iter']:.1f}x |"
    )
  if args.memory:
    m = bench_memory()
    print("\nCalibration memory (SmolLM2, 16 x 512 tokens, GPTQ int4 g128)")
    for k, v in m.items():
      print(f"  {k}: {v:.0f}")


if __name__ == "__main__":
  main()
