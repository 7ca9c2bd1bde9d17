"""qjax's layers import one way: no cycle, nothing upward.

Every import of a qjax module (module level or inside a function) is read
from the source with `ast`, so a lazy import cannot hide a cycle.
"""

import ast
import pathlib
import tempfile

from absl.testing import absltest

import qjax

# The package that imports (a clone's qjax/, or the installed one).
ROOT = pathlib.Path(qjax.__file__).resolve().parent

# Lower number = lower layer. A module may import its own package and any
# lower layer; a module not listed takes its package's entry.
LAYERS = {
  "qjax.version": 0,
  "qjax.paths": 0,
  "qjax.formats": 1,
  "qjax.qtensor": 2,
  "qjax.linear_layers": 2,
  "qjax.kernels": 3,
  "qjax.quantizers": 3,
  "qjax.transforms": 4,
  "qjax.methods": 5,
  "qjax.recipe": 6,
  "qjax.dispatch": 7,
  "qjax.intercept": 7,
  "qjax.calibration": 8,
  "qjax.activations.quantizer": 8.2,
  "qjax.activations.observers": 8.3,
  "qjax.activations.rules": 8.3,
  "qjax.activations.hooks": 8.4,
  # calibrate runs whole models through qjax.apply; the package's
  # __init__ exports it
  "qjax.activations": 10.6,
  "qjax.api": 9,
  "qjax.linen": 10,
  "qjax.nnx_apply": 10,
  "qjax.inference": 10.5,
  "qjax.metrics": 10,
  "qjax.models": 11,
  "qjax.io": 12,
  "qjax.datasets": 12,
  "qjax": 13,  # the package's __init__: the public surface
}


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT.parent).with_suffix("").parts
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def modules() -> dict[str, pathlib.Path]:
  return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports(path: pathlib.Path, known: set[str]) -> set[str]:
  """qjax modules `path` imports (`from a import b` counts a.b if it is a
  module, else a)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith("qjax")}
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      base = node.module or ""
      if not base.startswith("qjax"):
        continue
      for a in node.names:
        sub = f"{base}.{a.name}"
        out.add(sub if sub in known else base)
  return out


def layer(name: str) -> tuple[str, int]:
  """(the LAYERS key that governs `name`, its rank)."""
  probe = name
  while probe not in LAYERS:
    probe = probe.rpartition(".")[0]
  return probe, LAYERS[probe]


class LayersTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.modules = modules()
    known = set(self.modules)
    self.graph = {m: imports(p, known) - {m} for m, p in self.modules.items()}

  def test_every_module_has_a_layer(self):
    for m in self.modules:
      self.assertIn(layer(m)[0], LAYERS, m)

  def test_no_upward_import(self):
    wrong = []
    for m, deps in self.graph.items():
      key, rank = layer(m)
      for d in deps:
        dkey, drank = layer(d)
        same_package = dkey == key
        if drank > rank or (drank == rank and not same_package):
          wrong.append(f"{m} ({key}, {rank}) imports {d} ({dkey}, {drank})")
    self.assertEqual(wrong, [])

  def test_no_cycle(self):
    state, cycles = {}, []

    def visit(m, stack):
      state[m] = "open"
      for d in sorted(self.graph.get(m, ())):
        if state.get(d) == "open":
          cycles.append(" -> ".join([*stack[stack.index(d) :], d]))
        elif d not in state:
          visit(d, [*stack, d])
      state[m] = "done"

    for m in sorted(self.graph):
      if m not in state:
        visit(m, [m])
    self.assertEqual(cycles, [])

  def test_storage_imports_no_algorithm(self):
    reach, todo = set(), ["qjax.io.checkpoint"]
    while todo:
      for d in self.graph[todo.pop()]:
        if d not in reach:
          reach.add(d)
          todo.append(d)
    algorithms = sorted(
      d
      for d in reach
      if d.startswith(("qjax.transforms", "qjax.quantizers", "qjax.methods"))
    )
    self.assertEqual(algorithms, [])

  def test_the_check_sees_lazy_imports(self):
    # A function-level import counts: a cycle hidden in a function is one.
    with tempfile.TemporaryDirectory() as d:
      tmp = pathlib.Path(d) / "lazy.py"
      tmp.write_text("def f():\n  from qjax import api\n")
      self.assertEqual(imports(tmp, {"qjax.api"}), {"qjax.api"})

  def test_no_top_level_module_shadows_a_library(self):
    import sys

    shadows = {"flax", "eval", "io", "jax", "numpy", "json", "math"}
    tops = {p.stem for p in ROOT.glob("*.py")} - {"__init__"}
    clash = sorted((tops & shadows) | (tops & set(sys.builtin_module_names)))
    self.assertEqual(clash, [])


if __name__ == "__main__":
  absltest.main()
