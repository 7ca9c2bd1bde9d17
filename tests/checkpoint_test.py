"""orbax checkpoints of quantized trees: exact round trips, loud failures."""

import os
import pathlib
import tempfile
from unittest import mock

import jax
import numpy as np
from absl.testing import absltest

import qjax
from qjax import checkpoint, formats
from qjax.transforms import residual


def _qtree():
  k = jax.random.split(jax.random.key(0), 3)
  params = {
    "a": {"kernel": jax.random.normal(k[0], (64, 24))},
    "b": {
      "kernel": jax.random.normal(k[1], (32, 16)),
      "bias": jax.random.normal(k[2], (16,)),
    },
  }
  recipe = qjax.Recipe(
    (
      qjax.rule("a/kernel", "nvfp4"),
      qjax.rule("kernel", "uint3", formats.per_block(16, zero_point=True)),
    )
  )
  return qjax.quantize(params, recipe), recipe


class CheckpointTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.dir = pathlib.Path(tempfile.mkdtemp())

  def test_round_trip_is_exact_without_the_recipe(self):
    q, recipe = _qtree()
    checkpoint.save(self.dir / "ck", q, recipe=recipe)
    back = checkpoint.restore(self.dir / "ck")
    self.assertEqual(
      jax.tree.structure(back, is_leaf=qjax.qtensor.is_qtensor),
      jax.tree.structure(q, is_leaf=qjax.qtensor.is_qtensor),
    )
    for x, y in zip(jax.tree.leaves(q), jax.tree.leaves(back), strict=True):
      np.testing.assert_array_equal(x, y)
      self.assertEqual(x.dtype, y.dtype)
    qa, ba = q["a"]["kernel"], back["a"]["kernel"]
    self.assertEqual(
      (qa.fmt, qa.scaling, qa.shape), (ba.fmt, ba.scaling, ba.shape)
    )
    meta = checkpoint.load_metadata(self.dir / "ck")
    self.assertEqual(meta["qjax_version"], qjax.__version__)
    self.assertIn("a/kernel", meta["recipe"])

  def test_residual_expansions_round_trip(self):
    params = {
      "d": {"kernel": jax.random.normal(jax.random.key(1), (48, 20))},
      "e": {"kernel": jax.random.normal(jax.random.key(2), (64, 16))},
    }
    recipe = qjax.Recipe(
      (
        qjax.rule(
          "d/",
          "int4",
          formats.per_channel(),
          method="pipe",
          pipe_order=3,
          pipe_keep=0.5,
        ),
        qjax.rule("e/", "mxfp4", method="pipe", pipe_order=2),
      )
    )
    q = qjax.quantize(params, recipe)
    checkpoint.save(self.dir / "pipe", q, recipe=recipe)
    back = checkpoint.restore(self.dir / "pipe")
    for name in ("d", "e"):
      a, b = q[name]["kernel"], back[name]["kernel"]
      self.assertIsInstance(b, residual.Expansion)
      self.assertEqual(jax.tree.structure(a), jax.tree.structure(b))
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
      self.assertEqual([t.fmt for t in a.terms], [t.fmt for t in b.terms])
      np.testing.assert_array_equal(a.dequantize(), b.dequantize())
    self.assertIsNone(back["e"]["kernel"].keep[1])

  def _damage_data_files(self, path, how):
    # orbax keeps per-process OCDBT data and a merged copy: damage both.
    for victim in (path / "arrays").rglob("*"):
      if not (victim.is_file() and victim.parent.name == "d"):
        continue
      data = victim.read_bytes()
      mid = len(data) // 2
      if how == "truncate":
        victim.write_bytes(data[:mid])
      else:
        victim.write_bytes(
          data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :]
        )

  def test_truncated_or_edited_checkpoint_is_an_error(self):
    q, _ = _qtree()
    for how in ("truncate", "edit"):
      path = self.dir / how
      checkpoint.save(path, q)
      self._damage_data_files(path, how)
      with self.assertRaisesRegex(ValueError, "corrupt|cannot read"):
        checkpoint.restore(path)

  def test_missing_metadata_is_incomplete(self):
    q, _ = _qtree()
    checkpoint.save(self.dir / "ck", q)
    os.remove(self.dir / "ck" / "qjax.json")
    with self.assertRaisesRegex(ValueError, "not a complete qjax checkpoint"):
      checkpoint.restore(self.dir / "ck")

  def test_interrupted_save_leaves_nothing(self):
    q, _ = _qtree()
    # Interrupt after orbax has finished writing the arrays, just before
    # the manifest; patching json.dumps itself would also break orbax's
    # own metadata thread and make the test race with it.
    with mock.patch.object(
      checkpoint, "_write_manifest", side_effect=KeyboardInterrupt
    ):
      with self.assertRaises(KeyboardInterrupt):
        checkpoint.save(self.dir / "ck", q)
    self.assertEqual(list(self.dir.iterdir()), [])

  def test_refuses_to_overwrite(self):
    q, _ = _qtree()
    checkpoint.save(self.dir / "ck", q)
    with self.assertRaises(FileExistsError):
      checkpoint.save(self.dir / "ck", q)


if __name__ == "__main__":
  absltest.main()
