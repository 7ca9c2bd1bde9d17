"""Fault injection: every file and every manifest field of a small checkpoint
is damaged in turn; restore must raise or give exact values, never wrong
numbers."""

import json
import pathlib
import shutil
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

import qjax
from qjax import formats
from qjax.io import checkpoint, manifest


def _tree():
  k = jax.random.split(jax.random.key(0), 4)
  params = {
    "a": {"kernel": jax.random.normal(k[0], (64, 24))},
    "b": {
      "kernel": jax.random.normal(k[1], (32, 16)),
      "bias": jax.random.normal(k[2], (16,)),
    },
    "c": {"kernel": jax.random.normal(k[3], (32, 8))},
    "z": {"empty": jnp.zeros((0, 4))},
  }
  recipe = qjax.Recipe(
    (
      qjax.rule("a/kernel", "nvfp4"),
      qjax.rule("c/kernel", "int4", method="pipe", order=2, keep=0.5),
      qjax.rule("kernel", "uint3", formats.per_block(16, zero_point=True)),
    )
  )
  return qjax.quantize(params, recipe)


def _values(tree):
  """Everything a user reads back: structure, kinds, static metadata and
  the dequantized values."""
  leaves = jax.tree.leaves(tree, is_leaf=qjax.qtensor.is_quantized)
  out = [jax.tree.structure(tree, is_leaf=qjax.qtensor.is_quantized)]
  for x in leaves:
    if qjax.qtensor.is_quantized(x):
      out += [type(x), repr(x), np.asarray(x.dequantize()), str(x.dtype)]
      out += [np.asarray(a) for a in jax.tree.leaves(x)]
    else:
      out += [np.asarray(x), str(x.dtype)]
  return out


def _same(a, b) -> bool:
  if len(a) != len(b):
    return False
  for x, y in zip(a, b, strict=True):
    if isinstance(x, np.ndarray):
      if not (
        isinstance(y, np.ndarray)
        and x.dtype == y.dtype
        and np.array_equal(x, y, equal_nan=True)
      ):
        return False
    elif x != y:
      return False
  return True


class FaultInjectionTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = pathlib.Path(tempfile.mkdtemp())
    cls.tree = _tree()
    cls.good = cls.root / "good"
    checkpoint.save(cls.good, cls.tree)
    cls.want = _values(cls.tree)
    cls.case = 0

  def _restore_damaged(self, damage) -> str:
    """'error' or 'exact' after `damage(path)` on a fresh copy; fails the
    test on anything else."""
    type(self).case += 1
    path = self.root / f"case{self.case}"
    shutil.copytree(self.good, path)
    damage(path)
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = checkpoint.restore(path)
    except (ValueError, FileNotFoundError):
      return "error"
    if not _same(_values(got), self.want):
      self.fail(f"silent wrong result after {damage.__doc__}")
    shutil.rmtree(path)
    return "exact"

  def test_every_file_flipped_truncated_or_removed(self):
    files = sorted(
      p.relative_to(self.good) for p in self.good.rglob("*") if p.is_file()
    )
    self.assertGreater(len(files), 10)
    outcomes = {}
    for rel in files:
      size = (self.good / rel).stat().st_size
      for at in sorted({0, size // 2, max(size - 1, 0)}):

        def flip(path, rel=rel, at=at):
          data = bytearray((path / rel).read_bytes())
          if data:
            data[at] ^= 0x5A
          (path / rel).write_bytes(bytes(data))

        flip.__doc__ = f"flipping byte {at} of {rel}"
        outcomes.setdefault(rel, []).append(self._restore_damaged(flip))

      def truncate(path, rel=rel):
        data = (path / rel).read_bytes()
        (path / rel).write_bytes(data[: len(data) // 2])

      truncate.__doc__ = f"truncating {rel}"
      outcomes[rel].append(self._restore_damaged(truncate))

      def remove(path, rel=rel):
        (path / rel).unlink()

      remove.__doc__ = f"removing {rel}"
      outcomes[rel].append(self._restore_damaged(remove))
    # Any damage to the manifest or its digest is an error; the rest is an
    # error or harmless (orbax keeps two copies of the data, and some
    # metadata it does not need to restore).
    for rel in (manifest.MANIFEST, manifest.DIGEST):
      self.assertEqual(set(outcomes[pathlib.Path(rel)]), {"error"}, rel)
    errors = sum(o.count("error") for o in outcomes.values())
    self.assertGreater(errors, len(files))

  def test_every_manifest_field_edited(self):
    doc = json.loads((self.good / manifest.MANIFEST).read_text())
    edits = list(_field_edits(doc))
    edits += [
      ("leaves: []", lambda d: d.__setitem__("leaves", [])),
      ("swapped paths", _swap_paths),
      ("a duplicated leaf", lambda d: d["leaves"].append(d["leaves"][0])),
    ]
    self.assertGreater(len(edits), 100)
    for what, edit in edits:

      def damage(path, edit=edit):
        d = json.loads((path / manifest.MANIFEST).read_text())
        edit(d)
        (path / manifest.MANIFEST).write_text(json.dumps(d, indent=1))

      damage.__doc__ = f"editing the manifest: {what}"
      self.assertEqual(self._restore_damaged(damage), "error", what)

  def test_fields_are_checked_even_with_a_matching_digest(self):
    # A hand-made manifest (its digest recomputed) that points outside the
    # checkpoint, repeats a path or names an unknown kind is still refused.
    for what, edit in (
      (
        "part",
        lambda d: d["leaves"][0].update(part="../good/arrays/part00000"),
      ),
      ("absolute part", lambda d: d["leaves"][0].update(part="/etc")),
      ("duplicate", lambda d: d["leaves"].append(d["leaves"][0])),
      ("kind", lambda d: d["leaves"][0].update(kind="pickle")),
      ("shape", lambda d: d["leaves"][0].update(shape=[-1, 3])),
    ):

      def forge(path, edit=edit):
        d = json.loads((path / manifest.MANIFEST).read_text())
        edit(d)
        manifest.write(path, d)

      forge.__doc__ = f"a forged manifest: {what}"
      self.assertEqual(self._restore_damaged(forge), "error", what)


def _field_edits(doc, prefix=()):
  """(description, edit) for every scalar field of the manifest's leaves."""

  def at(d, keys):
    for k in keys:
      d = d[k]
    return d

  def walk(node, keys):
    if isinstance(node, dict):
      for k, v in node.items():
        yield from walk(v, (*keys, k))
    elif isinstance(node, list):
      for i, v in enumerate(node):
        yield from walk(v, (*keys, i))
    else:
      yield keys, node

  for keys, value in walk(doc, ()):
    if isinstance(value, bool):
      new = not value
    elif isinstance(value, int):
      new = value + 1
    elif isinstance(value, float):
      new = value * 2 + 1
    elif isinstance(value, str):
      new = value[:-1] + ("x" if value[-1:] != "x" else "y") if value else "x"
    else:
      new = 0

    def edit(d, keys=keys, new=new):
      at(d, keys[:-1])[keys[-1]] = new

    yield "/".join(map(str, keys)), edit


def _swap_paths(d):
  a, b = d["leaves"][0], d["leaves"][1]
  a["path"], b["path"] = b["path"], a["path"]


if __name__ == "__main__":
  absltest.main()
