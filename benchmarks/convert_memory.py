"""Peak host memory of checkpoint conversion: streamed vs whole-tree.

  python -m benchmarks.convert_memory [--layers=2,10,30] [--format=mxfp4]
  python -m benchmarks.convert_memory --model=gemma3

SmolLM2 read from its GGUF, truncated to the first `layers` blocks (the
token embedding, the largest leaf, is always there); or the whole Gemma 3
270M GGUF through the llama.cpp layout (qjax.io.sources.llama_names; its
token embedding, 640 MiB in float32, is the largest leaf). Each way runs in a
fresh process and reports its peak resident memory (ru_maxrss) minus the
same process's resident memory after JAX has started and run a first
computation (the baseline every way pays):
  streamed  qjax.io.convert.convert (one leaf and one orbax part at a time)
  whole     load every float leaf, qjax.quantize, qjax.io.checkpoint.save
Streaming is working when its peak stays flat as layers grow, a multiple
of the largest leaf, while the whole-tree peak grows with the model.
Measured (docs/convert.md): SmolLM2 262-266 MiB at 2-30 layers, 2.46x its
108 MiB embedding; Gemma 3 1308 MiB, 2.04x its 640 MiB embedding.
"""

import argparse
import json
import subprocess
import sys
import tempfile

_CHILD = r"""
import json, resource, sys, pathlib
import jax, jax.numpy as jnp
jax.numpy.ones(4).block_until_ready()
def rss():
  for line in open("/proc/self/status"):
    if line.startswith("VmRSS:"):
      return int(line.split()[1]) * 1024
import qjax
from qjax.io import checkpoint, convert, sources
from qjax.models import smollm2
base = rss()
way, layers, fmt, out, model = sys.argv[1:6]
recipe = qjax.Recipe((qjax.rule("kernel", fmt, axis=-2),))
if model == "gemma3":
  from qjax.models import gemma3
  src = sources.open_source(gemma3.gguf_path(), "llama")
else:
  src = sources.GGUFSource(smollm2.gguf_path(), smollm2.gguf_names(int(layers)))
if way == "streamed":
  convert.convert(src, recipe, out, progress=False)
else:
  params = {}
  for path in src.specs():
    node = params
    *parents, last = path.split("/")
    for k in parents:
      node = node.setdefault(k, {})
    node[last] = src.read(path)
  q = qjax.quantize(params, recipe)
  checkpoint.save(out, q)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
specs = src.specs()
sizes = [s.size * s.dtype.itemsize for s in specs.values()]
print(json.dumps({"baseline": base, "peak": peak, "largest_leaf": max(sizes),
                  "float_bytes": sum(sizes)}))
"""


def measure(way: str, layers: int, fmt: str, model: str = "smollm2") -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    out = subprocess.run(
      [
        sys.executable,
        "-c",
        _CHILD,
        way,
        str(layers),
        fmt,
        f"{tmp}/out",
        model,
      ],
      check=True,
      capture_output=True,
      text=True,
    ).stdout
  return json.loads(out.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--layers", default="2,10,30")
  parser.add_argument("--format", default="mxfp4")
  parser.add_argument(
    "--model", default="smollm2", choices=("smollm2", "gemma3")
  )
  args = parser.parse_args()
  mib = 1 << 20
  if args.model == "gemma3":
    args.layers = "18"
  print(
    f"{args.model} GGUF, RTN {args.format}; peak memory above the JAX baseline"
  )
  print(
    "| layers | float model (MiB) | streamed (MiB) | whole tree (MiB) "
    "| streamed / largest leaf |"
  )
  print("|---|---|---|---|---|")
  for layers in (int(n) for n in args.layers.split(",")):
    got = {
      way: measure(way, layers, args.format, args.model)
      for way in ("streamed", "whole")
    }
    extra = {way: m["peak"] - m["baseline"] for way, m in got.items()}
    m = got["streamed"]
    print(
      f"| {layers} | {m['float_bytes'] / mib:.0f} | "
      f"{extra['streamed'] / mib:.0f} | {extra['whole'] / mib:.0f} | "
      f"{extra['streamed'] / m['largest_leaf']:.2f} |"
    )
  print(
    f"largest leaf {m['largest_leaf'] / mib:.0f} MiB (the token embedding); "
    f"baseline {m['baseline'] / mib:.0f} MiB"
  )


if __name__ == "__main__":
  main()
