"""Console entry points (setup.cfg): qjax-quantize, qjax-sweep,
qjax-convert and qjax-export run experiments.quantize, .sweep,
.convert_checkpoint and .export as `python -m` would, from any directory.

A --config (or --configs entry) that is not an existing file may name a
packaged config: `--config=smollm2:method=rtn,bits=4` reads configs/smollm2.py
from the installed package. `--help` prints the program's flags, then the
methods, formats and config fields.
"""

import pathlib
import runpy
import sys

import configs

CONFIG_DIR = pathlib.Path(configs.__file__).resolve().parent
PROGRAMS = {
  "quantize": "experiments.quantize",
  "sweep": "experiments.sweep",
  "convert": "experiments.convert_checkpoint",
  "export": "experiments.export",
}


def packaged_configs() -> list[str]:
  return sorted(
    p.stem
    for p in CONFIG_DIR.glob("*.py")
    if p.stem not in ("__init__", "common")
  )


def resolve_config(entry: str) -> str:
  """'smollm2:bits=4' -> '<package>/configs/smollm2.py:bits=4' when no file
  'smollm2' exists here; an existing path (or a name qjax lacks) stays."""
  path, sep, arg = entry.partition(":")
  if pathlib.Path(path).exists():
    return entry
  name = pathlib.Path(path).stem if path.startswith("configs/") else path
  name = name.removesuffix(".py")
  if name in packaged_configs():
    return f"{CONFIG_DIR / (name + '.py')}{sep}{arg}"
  return entry


DEFAULT_CONFIG = {"quantize": "smollm2", "convert": "convert"}


def rewrite_argv(argv: list[str], program: str) -> list[str]:
  """--config values through resolve_config, and each comma-separated
  piece of --configs that names a config; the program's default config
  (a path relative to a clone) becomes the packaged file."""
  out = []
  for a in argv:
    if a.startswith("--config="):
      a = "--config=" + resolve_config(a[len("--config=") :])
    elif a.startswith("--configs="):
      pieces = a[len("--configs=") :].split(",")
      a = "--configs=" + ",".join(resolve_config(p) for p in pieces)
    out.append(a)
  default = DEFAULT_CONFIG.get(program)
  if default and not any(a.startswith("--config=") for a in out[1:]):
    out.insert(1, "--config=" + resolve_config(default))
  return out


def reference() -> str:
  """Methods, formats and config fields, for --help."""
  import qjax
  from configs import common
  from experiments import run_lib
  from qjax.formats import presets

  methods = ", ".join(sorted(run_lib.METHODS))
  pre = ", ".join(f"{p}+" for p in run_lib.PRE_TRANSFORMS)
  formats = ", ".join(sorted(presets.PRESETS))
  blocks = ", ".join(sorted(presets.BLOCK_FORMATS))
  base = common.base_config("smollm2")
  fields = []
  for path in common._field_paths(base):
    value = base
    for key in path.split("."):
      value = value[key]
    fields.append(f"{path} = {value!r}")
  return (
    f"qjax {qjax.__version__}\n\n"
    f"methods (config.method): {methods}; prefixes {pre}\n\n"
    f"formats (config.format): {formats}, nf4, eXmY (e3m2 ...), intN / "
    f"uintN; block formats: {blocks}\n\n"
    f"packaged configs (--config=NAME[:arg]): {', '.join(packaged_configs())}"
    f"\n\nconfig fields (--config.FIELD=VALUE or NAME:FIELD=VALUE,...):\n  "
    + "\n  ".join(fields)
  )


def _run(program: str) -> None:
  sys.argv = rewrite_argv(sys.argv, program)
  wants_help = any(a in ("--help", "-h", "--helpfull") for a in sys.argv)
  try:
    runpy.run_module(PROGRAMS[program], run_name="__main__", alter_sys=True)
  except SystemExit as e:
    if not wants_help:
      raise
    if program in ("quantize", "sweep"):
      print("\n" + reference())
    # absl ends --help with status 1; asking for help is not a failure.
    raise SystemExit(0) from e


def quantize():
  _run("quantize")


def sweep():
  _run("sweep")


def convert():
  _run("convert")


def export():
  _run("export")
