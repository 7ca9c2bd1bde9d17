"""Timing helpers shared by the benchmarks."""

import statistics
import time

import jax


def interleaved_median_seconds(fns, repeats: int) -> list[float]:
  """Median wall time of each fn() in `fns`, timed in turn within each
  repeat, so that a baseline and the code it judges see the same moments of
  a noisy machine. Each fn is warmed up (and compiled) once first; every
  call waits for JAX's asynchronous results."""
  for fn in fns:
    jax.block_until_ready(fn())
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, samples in zip(fns, times, strict=True):
      start = time.perf_counter()
      jax.block_until_ready(fn())
      samples.append(time.perf_counter() - start)
  return [statistics.median(samples) for samples in times]


def median_seconds(fn, repeats: int) -> float:
  """Median wall time of fn() over `repeats` runs, after one warm-up run."""
  return interleaved_median_seconds([fn], repeats)[0]
