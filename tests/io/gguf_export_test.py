"""GGUF export (Q4_0 / Q5_0 / Q8_0) and exact import of GGML block types:
the bytes match a slow per-block reference, gguf's own reader dequantizes
the export to qjax's values bit for bit, the importer's QTensors equal
gguf.quants.dequantize on a real llama.cpp file, and types no qjax format
holds are reported (or refused) by name."""

import pathlib
import tempfile

import flax.linen as nn
import gguf
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from gguf.quants import dequantize

import qjax
from qjax.formats import packing
from qjax.formats import scaling as S
from qjax.io import gguf_io
from qjax.io.linear_codes import tree_leaves


class UserLM(nn.Module):
  """A model qjax has never seen: an embedding and two projections."""

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(50, 64, name="tok")(ids)
    x = nn.relu(nn.Dense(160, name="up")(x))
    return nn.Dense(64, name="down")(x)


NAMES = {
  "tok/embedding": ("token_embd.weight", False),
  "up/kernel": ("blk.0.ffn_up.weight", True),
  "up/bias": ("blk.0.ffn_up.bias", False),
  "down/kernel": ("blk.0.ffn_down.weight", True),
  "down/bias": ("blk.0.ffn_down.bias", False),
}


def _params():
  ids = jnp.zeros((1, 4), jnp.int32)
  return UserLM().init(jax.random.key(1), ids)["params"]


def _quantized(fmt, group=64):
  # Groups of 64 over 160 inputs are ragged (64, 64, 32): still whole
  # 32-element GGML blocks.
  rule = qjax.rule("kernel", fmt, S.per_block(group, 0, "float16"), ragged=True)
  return qjax.quantize(_params(), qjax.Recipe([rule]))


def _as_float(x):
  x = x.dequantize(jnp.float32) if qjax.qtensor.is_qtensor(x) else x
  return np.asarray(x, np.float32)


def _reference_q4_0(rows: np.ndarray, d: np.ndarray) -> bytes:
  """Signed 4-bit rows [out, in] and float16 d per 32 -> Q4_0 bytes, one
  block at a time: d, then byte j = (q[j] + 8) | (q[j + 16] + 8) << 4."""
  out = bytearray()
  for r in range(rows.shape[0]):
    for b in range(rows.shape[1] // 32):
      q = rows[r, 32 * b : 32 * b + 32] + 8
      out += np.float16(d[r, b]).tobytes()
      out += bytes(int(q[j]) | int(q[j + 16]) << 4 for j in range(16))
  return bytes(out)


def _write(q, names=NAMES, **kw):
  d = tempfile.mkdtemp()
  return gguf_io.export(q, pathlib.Path(d) / "m.gguf", names=names, **kw)


class Export(parameterized.TestCase):
  @parameterized.parameters("int4", "int5", "int8")
  def test_gguf_reader_gives_qjax_values(self, fmt):
    q = _quantized(fmt)
    file = _write(q)
    tensors = {t.name: t for t in gguf.GGUFReader(str(file)).tensors}
    kind = {"int4": "Q4_0", "int5": "Q5_0", "int8": "Q8_0"}[fmt]
    for p, leaf in tree_leaves(q):
      name, transpose = NAMES[p]
      t = tensors[name]
      if qjax.qtensor.is_qtensor(leaf):
        self.assertEqual(t.tensor_type.name, kind)
      got = np.asarray(dequantize(np.asarray(t.data), t.tensor_type))
      got = got.T if transpose else got
      np.testing.assert_array_equal(
        got.astype(np.float32).view(np.uint32),
        _as_float(leaf).view(np.uint32),
        err_msg=p,
      )

  def test_q4_0_bytes_match_reference(self):
    q = _quantized("int4")
    up = q["up"]["kernel"]
    file = _write(q)
    (t,) = [
      t
      for t in gguf.GGUFReader(str(file)).tensors
      if t.name == "blk.0.ffn_up.weight"
    ]
    codes = np.asarray(packing.unpack(up.codes, 4, up.shape[-1]))
    rows = np.asarray(up.fmt.decode(codes)).T.astype(np.int64)  # [out, in]
    d = np.repeat(np.asarray(up.scale).T, 2, axis=1)[:, :2]  # 64 = 2 x 32
    self.assertEqual(np.asarray(t.data).tobytes(), _reference_q4_0(rows, d))

  def test_import_gives_back_codes(self):
    q = _quantized("int5", group=32)
    back, report = gguf_io.load(_write(q), NAMES)
    self.assertEqual(report.dequantized, {})
    got = dict(tree_leaves(back))
    for p, leaf in tree_leaves(q):
      if qjax.qtensor.is_qtensor(leaf):
        np.testing.assert_array_equal(got[p].codes, leaf.codes, err_msg=p)
        np.testing.assert_array_equal(got[p].scale, leaf.scale, err_msg=p)
      np.testing.assert_array_equal(_as_float(got[p]), _as_float(leaf))

  def test_metadata_is_copied(self):
    src = _write(_quantized("int8"))
    w = gguf.GGUFWriter(str(src) + ".meta", "llama")
    w.add_context_length(77)
    w.add_array("tokenizer.ggml.tokens", ["a", "b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    file = _write(_quantized("int8"), metadata_from=str(src) + ".meta")
    fields = gguf.GGUFReader(str(file)).fields
    self.assertEqual(fields["llama.context_length"].contents(), 77)
    self.assertEqual(fields["tokenizer.ggml.tokens"].contents(), ["a", "b"])


class Errors(absltest.TestCase):
  def test_zero_points_have_no_exact_type(self):
    rule = qjax.rule(
      "kernel", "uint4", S.per_block(32, 0, "float16", zero_point=True)
    )
    q = qjax.quantize(_params(), qjax.Recipe([rule]))
    d = pathlib.Path(tempfile.mkdtemp())
    with self.assertRaisesRegex(
      ValueError, "(up|down)/kernel.*no exact GGML type"
    ):
      gguf_io.export(q, d / "m.gguf", names=NAMES)
    self.assertEqual(list(d.iterdir()), [])

  def test_float32_scales_have_no_exact_type(self):
    rule = qjax.rule("kernel", "int4", S.per_block(32, 0))
    q = qjax.quantize(_params(), qjax.Recipe([rule]))
    with self.assertRaisesRegex(ValueError, "(up|down)/kernel.*float32"):
      _write(q)

  def test_groups_must_be_whole_blocks(self):
    rule = qjax.rule("kernel", "int8", S.per_block(16, 0, "float16"))
    q = qjax.quantize(_params(), qjax.Recipe([rule]))
    with self.assertRaisesRegex(ValueError, "kernel: groups of 16"):
      _write(q)

  def test_damaged_file(self):
    file = _write(_quantized("int8"))
    file.write_bytes(file.read_bytes()[:200])
    with self.assertRaisesRegex(ValueError, "m.gguf: not a readable GGUF"):
      gguf_io.load(file, NAMES)


class ImportRealFile(absltest.TestCase):
  """Gemma 3 270M's Q4_K_M GGUF (a llama.cpp release): its first block
  holds Q5_0, Q6_K, Q8_0, Q4_K and F32 tensors."""

  @classmethod
  def setUpClass(cls):
    from qjax.models import gemma3

    cls.file = gemma3.gguf_path()
    cls.names = {
      p: v
      for p, v in gemma3.gguf_names(layers=1).items()
      if v[0].startswith("blk.0.")
    }
    cls.tensors = {t.name: t for t in gemma3._reader().tensors}

  def test_exact_types_equal_gguf_dequantize(self):
    tree, report = gguf_io.load(self.file, self.names)
    self.assertEqual(
      set(report.exact.values()), {"Q5_0", "Q6_K", "Q8_0", "F32"}
    )
    self.assertEqual(set(report.dequantized.values()), {"Q4_K"})
    for p, leaf in tree_leaves(tree):
      name, transpose = self.names[p]
      t = self.tensors[name]
      want = np.asarray(dequantize(np.asarray(t.data), t.tensor_type))
      want = (want.T if transpose else want).astype(np.float32)
      if p in report.exact and report.exact[p] != "F32":
        self.assertTrue(qjax.qtensor.is_qtensor(leaf), p)
      np.testing.assert_array_equal(
        _as_float(leaf).view(np.uint32), want.view(np.uint32), err_msg=p
      )

  def test_q6_k_is_int6_in_groups_of_16(self):
    tree, report = gguf_io.load(self.file, self.names)
    (p,) = [p for p, k in report.exact.items() if k == "Q6_K"][:1]
    leaf = dict(tree_leaves(tree))[p]
    self.assertEqual(str(leaf.fmt), "int6")
    self.assertEqual(leaf.scaling.sizes, (16,))

  def test_inexact_raise_names_tensor(self):
    with self.assertRaisesRegex(ValueError, r"blk\.0\..*Q4_K"):
      gguf_io.load(self.file, self.names, inexact="raise")


if __name__ == "__main__":
  absltest.main()
