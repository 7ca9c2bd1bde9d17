"""Float parameter files read leaf by leaf: names, zero-size tensors."""

import pathlib
import tempfile

import jax
import numpy as np
from absl.testing import absltest
from safetensors.numpy import save_file

from qjax.io import sources


class SafetensorsTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.dir = pathlib.Path(tempfile.mkdtemp())

  def test_zero_size_tensors_read_as_empty(self):
    save_file(
      {
        "a.kernel": np.ones((2, 3), np.float32),
        "e": np.zeros((0, 3), np.float32),
      },
      self.dir / "x.safetensors",
    )
    s = sources.open_source(self.dir / "x.safetensors")
    self.assertEqual(sorted(s.specs()), ["a/kernel", "e"])
    self.assertEqual(s.read("e").shape, (0, 3))
    np.testing.assert_array_equal(s.read("a/kernel"), np.ones((2, 3)))

  def test_names_that_collide_after_normalisation_are_an_error(self):
    save_file(
      {
        "a.kernel": np.ones((2, 2), np.float32),
        "a/kernel": np.ones((1, 2), np.float32),
      },
      self.dir / "y.safetensors",
    )
    with self.assertRaisesRegex(
      ValueError, "'a.kernel' and 'a/kernel' both map to the path 'a/kernel'"
    ):
      sources.open_source(self.dir / "y.safetensors")


if __name__ == "__main__":
  absltest.main()


class AlignedTest(absltest.TestCase):
  def test_aligned_buffers_are_adopted_by_the_device_without_a_copy(self):
    # The conversion's memory budget rests on this: XLA:CPU shares a
    # 64-byte aligned host buffer and copies a less aligned one.
    x = np.arange(4096, dtype=np.float32).reshape(64, 64)
    misaligned = np.frombuffer(x.tobytes() + b"\0" * 4, np.uint8)[4:]
    misaligned = misaligned[: x.nbytes].view(np.float32).reshape(64, 64)
    for source in (x, x.T, misaligned):
      a = sources.aligned(source)
      self.assertEqual(a.ctypes.data % 64, 0)
      self.assertTrue(a.flags.c_contiguous)
      np.testing.assert_array_equal(a, source)
      self.assertEqual(jax.device_put(a).unsafe_buffer_pointer(), a.ctypes.data)
    already = sources.aligned(x)
    self.assertIs(sources.aligned(already), already)
    empty = sources.aligned_empty((3, 5), np.int16)
    self.assertEqual((empty.shape, empty.dtype), ((3, 5), np.int16))
    self.assertEqual(empty.ctypes.data % 64, 0)
