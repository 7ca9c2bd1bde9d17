"""Dense bit packing: exact sizes, exact bytes, exact round trips."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl.testing import absltest, parameterized

from qjax import formats


def _slow_pack(codes, bits):
  """The documented layout, one bit at a time, for a 1-D list of codes."""
  out = []
  full = len(codes) // 8
  for g in range(full):
    group = codes[8 * g : 8 * g + 8]
    shift = bits
    for p in formats.planes(bits):
      shift -= p
      per_byte = 8 // p
      for k in range(p):  # a p-bit plane of 8 codes is p bytes
        byte = 0
        for i in range(per_byte):
          value = (int(group[k * per_byte + i]) >> shift) & (2**p - 1)
          byte |= value << (i * p)
        out.append(byte)
  tail = codes[8 * full :]
  stream = []
  for c in tail:
    stream += [(int(c) >> i) & 1 for i in range(bits)]
  stream += [0] * (-len(stream) % 8)
  for i in range(0, len(stream), 8):
    out.append(sum(bit << j for j, bit in enumerate(stream[i : i + 8])))
  return np.array(out, np.uint8)


class PackingTest(parameterized.TestCase):
  def test_plane_split(self):
    self.assertEqual(formats.planes(3), (2, 1))
    self.assertEqual(formats.planes(6), (4, 2))
    self.assertEqual(formats.planes(7), (4, 2, 1))
    self.assertEqual(formats.planes(8), (8,))
    self.assertEqual(formats.planes(13), (8, 4, 1))

  def test_worked_examples(self):
    packed = formats.pack(np.array([5, 0, 7, 2, 3, 6, 1, 4], np.uint8), 3)
    self.assertEqual(np.asarray(packed).tobytes().hex(), "728d55")
    x = np.array([1, -0.5, 7.5, 0.125, 3, -2.25, 0, 6], np.float32)
    codes = formats.get("float6_e2m3fn").encode(x)
    np.testing.assert_array_equal(
      codes, x.astype(ml_dtypes.float6_e2m3fn).view(np.uint8)
    )
    self.assertEqual(
      np.asarray(formats.pack(codes, 6)).tobytes().hex(), "9207c5707004"
    )

  @parameterized.product(
    bits=list(range(1, 17)), n=[0, 1, 3, 7, 8, 9, 16, 23, 64, 131]
  )
  def test_matches_slow_reference_and_round_trips(self, bits, n):
    rng = np.random.default_rng(bits * 1000 + n)
    codes = rng.integers(0, 2**bits, (3, n)).astype(np.uint16)
    packed = np.asarray(formats.pack(codes, bits))
    self.assertEqual(packed.dtype, np.uint8)
    self.assertEqual(packed.shape, (3, -(-n * bits // 8)))
    for row in range(3):
      np.testing.assert_array_equal(packed[row], _slow_pack(codes[row], bits))
    back = formats.unpack(packed, bits, n)
    self.assertEqual(back.dtype, np.uint8 if bits <= 8 else np.uint16)
    np.testing.assert_array_equal(back, codes)

  @parameterized.parameters(3, 4, 5, 6, 7)
  def test_group_slices_are_byte_slices(self, bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, (2, 64)).astype(np.uint8)
    packed = np.asarray(formats.pack(codes, bits))
    for start, stop in [(0, 8), (8, 32), (40, 64)]:
      np.testing.assert_array_equal(
        packed[:, start * bits // 8 : stop * bits // 8],
        formats.pack(codes[:, start:stop], bits),
      )

  def test_jit_and_vmap(self):
    codes = jax.random.randint(jax.random.key(0), (4, 5, 37), 0, 32)
    codes = codes.astype(jnp.uint8)
    eager = formats.pack(codes, 5)
    np.testing.assert_array_equal(
      jax.jit(formats.pack, static_argnums=1)(codes, 5), eager
    )
    np.testing.assert_array_equal(
      jax.vmap(lambda c: formats.pack(c, 5))(codes), eager
    )

  def test_code_too_wide_is_an_error(self):
    with self.assertRaisesRegex(ValueError, "code 8 does not fit in 3 bits"):
      formats.pack(np.array([1, 8, 2], np.uint8), 3)

  def test_wrong_dtypes_are_errors(self):
    with self.assertRaisesRegex(TypeError, "unsigned"):
      formats.pack(np.array([1, 2], np.int32), 3)
    with self.assertRaisesRegex(TypeError, "uint8"):
      formats.unpack(np.array([1, 2], np.uint16), 3, 5)

  def test_bad_sizes_are_errors(self):
    with self.assertRaisesRegex(ValueError, "1..16"):
      formats.pack(np.array([1], np.uint8), 17)
    with self.assertRaisesRegex(ValueError, "take 3"):
      formats.unpack(np.zeros(4, np.uint8), 3, 8)


if __name__ == "__main__":
  absltest.main()
