"""Scaling specs: block geometry, every scale format, 2-D blocks."""

import math

import jax
import ml_dtypes
import numpy as np
from absl.testing import absltest, parameterized

from qjax import formats
from qjax.quantizers import rtn


class ScalingTest(parameterized.TestCase):
  def test_block_shapes(self):
    shape = (96, 40)
    self.assertEqual(formats.per_tensor().scale_shape(shape), (1, 1))
    self.assertEqual(formats.per_channel(0).scale_shape(shape), (96, 1))
    self.assertEqual(formats.per_channel(-1).scale_shape(shape), (1, 40))
    self.assertEqual(formats.per_block(32, axis=0).scale_shape(shape), (3, 40))
    two_d = formats.Scaling("block", (0, 1), (32, 8))
    self.assertEqual(two_d.scale_shape(shape), (3, 5))
    with self.assertRaisesRegex(ValueError, "out of range"):
      formats.per_channel(2).block_shape(shape)

  def test_two_d_blocks_match_reference(self):
    w = np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32)
    scaling = formats.Scaling("block", (0, 1), (16, 8))
    q = rtn.rtn(w, formats.get("int8"), scaling)
    want_scale = np.abs(w.reshape(4, 16, 6, 8)).max(axis=(1, 3)) / 127
    np.testing.assert_allclose(q.scale, want_scale, rtol=1e-7)
    full = np.repeat(np.repeat(want_scale, 16, 0), 8, 1)
    np.testing.assert_allclose(
      q.dequantize(), np.round(w / full) * full, rtol=1e-6, atol=1e-7
    )

  @parameterized.parameters(
    "float32", "bfloat16", "float16", "float8_e4m3fn", "e8m0"
  )
  def test_scale_formats(self, scale_format):
    w = jax.random.normal(jax.random.key(0), (64, 16)) * 3
    scaling = formats.per_block(32, axis=0, scale_format=scale_format)
    q = rtn.rtn(w, formats.get("int4"), scaling)
    q.validate()
    amax = np.abs(np.asarray(w).reshape(2, 32, 16)).max(axis=1)
    if scale_format == "e8m0":
      want = 2.0 ** (np.floor(np.log2(amax)) - math.floor(math.log2(7)))
      got = 2.0 ** (np.asarray(q.scale, np.float64) - 127)
    elif scale_format == "float8_e4m3fn":
      want = (amax / 7).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
      got = np.asarray(q.scale).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    else:
      want = (amax / 7).astype(np.dtype(scale_format)).astype(np.float32)
      got = np.asarray(q.scale).astype(np.float32)
    np.testing.assert_array_equal(got, want)
    self.assertEqual(q.scale.dtype.itemsize * 8, scaling.scale_bits())

  def test_spec_and_dict_round_trip(self):
    s = formats.Scaling("block", (0, 1), (16, 8), "float16", ragged=True)
    self.assertEqual(formats.Scaling.from_dict(s.to_dict()), s)
    self.assertEqual(s.spec(), "block16@0x8@1_float16_ragged")

  def test_bad_specs(self):
    with self.assertRaisesRegex(ValueError, "one size per axis"):
      formats.Scaling("block", (0,), ())
    with self.assertRaisesRegex(ValueError, "NVFP4"):
      formats.Scaling("block", (0,), (16,), "float32", tensor_scale=True)
    # A spec must describe the scaling: one block per axis, axes distinct.
    with self.assertRaisesRegex(ValueError, "block axes must differ"):
      formats.Scaling("block", (0, 0), (2, 2))
    aliased = formats.Scaling("block", (0, -2), (2, 2))
    with self.assertRaisesRegex(ValueError, "name the same axis"):
      aliased.block_shape((4, 4))


if __name__ == "__main__":
  absltest.main()
