"""Input rows of every layer kind against slow NumPy references (im2col by
explicit loops), and the property that rows @ kernel matrix is the layer."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from flax import nnx

from qjax import linear_layers


def _im2col(x, ks, strides, dilation, pads, mode="constant"):
  """[n, K, c] patches of x [b, h, w, c] by loops; pads ((top, bottom),
  (left, right))."""
  x = np.pad(np.asarray(x), ((0, 0), *pads, (0, 0)), mode=mode)
  b, h, w, c = x.shape
  span = [(k - 1) * d + 1 for k, d in zip(ks, dilation, strict=True)]
  rows = []
  for n in range(b):
    for i in range(0, h - span[0] + 1, strides[0]):
      for j in range(0, w - span[1] + 1, strides[1]):
        taps = [
          x[n, i + a * dilation[0], j + e * dilation[1]]
          for a, e in itertools.product(range(ks[0]), range(ks[1]))
        ]
        rows.append(np.stack(taps))
  return np.stack(rows)  # [n, K, c]


CASES = (
  ("3x3_same", dict(kernel_size=(3, 3)), ((1, 1), (1, 1)), "constant"),
  (
    "3x3_valid_stride2",
    dict(kernel_size=(3, 3), strides=2, padding="VALID"),
    ((0, 0), (0, 0)),
    "constant",
  ),
  (
    "3x2_dilated_explicit",
    dict(kernel_size=(3, 2), kernel_dilation=2, padding=((2, 1), (0, 3))),
    ((2, 1), (0, 3)),
    "constant",
  ),
  (
    "3x3_circular",
    dict(kernel_size=(3, 3), padding="CIRCULAR"),
    ((1, 1), (1, 1)),
    "wrap",
  ),
  (
    "1x1_stride2",
    dict(kernel_size=(1, 1), strides=2),
    ((0, 0), (0, 0)),
    "constant",
  ),
)


class ConvRowsTest(parameterized.TestCase):
  @parameterized.named_parameters(*CASES)
  def test_patches_match_loops(self, kw, pads, mode):
    x = jax.random.normal(jax.random.key(0), (2, 7, 6, 4))
    ks = kw["kernel_size"]
    want = _im2col(
      x,
      ks,
      [kw.get("strides", 1)] * 2,
      [kw.get("kernel_dilation", 1)] * 2,
      pads,
      mode,
    )
    for groups in (1, 2, 4):
      layer = nn.Conv(8, feature_group_count=groups, **kw)
      got = np.asarray(linear_layers.input_rows(layer, x))
      n, k, c = want.shape
      if groups == 1:
        np.testing.assert_array_equal(got, want.reshape(n, k * c))
      else:
        per = want.reshape(n, k, groups, c // groups).transpose(2, 0, 1, 3)
        np.testing.assert_array_equal(got, per.reshape(groups, n, -1))

  @parameterized.named_parameters(*CASES)
  def test_rows_times_kernel_is_the_conv(self, kw, pads, mode):
    del pads, mode
    x = jax.random.normal(jax.random.key(1), (2, 7, 6, 4))
    for groups in (1, 4):
      layer = nn.Conv(8, feature_group_count=groups, precision="highest", **kw)
      v = layer.init(jax.random.key(2), x)
      y = np.asarray(layer.apply(v, x), np.float64).reshape(-1, 8)
      rows = np.asarray(linear_layers.input_rows(layer, x), np.float64)
      k = np.asarray(v["params"]["kernel"], np.float64)
      k = k.reshape(-1, groups, 8 // groups)
      if groups == 1:
        got = rows @ k[:, 0]
      else:
        got = np.einsum("gnd,dgo->ngo", rows, k).reshape(len(y), 8)
      got = got + np.asarray(v["params"]["bias"])
      np.testing.assert_allclose(got, y, rtol=1e-5, atol=1e-5)

  def test_nnx_conv_has_the_linen_rows(self):
    x = jax.random.normal(jax.random.key(0), (2, 7, 6, 4))
    a = nn.Conv(8, (3, 3), strides=2, feature_group_count=2)
    b = nnx.Conv(
      4, 8, (3, 3), strides=2, feature_group_count=2, rngs=nnx.Rngs(0)
    )
    np.testing.assert_array_equal(
      linear_layers.input_rows(a, x), linear_layers.input_rows(b, x)
    )


class MatrixLayersTest(absltest.TestCase):
  def test_dense_general_moves_the_contracted_axes_last(self):
    x = jax.random.normal(jax.random.key(0), (3, 5, 6, 7))
    layer = nn.DenseGeneral((2, 4), axis=(1, 3))
    rows = np.asarray(linear_layers.input_rows(layer, x))
    want = np.asarray(x).transpose(0, 2, 1, 3).reshape(-1, 35)
    np.testing.assert_array_equal(rows, want)
    v = layer.init(jax.random.key(1), x)
    y = layer.apply(v, x).reshape(-1, 8)
    got = rows @ np.asarray(v["params"]["kernel"]).reshape(35, 8)
    np.testing.assert_allclose(
      got + np.asarray(v["params"]["bias"]).reshape(-1), y, rtol=1e-4, atol=1e-4
    )

  def test_dense_general_with_an_int_axis(self):
    x = jax.random.normal(jax.random.key(0), (3, 5, 6))
    layer = nn.DenseGeneral((2, 4))  # axis=-1, an int
    rows = np.asarray(linear_layers.input_rows(layer, x))
    np.testing.assert_array_equal(rows, np.asarray(x).reshape(15, 6))

  def test_einsum_rows_follow_the_kernel_label_order(self):
    x = jax.random.normal(jax.random.key(0), (2, 3, 4, 5))  # b t n h
    layer = nnx.Einsum("btnh,nhd->btd", (4, 5, 6), rngs=nnx.Rngs(0))
    rows = np.asarray(linear_layers.input_rows(layer, x))
    np.testing.assert_array_equal(rows, np.asarray(x).reshape(6, 20))
    # Labels in another order in the input: 'bnth' still gives rows (n, h).
    xt = jnp.transpose(x, (0, 2, 1, 3))
    layer2 = nnx.Einsum("bnth,nhd->btd", (4, 5, 6), rngs=nnx.Rngs(0))
    rows2 = np.asarray(linear_layers.input_rows(layer2, xt))
    np.testing.assert_array_equal(rows2, rows)

  def test_einsum_whose_contraction_does_not_lead_is_not_calibrated(self):
    layer = nn.Einsum((5, 4), "btd,fd->btf")
    self.assertIsNone(linear_layers.einsum_contracted(layer))
    with self.assertRaisesRegex(ValueError, "do not lead its kernel"):
      linear_layers.input_rows(layer, jnp.ones((1, 2, 4)))

  def test_kinds(self):
    self.assertEqual(linear_layers.kind(nn.Dense(3)), "dense")
    self.assertEqual(
      linear_layers.kind(nnx.Linear(2, 3, rngs=nnx.Rngs(0))), "dense"
    )
    self.assertIsNone(linear_layers.kind(nn.DenseGeneral(3, batch_dims=(0,))))
    self.assertIsNone(linear_layers.kind(nn.ConvLocal(3, (3, 3))))
    self.assertIsNone(linear_layers.kind(nn.Embed(4, 3)))


if __name__ == "__main__":
  absltest.main()
