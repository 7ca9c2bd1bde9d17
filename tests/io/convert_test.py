"""Checkpoint conversion in one process (8 simulated devices, conftest.py):
streamed leaf by leaf, equal to qjax.quantize, loud on damaged input."""

import json
import pathlib
import shutil
import socket
import subprocess
import tempfile
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl.testing import absltest
from jax.sharding import PartitionSpec as P
from safetensors.numpy import save_file

import qjax
from qjax import formats, paths, qtensor
from qjax.io import checkpoint, convert, sources
from qjax.models import minilm, smollm2

RECIPE = qjax.Recipe((qjax.rule("kernel", "mxfp4", axis=-2),))


def flat(tree) -> dict:
  leaves = jax.tree_util.tree_leaves_with_path(
    tree, is_leaf=qtensor.is_quantized
  )
  return {paths.path_str(p): x for p, x in leaves}


def assert_trees_equal(test, got, want):
  got, want = flat(got), flat(want)
  test.assertEqual(sorted(got), sorted(want))
  for path, w in want.items():
    g = got[path]
    test.assertEqual(type(g), type(w), path)
    if qtensor.is_quantized(w):
      test.assertEqual((g.fmt, g.scaling, g.shape), (w.fmt, w.scaling, w.shape))
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w), strict=True):
      test.assertEqual(np.dtype(a.dtype), np.dtype(b.dtype), path)
      np.testing.assert_array_equal(a, b, err_msg=path)


def digests(path) -> list:
  doc = checkpoint.load_metadata(path)
  return [
    (e["path"], {k: a["sha256"] for k, a in e["arrays"].items()})
    for e in doc["leaves"]
  ]


class ConvertTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.dir = pathlib.Path(tempfile.mkdtemp())
    cls.params = minilm.load_params()
    cls.reference = qjax.quantize(cls.params, RECIPE)
    cls.out = cls.dir / "minilm_mxfp4"
    cls.summary = convert.convert(
      sources.open_source(minilm.safetensors_path()),
      RECIPE,
      cls.out,
      max_part_bytes=256 << 10,
      progress=False,
    )

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.dir, ignore_errors=True)
    super().tearDownClass()

  def test_streamed_conversion_equals_quantize(self):
    assert_trees_equal(self, checkpoint.restore(self.out), self.reference)
    # The writer flushed parts as it went instead of one tree at the end.
    parts = list((self.out / "arrays").iterdir())
    self.assertGreater(len(parts), 15)
    doc = checkpoint.load_metadata(self.out)
    self.assertEqual(doc["conversion"]["devices"], 8)
    self.assertEqual(doc["recipe"], repr(RECIPE))

  def test_summary_counts_bytes_and_sqnr(self):
    stats = qjax.stats(self.reference, self.params)
    self.assertEqual(
      self.summary["bytes"], sum(e["bytes"] for e in stats.values())
    )
    self.assertEqual(
      self.summary["float_bytes"],
      sum(x.nbytes for x in jax.tree.leaves(self.params)),
    )
    quantized = [p for p, e in stats.items() if e["quantized"]]
    self.assertLen(quantized, 36)
    for path in quantized:
      self.assertAlmostEqual(
        self.summary["leaves"][path]["sqnr_db"], stats[path]["sqnr_db"], 3
      )
    self.assertEqual(self.summary["bits_per_quantized_weight"], 4.25)

  def test_restore_places_arrays_on_a_mesh(self):
    mesh = convert.default_mesh()
    qt = checkpoint.restore(self.out, mesh=mesh)["layer_0"]["ffn_in"]["kernel"]
    # Conversion sharded the output channels; codes and scales keep that.
    self.assertEqual(qt.codes.sharding.spec, P(None, "x"))
    self.assertEqual(qt.scale.sharding.spec, P(None, "x"))
    self.assertLen(qt.codes.sharding.device_set, 8)
    np.testing.assert_array_equal(
      qt.dequantize(),
      self.reference["layer_0"]["ffn_in"]["kernel"].dequantize(),
    )
    # A mesh without the saved axis name restores replicated.
    other = jax.make_mesh((2, 4), ("a", "b"))
    qt = checkpoint.restore(self.out, mesh=other)["layer_0"]["ffn_in"]["kernel"]
    self.assertTrue(qt.codes.sharding.is_fully_replicated)

  def test_orbax_source_gives_the_same_checkpoint(self):
    float_ckpt = self.dir / "float_orbax"
    sources.save_float(float_ckpt, self.params)
    source = sources.open_source(float_ckpt)
    self.assertEqual(sorted(source.specs()), sorted(flat(self.params)))
    out = self.dir / "from_orbax"
    convert.convert(source, RECIPE, out, progress=False)
    self.assertEqual(digests(out), digests(self.out))

  @pytest.mark.e2e  # a whole real model: make test-quick skips it
  def test_gguf_source_reads_smollm2_sharded(self):
    source = sources.GGUFSource(smollm2.gguf_path(), smollm2.gguf_names(1))
    self.assertLen(source.specs(), 11)
    ref = smollm2.load_params(layers=1)
    mesh = convert.default_mesh()
    for path in ("layer_0/down/kernel", "layer_0/q/kernel", "embed/embedding"):
      sharding = jax.sharding.NamedSharding(mesh, P(None, "x"))
      w = source.read(path, sharding)
      self.assertEqual(w.sharding, sharding)
      np.testing.assert_array_equal(w, flat(ref)[path])

  def test_dequantize_writes_the_float_tree(self):
    out = self.dir / "dequantized"
    convert.dequantize_checkpoint(self.out, out)
    back = ocp.StandardCheckpointer().restore(out)
    want = flat(qjax.dequantize(self.reference))
    got = flat(back)
    self.assertEqual(sorted(got), sorted(want))
    for path, w in want.items():
      np.testing.assert_array_equal(got[path], w, err_msg=path)

  @pytest.mark.e2e  # a whole real model: make test-quick skips it
  def test_leftover_of_an_interrupted_run_is_replaced(self):
    out = self.dir / "rerun"
    partial = out.with_name(out.name + ".partial")
    (partial / "arrays" / "part00000").mkdir(parents=True)
    (partial / "arrays" / "part00000" / "junk").write_text("half")
    source = sources.GGUFSource(smollm2.gguf_path(), smollm2.gguf_names(1))
    # Without a writer's mark the directory is not ours to delete.
    with self.assertRaisesRegex(FileExistsError, "not made by a qjax writer"):
      convert.convert(source, RECIPE, out, progress=False)
    self.assertTrue((partial / "arrays" / "part00000" / "junk").exists())
    # A writer that died leaves its mark; its leftover is replaced.
    pid = _dead_pid()
    (partial / "WRITER").write_text(
      json.dumps({"host": socket.gethostname(), "pid": pid})
    )
    convert.convert(source, RECIPE, out, progress=False)
    self.assertFalse(partial.exists())
    back = checkpoint.restore(out)
    self.assertIsInstance(back["layer_0"]["q"]["kernel"], qtensor.QTensor)


class NothingMatchesTest(absltest.TestCase):
  def test_a_recipe_that_matches_nothing_is_an_error_before_writing(self):
    d = pathlib.Path(tempfile.mkdtemp())
    save_file(
      {
        "token_embd.weight": np.ones((16, 8), np.float32),
        "blk.0.attn_q.weight": np.ones((8, 8), np.float32),
      },
      d / "llama.safetensors",
    )
    source = sources.open_source(d / "llama.safetensors")
    recipe = qjax.Recipe((qjax.rule("kernel", "int4"),))
    with self.assertRaisesRegex(
      ValueError,
      "no parameter matched a quantizing rule.*0: 'kernel'.*"
      "'blk/0/attn_q/weight'",
    ):
      convert.convert(source, recipe, d / "out", progress=False)
    self.assertEqual(sorted(p.name for p in d.iterdir()), ["llama.safetensors"])
    with self.assertRaisesRegex(ValueError, "no parameter matched"):
      qjax.quantize({"w": np.ones((8, 8), np.float32)}, recipe)
    with warnings.catch_warnings(record=True):
      warnings.simplefilter("always")
      same = qjax.quantize(
        {"w": np.ones((8, 8), np.float32)}, recipe, allow_unquantized=True
      )
    np.testing.assert_array_equal(same["w"], 1)
    convert.convert(
      source, recipe, d / "out", progress=False, allow_unquantized=True
    )
    self.assertTrue((d / "out" / "qjax.json").exists())


def _dead_pid() -> int:
  """The pid of a process that has exited."""
  proc = subprocess.Popen(["true"])  # noqa: S603, S607
  proc.wait()
  return proc.pid


class CalibratedConvertTest(absltest.TestCase):
  @pytest.mark.e2e  # a whole real model: make test-quick skips it
  def test_block_streamed_gptq_equals_quantize_with_calib(self):
    from configs import convert as convert_config
    from experiments import tasks

    config = convert_config.get_config("calib_sentences=64")
    batches = tasks.get("minilm").calibration_batches(config)
    recipe = qjax.Recipe(
      (qjax.rule("kernel", "int4", formats.per_channel(), method="gptq"),)
    )
    params = minilm.load_params()
    want = qjax.quantize(
      params, recipe, calib=(minilm.block_model(params), batches)
    )
    source = sources.open_source(minilm.safetensors_path())
    lazy = convert.LazyParams(source)
    self.assertEqual(sorted(lazy), sorted(params))
    tmp = pathlib.Path(tempfile.mkdtemp())
    self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
    out = tmp / "gptq"
    summary = convert.convert_calibrated(
      source, recipe, out, minilm.block_model(lazy), batches, progress=False
    )
    assert_trees_equal(self, checkpoint.restore(out), want)
    self.assertEqual(summary["quantized_leaves"], 36)
    stats = qjax.stats(want, params)
    path = "layer_2/value/kernel"
    self.assertAlmostEqual(
      summary["leaves"][path]["sqnr_db"], stats[path]["sqnr_db"], 3
    )

  def test_two_stream_recipes_are_refused(self):
    recipe = qjax.Recipe((qjax.rule("kernel", "mxfp4", method="ed"),))
    source = sources.GGUFSource(smollm2.gguf_path(), smollm2.gguf_names(1))
    with self.assertRaisesRegex(ValueError, r"\['ed'\] need both"):
      convert.convert_calibrated(
        source, recipe, "/nonexistent/o", smollm2.block_model({}), []
      )


class BadInputTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.dir = pathlib.Path(tempfile.mkdtemp())
    self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)

  def _assert_no_output(self, out):
    self.assertFalse(out.exists())
    self.assertFalse(out.with_name(out.name + ".partial").exists())

  def test_truncated_safetensors_names_the_file(self):
    bad = self.dir / "model.safetensors"
    data = minilm.safetensors_path().read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with self.assertRaisesRegex(ValueError, r"model\.safetensors.*safetensors"):
      convert.convert(
        sources.open_source(bad, "minilm"), RECIPE, self.dir / "o"
      )
    self._assert_no_output(self.dir / "o")

  def test_truncated_gguf_names_the_file(self):
    bad = self.dir / "smollm2.gguf"
    data = smollm2.gguf_path().read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with self.assertRaisesRegex(ValueError, r"smollm2\.gguf"):
      source = sources.open_source(bad, "smollm2")
      for path in source.specs():
        source.read(path)

  def test_damaged_orbax_source_names_file_and_leaf(self):
    ckpt = self.dir / "float"
    rng = np.random.default_rng(0)
    params = {
      "a": {"kernel": rng.normal(size=(64, 64)).astype(np.float32)},
      "b": {"kernel": rng.normal(size=(64, 64)).astype(np.float32)},
    }
    sources.save_float(ckpt, params)
    # Truncate the array data (16 KiB each), not orbax's small index files.
    for f in ckpt.rglob("*"):
      if f.is_file() and f.parent.name == "d" and f.stat().st_size > 8192:
        f.write_bytes(f.read_bytes()[:100])
    out = self.dir / "o"
    with self.assertRaisesRegex(
      ValueError, r"float: cannot read leaf 'a/kernel'.*truncated or corrupt"
    ):
      convert.convert(sources.open_source(ckpt), RECIPE, out, progress=False)
    self._assert_no_output(out)

  def test_nan_weight_names_the_parameter_and_writes_nothing(self):
    ckpt = self.dir / "float"
    w = np.ones((64, 32), np.float32)
    w[3, 4] = np.nan
    sources.save_float(ckpt, {"dense": {"kernel": w}})
    out = self.dir / "o"
    with self.assertRaisesRegex(ValueError, r"'dense/kernel' has 1 NaN"):
      convert.convert(sources.open_source(ckpt), RECIPE, out, progress=False)
    self._assert_no_output(out)

  def test_blocks_that_do_not_divide_name_the_parameter(self):
    ckpt = self.dir / "float"
    sources.save_float(
      ckpt, {"dense": {"kernel": np.ones((48, 8), np.float32)}}
    )
    with self.assertRaisesRegex(ValueError, r"'dense/kernel'.*32"):
      convert.convert(
        sources.open_source(ckpt), RECIPE, self.dir / "o", progress=False
      )

  def test_unknown_or_missing_inputs(self):
    with self.assertRaisesRegex(FileNotFoundError, "nowhere"):
      sources.open_source(self.dir / "nowhere.safetensors")
    text = self.dir / "weights.txt"
    text.write_text("0.5")
    with self.assertRaisesRegex(ValueError, "unknown input kind"):
      sources.open_source(text)
    with self.assertRaisesRegex(ValueError, "unknown layout"):
      sources.open_source(minilm.safetensors_path(), "bert")
    (self.dir / "empty").mkdir()
    with self.assertRaisesRegex(ValueError, "not a readable orbax"):
      sources.open_source(self.dir / "empty")

  def test_calibrated_recipe_is_refused(self):
    recipe = qjax.Recipe(
      (qjax.rule("kernel", "int4", formats.per_channel(), method="gptq"),)
    )
    source = sources.GGUFSource(smollm2.gguf_path(), smollm2.gguf_names(1))
    with self.assertRaisesRegex(ValueError, r"\['gptq'\] need calibration"):
      convert.convert(source, recipe, self.dir / "o")

  def test_existing_output_is_refused(self):
    (self.dir / "o").mkdir()
    source = sources.GGUFSource(smollm2.gguf_path(), smollm2.gguf_names(1))
    with self.assertRaises(FileExistsError):
      convert.convert(source, RECIPE, self.dir / "o", progress=False)


if __name__ == "__main__":
  absltest.main()
