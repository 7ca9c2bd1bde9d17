"""Export to vLLM's compressed-tensors layout: every supported format round
trips bit for bit through the exporter's reader, the packed words match a
slow per-element reference, the safetensors package reads the file, and a
leaf with no layout is an error that leaves no file behind."""

import json
import pathlib
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from flax import nnx

import qjax
from qjax.formats import scaling as S
from qjax.io import compressed_tensors as ct
from qjax.io.linear_codes import tree_leaves


class UserMLP(nn.Module):
  """A model qjax has never seen: two Dense layers and a LayerNorm."""

  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm(name="norm")(x)
    x = nn.gelu(nn.Dense(96, name="up")(x))
    return nn.Dense(64, name="down")(x)


def _params():
  return UserMLP().init(jax.random.key(0), jnp.ones((1, 256)))["params"]


def _bits(x):
  x = x.dequantize(jnp.float32) if qjax.qtensor.is_qtensor(x) else x
  return np.asarray(x, np.float32).view(np.uint32)


RECIPES = {
  "uint4_g32_zp": ("uint4", S.per_block(32, 0, zero_point=True)),
  "int4_g32": ("int4", S.per_block(32, 0)),
  "int8_channel": ("int8", None),
  "uint8_channel_zp": ("uint8", S.per_channel(-1, zero_point=True)),
  "int4_bf16_scales": ("int4", S.per_block(32, 0, "bfloat16")),
  "fp8": ("float8_e4m3fn", None),
  "mxfp4": ("mxfp4", None),
  "nvfp4": ("nvfp4", None),
}


def _quantized(fmt, scaling, params=None):
  rule = (
    qjax.rule("kernel", fmt, scaling) if scaling else qjax.rule("kernel", fmt)
  )
  return qjax.quantize(params or _params(), qjax.Recipe([rule]))


class RoundTrip(parameterized.TestCase):
  @parameterized.named_parameters(*[(k, *v) for k, v in RECIPES.items()])
  def test_bit_for_bit(self, fmt, scaling):
    q = _quantized(fmt, scaling)
    with tempfile.TemporaryDirectory() as d:
      ct.export(q, d)
      back = ct.load(d)
    got = dict(tree_leaves(back))
    for p, leaf in tree_leaves(q):
      if qjax.qtensor.is_qtensor(leaf):
        self.assertTrue(qjax.qtensor.is_qtensor(got[p]), p)
        np.testing.assert_array_equal(got[p].codes, leaf.codes, err_msg=p)
        np.testing.assert_array_equal(got[p].scale, leaf.scale, err_msg=p)
        if leaf.zero is not None:
          np.testing.assert_array_equal(got[p].zero, leaf.zero, err_msg=p)
      np.testing.assert_array_equal(_bits(got[p]), _bits(leaf), err_msg=p)

  def test_nnx_state(self):
    class Proj(nnx.Module):
      def __init__(self, rngs):
        self.proj = nnx.Linear(64, 32, rngs=rngs)

    state = nnx.state(Proj(nnx.Rngs(0)), nnx.Param)
    rule = qjax.rule("kernel", "int4", S.per_block(32, 0))
    q = qjax.quantize(state, qjax.Recipe([rule]))
    with tempfile.TemporaryDirectory() as d:
      ct.export(q, d)
      back = ct.load(d)
    np.testing.assert_array_equal(
      _bits(back["proj"]["kernel"]), _bits(q["proj"]["kernel"].get_value())
    )
    np.testing.assert_array_equal(
      back["proj"]["bias"], q["proj"]["bias"].get_value()
    )


def _reference_words(q: np.ndarray, bits: int) -> np.ndarray:
  """Rows of b-bit unsigned values -> int32 words, one value at a time:
  value j of row r sits in word j // (32/b) at bit (j % (32/b)) * b."""
  per = 32 // bits
  out = np.zeros((q.shape[0], -(-q.shape[1] // per)), np.uint64)
  for r in range(q.shape[0]):
    for j in range(q.shape[1]):
      out[r, j // per] |= np.uint64(int(q[r, j]) << (bits * (j % per)))
  return out.astype(np.uint32).view(np.int32)


class Layout(absltest.TestCase):
  def test_pack_quantized_words_and_config(self):
    from safetensors import safe_open

    # g128 over 256 and (ragged: one short group) 96 inputs.
    scaling = S.per_block(128, 0, zero_point=True)
    rule = qjax.rule("kernel", "uint4", scaling, ragged=True)
    q = qjax.quantize(_params(), qjax.Recipe([rule]))
    up = q["up"]["kernel"]
    with tempfile.TemporaryDirectory() as d:
      ct.export(q, d)
      with safe_open(str(pathlib.Path(d) / ct.WEIGHTS_FILE), "numpy") as f:
        packed = f.get_tensor("up.weight_packed")
        zeros = f.get_tensor("up.weight_zero_point")
        scale = f.get_tensor("up.weight_scale")
        shape = f.get_tensor("up.weight_shape")
      config = json.loads((pathlib.Path(d) / ct.CONFIG_FILE).read_text())
    codes = np.asarray(
      qjax.formats.packing.unpack(up.codes, 4, up.shape[-1])
    ).T  # [out, in]
    np.testing.assert_array_equal(packed, _reference_words(codes, 4))
    # Zero points pack along the outputs: transpose, pack rows, transpose.
    z = np.asarray(up.zero).T  # [out, groups]
    np.testing.assert_array_equal(zeros, _reference_words(z.T, 4).T)
    np.testing.assert_array_equal(scale, np.asarray(up.scale).T)
    np.testing.assert_array_equal(shape, [96, 256])
    qc = config["quantization_config"]
    self.assertEqual(qc["quant_method"], "compressed-tensors")
    (group,) = qc["config_groups"].values()
    self.assertEqual(group["format"], "pack-quantized")
    self.assertEqual(group["targets"], ["down", "up"])
    self.assertEqual(
      {k: group["weights"][k] for k in ("num_bits", "type", "symmetric")},
      {"num_bits": 4, "type": "int", "symmetric": False},
    )
    self.assertEqual(group["weights"]["group_size"], 128)

  def test_signed_codes_are_offset_binary(self):
    q = _quantized("int4", S.per_block(32, 0))
    with tempfile.TemporaryDirectory() as d:
      ct.export(q, d)
      tensors, _ = ct.read_safetensors(pathlib.Path(d) / ct.WEIGHTS_FILE)
    down = q["down"]["kernel"]
    signed = np.asarray(
      down.fmt.decode(
        qjax.formats.packing.unpack(down.codes, 4, down.shape[-1])
      )
    ).T.astype(np.int64)
    want = _reference_words(signed + 8, 4)
    np.testing.assert_array_equal(tensors["down.weight_packed"], want)

  def test_nvfp4_nibbles_and_global_scale(self):
    q = _quantized("nvfp4", None)
    up = q["up"]["kernel"]
    with tempfile.TemporaryDirectory() as d:
      ct.export(q, d)
      t, _ = ct.read_safetensors(pathlib.Path(d) / ct.WEIGHTS_FILE)
    codes = np.asarray(qjax.formats.packing.unpack(up.codes, 4, 96)).T
    packed = t["up.weight_packed"]
    np.testing.assert_array_equal(packed & 0xF, codes[:, 0::2])
    np.testing.assert_array_equal(packed >> 4, codes[:, 1::2])
    np.testing.assert_allclose(
      t["up.weight_global_scale"][0] * np.float32(up.tensor_scale),
      1.0,
      rtol=1e-7,
    )


class Errors(absltest.TestCase):
  def test_unsupported_format_names_leaf_and_writes_nothing(self):
    q = _quantized("int3", S.per_block(32, 0))
    with tempfile.TemporaryDirectory() as d:
      with self.assertRaisesRegex(ValueError, "down/kernel.*int3"):
        ct.export(q, d)
      self.assertEqual(list(pathlib.Path(d).iterdir()), [])

  def test_conv_kernel_is_refused(self):
    params = {"conv": {"kernel": jnp.ones((3, 3, 8, 16))}}
    q = _quantized("int8", None, params)
    with self.assertRaisesRegex(ValueError, "conv/kernel.*not a matrix"):
      ct.export(q, tempfile.mkdtemp())

  def test_truncated_file_names_file_and_tensor(self):
    q = _quantized("int4", S.per_block(32, 0))
    with tempfile.TemporaryDirectory() as d:
      ct.export(q, d)
      f = pathlib.Path(d) / ct.WEIGHTS_FILE
      f.write_bytes(f.read_bytes()[:-100])
      with self.assertRaisesRegex(ValueError, "model.safetensors.*truncated"):
        ct.load(d)


if __name__ == "__main__":
  absltest.main()
