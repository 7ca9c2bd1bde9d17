"""The kernels' bit-level decoders equal the formats' own, code by code."""

import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from qjax import formats
from qjax.formats import exmy, integer
from qjax.kernels import decode

FLOATS = [
  "float8_e4m3fn",
  "float8_e4m3",
  "float8_e5m2",
  "float8_e4m3fnuz",
  "float8_e5m2fnuz",
  "float8_e4m3b11fnuz",
  "float8_e3m4",
  "float6_e2m3fn",
  "float6_e3m2fn",
  "float4_e2m1fn",
  "float8_e8m0fnu",
  "e1m2",
  "e3m3",
  "e5m1",
]


def _same_bits(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  nan = np.isnan(a)
  np.testing.assert_array_equal(nan, np.isnan(b))
  np.testing.assert_array_equal(
    a.view(np.uint32)[~nan], b.view(np.uint32)[~nan]
  )


class DecodeTest(parameterized.TestCase):
  @parameterized.parameters(*FLOATS)
  def test_float_formats_every_code(self, name):
    fmt = formats.get(name)
    codes = jnp.arange(2**fmt.bits, dtype=jnp.int32)
    _same_bits(decode.decode(codes, fmt), fmt.decode(codes.astype(jnp.uint8)))

  def test_wide_exponent_range(self):
    # Values below float32's normal range become float32 subnormals.
    fmt = exmy.ExMy(8, 2, special="ieee")
    codes = jnp.arange(2**fmt.bits, dtype=jnp.int32)
    _same_bits(decode.decode(codes, fmt), fmt.decode(codes.astype(jnp.uint16)))

  @parameterized.product(bits=[2, 3, 4, 8], signed=[True, False])
  def test_integers_every_code(self, bits, signed):
    fmt = integer.IntFormat(bits, signed=signed, step_exponent=-3)
    codes = jnp.arange(2**bits, dtype=jnp.int32)
    _same_bits(decode.decode(codes, fmt), fmt.decode(codes.astype(jnp.uint8)))

  def test_nf4_every_code(self):
    codes = jnp.arange(16, dtype=jnp.int32)
    _same_bits(
      decode.decode(codes, integer.NF4),
      integer.NF4.decode(codes.astype(jnp.uint8)),
    )

  def test_scales_every_code(self):
    from qjax import qtensor
    from qjax.formats.scaling import Scaling

    codes = jnp.arange(256, dtype=jnp.int32).astype(jnp.uint8)
    for fmt in ("e8m0", "float8_e4m3fn"):
      want = qtensor.decode_scale(codes, Scaling("tensor", scale_format=fmt))
      _same_bits(decode.decode_scale(codes, fmt), want)


if __name__ == "__main__":
  absltest.main()
