"""qjax QTensor <-> qwix QArray: qwix.dequantize of a converted QTensor
equals QTensor.dequantize bit for bit (and back), arrays qwix quantized
itself convert exactly, and what has no exact counterpart is refused by
name."""

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from absl.testing import absltest, parameterized

import qjax
from qjax.formats import scaling as S
from qjax.io import qwix_interop as qi

X = jax.random.normal(jax.random.key(0), (256, 64))


def _quantized(fmt, scaling=None):
  rule = qjax.rule("w", fmt, scaling) if scaling else qjax.rule("w", fmt)
  return qjax.quantize({"w": X}, qjax.Recipe([rule]))["w"]


def _bits(x):
  return np.asarray(x, np.float32).view(np.uint32)


class ToQwix(parameterized.TestCase):
  @parameterized.named_parameters(
    ("int4_g128", "int4", S.per_block(128, 0)),
    ("uint4_g128_zp", "uint4", S.per_block(128, 0, zero_point=True)),
    ("int8_channel", "int8", None),
    ("int3_g32", "int3", S.per_block(32, 0)),
    ("mxfp4", "mxfp4", None),
    ("mxfp8", "mxfp8_e4m3", None),
    ("fp8_channel", "float8_e4m3fn", None),
  )
  def test_round_trip(self, fmt, scaling):
    qt = _quantized(fmt, scaling)
    qa = qi.to_qwix(qt, "w")
    self.assertEqual(qa.qvalue.shape, qt.shape)
    want = _bits(qt.dequantize(jnp.float32))
    np.testing.assert_array_equal(_bits(qwix.dequantize(qa)), want)
    back = qi.from_qwix(qa, "w")
    np.testing.assert_array_equal(_bits(back.dequantize(jnp.float32)), want)

  def test_uint4_values_shift_into_signed_int4(self):
    qt = _quantized("uint4", S.per_block(128, 0, zero_point=True))
    qa = qi.to_qwix(qt)
    codes = np.asarray(qjax.formats.packing.unpack(qt.codes, 4, 64))
    np.testing.assert_array_equal(
      np.asarray(qa.qvalue, np.int32), codes.astype(np.int32) - 8
    )

  def test_nvfp4_is_refused(self):
    with self.assertRaisesRegex(ValueError, "w: a two-level scale"):
      qi.to_qwix(_quantized("nvfp4"), "w")

  def test_ragged_is_refused(self):
    rule = qjax.rule("w", "int4", S.per_block(96, 0), ragged=True)
    qt = qjax.quantize({"w": X}, qjax.Recipe([rule]))["w"]
    with self.assertRaisesRegex(ValueError, "w: ragged blocks"):
      qi.to_qwix(qt, "w")


class FromQwix(parameterized.TestCase):
  @parameterized.named_parameters(
    ("int4_tiled", jnp.int4, {"channelwise_axes": [1], "tiled_axes": {0: 64}}),
    ("int8_channel", jnp.int8, {"channelwise_axes": [1]}),
    (
      "int8_minmax",
      jnp.int8,
      {"channelwise_axes": [1], "calibration_method": "minmax"},
    ),
    ("fp8", jnp.float8_e4m3fn, {"channelwise_axes": [1]}),
  )
  def test_exact(self, qtype, kw):
    qa = qwix.quantize(X, qtype, **kw)
    qt = qi.from_qwix(qa, "w")
    np.testing.assert_array_equal(
      _bits(qt.dequantize(jnp.float32)), _bits(qwix.dequantize(qa))
    )

  def test_nf4_is_refused(self):
    qa = qwix.quantize(X, "nf4", channelwise_axes=[1])
    with self.assertRaisesRegex(ValueError, "w: qwix qtype 'nf4'"):
      qi.from_qwix(qa, "w")


if __name__ == "__main__":
  absltest.main()
