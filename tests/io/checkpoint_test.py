"""orbax checkpoints of quantized trees: exact round trips, loud failures."""

import dataclasses
import json
import os
import pathlib
import socket
import tempfile
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

import qjax
from qjax import formats
from qjax.io import checkpoint, manifest
from qjax.transforms import residual


@qjax.register_composite
@dataclasses.dataclass(frozen=True)
class _LowRankPlusQ(qjax.CompositeLeaf):
  """A leaf type written here: W ~ Q + U V (a quantized part and a float
  low-rank correction), stored through the leaf protocol only."""

  q: qjax.QTensor
  u: jax.Array
  v: jax.Array
  kind = "test_low_rank_plus_q"

  def dequantize(self, dtype=None):
    return (self.q.dequantize(jnp.float32) + self.u @ self.v).astype(
      dtype or self.q.dtype
    )

  @property
  def size(self):
    return self.q.size

  @property
  def nbytes(self):
    return self.q.nbytes + self.u.nbytes + self.v.nbytes

  @property
  def bits_per_weight(self):
    return 8 * self.nbytes / self.size

  def parts(self):
    return {"q": self.q, "u": self.u, "v": self.v}

  def meta(self):
    return {"rank": int(self.u.shape[1])}

  @classmethod
  def from_parts(cls, meta, parts):
    if parts["u"].shape[1] != meta["rank"]:
      raise ValueError("rank does not match")
    return cls(parts["q"], parts["u"], parts["v"])

  def describe(self, activation_bits):
    return {"format": str(self.q.fmt), "scaling": None, "macs": 0, "bops": 0}


jax.tree_util.register_dataclass(
  _LowRankPlusQ, data_fields=["q", "u", "v"], meta_fields=[]
)


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
          order=3,
          keep=0.5,
        ),
        qjax.rule("e/", "mxfp4", method="pipe", order=2),
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
    # A format-2 checkpoint (composites described by 'terms') still reads.
    doc = json.loads((self.dir / "pipe" / "qjax.json").read_text())
    doc["format_version"] = 2
    for e in doc["leaves"]:
      meta, parts = e.pop("meta"), e.pop("parts")
      e.update(
        shape=meta["shape"],
        dtype=meta["dtype"],
        terms=[parts[f"t{k}"] for k in range(meta["order"])],
      )
    (self.dir / "pipe" / "qjax.json").write_text(json.dumps(doc))
    (self.dir / "pipe" / "qjax.sha256").unlink()  # format 2 had none
    with self.assertWarnsRegex(UserWarning, "no manifest checksum"):
      old = checkpoint.restore(self.dir / "pipe")
    np.testing.assert_array_equal(
      old["d"]["kernel"].dequantize(), q["d"]["kernel"].dequantize()
    )
    np.testing.assert_array_equal(
      old["d"]["kernel"].keep[1], q["d"]["kernel"].keep[1]
    )

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

  def test_a_composite_leaf_written_outside_qjax_round_trips(self):
    w = jax.random.normal(jax.random.key(4), (32, 16))
    q = qjax.rtn(w, formats.get("int3"), formats.per_channel())
    u = jax.random.normal(jax.random.key(5), (32, 2))
    v = jax.random.normal(jax.random.key(6), (2, 16))
    tree = {"layer": {"kernel": _LowRankPlusQ(q, u, v)}}
    path = pathlib.Path(tempfile.mkdtemp()) / "ckpt"
    checkpoint.save(path, tree)
    back = checkpoint.restore(path)["layer"]["kernel"]
    self.assertIsInstance(back, _LowRankPlusQ)
    np.testing.assert_array_equal(
      back.dequantize(), tree["layer"]["kernel"].dequantize()
    )
    np.testing.assert_array_equal(back.q.codes, q.codes)
    stats = qjax.stats(tree)["layer/kernel"]
    self.assertEqual(stats["bytes"], q.nbytes + u.nbytes + v.nbytes)
    self.assertEqual(stats["format"], "int3")
    with self.assertRaisesRegex(ValueError, "already|taken"):

      @qjax.register_composite
      @dataclasses.dataclass(frozen=True)
      class _Clash(qjax.CompositeLeaf):
        kind = "test_low_rank_plus_q"

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
    with mock.patch.object(manifest, "write", side_effect=KeyboardInterrupt):
      with self.assertRaises(KeyboardInterrupt):
        checkpoint.save(self.dir / "ck", q)
    self.assertEqual(list(self.dir.iterdir()), [])

  def test_a_partial_directory_is_removed_only_when_it_is_ours(self):
    q, _ = _qtree()
    mine = self.dir / "user.partial"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with self.assertRaisesRegex(FileExistsError, "not made by a qjax writer"):
      checkpoint.save(self.dir / "user", q)
    self.assertEqual((mine / "notes.txt").read_text(), "keep me")
    # A live writer (this very process) holds the path: a second is refused.
    busy = self.dir / "busy.partial"
    busy.mkdir()
    (busy / "WRITER").write_text(
      json.dumps({"host": socket.gethostname(), "pid": os.getpid()})
    )
    with self.assertRaisesRegex(FileExistsError, "being written by process"):
      checkpoint.save(self.dir / "busy", q)
    self.assertTrue(busy.exists())
    # Two writers in one process, interleaved: the second cannot start.
    with checkpoint.Writer(self.dir / "twice") as first:
      with self.assertRaises(FileExistsError):
        with checkpoint.Writer(self.dir / "twice"):
          pass
      first.add(("x",), np.ones(3, np.float32))
    np.testing.assert_array_equal(
      checkpoint.restore(self.dir / "twice")["x"], 1
    )

  def test_dtypes_round_trip_or_are_refused_at_save(self):
    tree = {
      "f32": np.arange(4, dtype=np.float32),
      "bf16": jnp.arange(4, dtype=jnp.bfloat16),
      "f16": np.arange(4, dtype=np.float16),
      "i8": np.arange(4, dtype=np.int8),
      "u32": np.arange(4, dtype=np.uint32),
      "bool": np.array([True, False]),
      "empty": np.zeros((0, 3), np.float32),
    }
    checkpoint.save(self.dir / "dt", tree)
    back = checkpoint.restore(self.dir / "dt")
    for k, v in tree.items():
      self.assertEqual(np.dtype(back[k].dtype), np.dtype(v.dtype), k)
      np.testing.assert_array_equal(back[k], v)
    for bad in (np.zeros(3, np.float64), np.zeros(3, np.int64)):
      with self.assertRaisesRegex(ValueError, "'x'.*jax_enable_x64"):
        checkpoint.save(self.dir / "bad", {"x": bad})
      self.assertEqual(sorted(p.name for p in self.dir.iterdir()), ["dt"])

  def test_zero_size_leaves_end_to_end(self):
    params = {
      "e": {"kernel": jnp.zeros((0, 8))},
      "k": {"kernel": jnp.ones((8, 8))},
    }
    recipe = qjax.Recipe((qjax.rule("kernel", "int4"),))
    self.assertIn("zero-size", qjax.plan(params, recipe)["e/kernel"])
    q = qjax.quantize(params, recipe)
    self.assertIs(q["e"]["kernel"], params["e"]["kernel"])
    checkpoint.save(self.dir / "z", q)
    back = checkpoint.restore(self.dir / "z")
    self.assertEqual(back["e"]["kernel"].shape, (0, 8))
    with self.assertRaisesRegex(ValueError, "zero-size"):
      qjax.rtn(jnp.zeros((0, 8)), formats.get("int4"), formats.per_channel())

  def test_restore_onto_an_explicit_axes_mesh_dequantizes(self):
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    from qjax import kernels

    auto = jax.make_mesh((4,), ("x",), axis_types=(AxisType.Auto,))
    w = jax.device_put(
      jax.random.normal(jax.random.key(0), (64, 32)),
      NamedSharding(auto, P(None, "x")),
    )
    recipe = qjax.Recipe((qjax.rule("a/", "mxfp4"), qjax.rule("b/", "nvfp4")))
    q = qjax.quantize({"a": {"kernel": w}, "b": {"kernel": w}}, recipe)
    checkpoint.save(self.dir / "sh", q)
    explicit = jax.make_mesh((4,), ("x",), axis_types=(AxisType.Explicit,))
    back = checkpoint.restore(self.dir / "sh", mesh=explicit)
    self.assertEqual(back["a"]["kernel"].codes.sharding.spec, P(None, "x"))
    want = qjax.dequantize(q)
    x = jnp.ones((3, 64))
    for f in (qjax.dequantize, jax.jit(qjax.dequantize)):
      got = f(back)
      for k in "ab":
        np.testing.assert_array_equal(got[k]["kernel"], want[k]["kernel"])
    for k in "ab":
      np.testing.assert_allclose(
        kernels.qmatmul(x, back[k]["kernel"]),
        x @ want[k]["kernel"],
        rtol=1e-5,
        atol=1e-5,
      )

  def test_refuses_to_overwrite(self):
    q, _ = _qtree()
    checkpoint.save(self.dir / "ck", q)
    with self.assertRaises(FileExistsError):
      checkpoint.save(self.dir / "ck", q)


if __name__ == "__main__":
  absltest.main()
