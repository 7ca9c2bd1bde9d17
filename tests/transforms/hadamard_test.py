"""Hadamard rotations: the matrices, the float model left unchanged, the
weight stage against a NumPy reference of the rotated problem, and the
rotated leaf through a checkpoint."""

import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import qjax
from qjax import activations
from qjax.io import checkpoint
from qjax.methods import Stats
from qjax.transforms import hadamard, rotated


class MatrixTest(parameterized.TestCase):
  @parameterized.parameters(1, 2, 4, 12, 20, 28, 36, 64, 72, 384, 576, 1536)
  def test_entries_are_signs_and_rows_orthogonal(self, n):
    h = hadamard.hadamard(n)
    self.assertTrue(np.all(np.abs(h) == 1))
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n, dtype=np.int64))

  def test_block_diagonal_rotation_is_orthogonal(self):
    r = hadamard.rotation(96, block=32)
    np.testing.assert_allclose(r @ r.T, np.eye(96), atol=1e-12)
    self.assertEqual(np.count_nonzero(r[:32, 32:]), 0)

  def test_random_signs_keep_a_mean_from_becoming_an_outlier(self):
    x = np.full((1, 72), 0.5, np.float32)  # all positive, like a GELU's
    plain = np.asarray(hadamard.rotate_last(x, seed=None))
    signed = np.asarray(hadamard.rotate_last(x, seed=0))
    self.assertGreater(float(np.abs(plain).max()), 0.45 * np.sqrt(72))
    self.assertLess(float(np.abs(signed).max()), 0.5 * np.sqrt(72) / 3)
    np.testing.assert_array_equal(
      hadamard.rotation(72, seed=0), hadamard.rotation(72, seed=0)
    )

  def test_unbuilt_orders_are_clear_errors(self):
    with self.assertRaisesRegex(ValueError, "no Hadamard matrix of order 6"):
      hadamard.hadamard(6)
    with self.assertRaisesRegex(ValueError, "block 32 does not divide 48"):
      hadamard.rotation(48, 32)
    with self.assertRaisesRegex(ValueError, "block must be >= 0"):
      qjax.Hadamard(block=-1)

  def test_rotation_spreads_an_outlier(self):
    x = np.zeros((1, 64), np.float32)
    x[0, 5] = 8.0
    y = np.asarray(hadamard.rotate_last(x))
    np.testing.assert_allclose(np.abs(y), 1.0, rtol=1e-6)  # 8 / sqrt(64)


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(72, name="up")(x))
    return nn.Dense(36, name="down")(h)


def _data(seed=0):
  x = np.random.default_rng(seed).standard_normal((4, 9, 36))
  x[..., 2] *= 50  # an outlier channel
  return x.astype(np.float32)


class ModelTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.model, self.x = _Net(), _data()
    self.vars = self.model.init(jax.random.key(0), self.x)

  def test_float_model_output_is_unchanged(self):
    turn = activations.recipe(activations.act_rule("", "none", rotate=0))
    got = qjax.apply(self.model, self.vars, self.x, activations=turn)
    want = self.model.apply(self.vars, self.x)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    self.assertFalse(np.array_equal(got, want))  # it did rotate
    # and with both sides rotated, weights in the rotated basis at 16 bits
    recipe = qjax.Recipe((qjax.rule("kernel", "int16", method="hadamard+rtn"),))
    q = qjax.quantize(self.vars["params"], recipe)
    self.assertIsInstance(q["up"]["kernel"], rotated.Rotated)
    weights_only = qjax.apply(self.model, {"params": q}, self.x)
    # int16's own rounding (outputs up to ~50) is ~1e-4 of the output
    np.testing.assert_allclose(weights_only, want, rtol=2e-3, atol=2e-3)
    # a rotated kernel rotates its input itself: an int16 activation rule
    # quantizes x R, and the output stays the float one
    int16 = activations.recipe(activations.act_rule("", "int16", "token"))
    both = qjax.apply(self.model, {"params": q}, self.x, activations=int16)
    np.testing.assert_allclose(both, want, rtol=2e-3, atol=2e-3)
    with self.assertRaisesRegex(ValueError, "stored Hadamard-rotated"):
      qjax.apply(self.model, {"params": q}, self.x, activations=turn)

  def test_rotation_lowers_int4_error_on_an_outlier_channel(self):
    x = self.x  # channel 2 is 50x the others
    quant = activations.act_quant("int4", "token")
    plain = activations.fake_quant(x, quant)
    turned = hadamard.rotate_last(
      activations.fake_quant(hadamard.rotate_last(x), quant), transpose=True
    )
    err_plain = float(jnp.mean(jnp.square(plain - x)))
    err_turned = float(jnp.mean(jnp.square(turned - x)))
    self.assertLess(err_turned, err_plain / 2)


class StageTest(absltest.TestCase):
  def test_hadamard_gptq_is_gptq_of_the_rotated_problem(self):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((72, 16)).astype(np.float32)
    w[5] *= 20
    mix = rng.standard_normal((72, 72)) * np.linspace(0.1, 2, 72)
    x = (rng.standard_normal((512, 72)) @ mix).astype(np.float32)
    h = (2 / 512) * x.T @ x  # strongly correlated inputs: H matters
    fmt, scaling = qjax.formats.get("int4"), qjax.formats.per_channel(-1)
    got = qjax.chain(qjax.Hadamard(), qjax.GPTQ())(
      w, fmt, scaling, Stats(hessian=jnp.asarray(h))
    ).leaf
    r = hadamard.rotation(72, seed=0)
    w_r = (r.T @ w.astype(np.float64)).astype(np.float32)
    h_r = (r.T @ h.astype(np.float64) @ r).astype(np.float32)
    ref, _ = qjax.gptq(w_r, h_r, fmt, scaling)
    self.assertIsInstance(got, rotated.Rotated)
    # float32 rotations differ from these float64 ones in the last bits,
    # which moves a few near-tie decisions; a wrongly mapped H (R H R^T, or
    # none) changes most of them.
    codes = lambda q: qjax.formats.unpack(q.codes, 4, 16)  # noqa: E731
    same = np.mean(np.asarray(codes(got.inner)) == np.asarray(codes(ref)))
    self.assertGreater(same, 0.97)
    wrong, _ = qjax.gptq(
      w_r, (r @ h.astype(np.float64) @ r.T).astype(np.float32), fmt, scaling
    )
    self.assertLess(
      np.mean(np.asarray(codes(wrong)) == np.asarray(codes(ref))), 0.9
    )
    back = r @ np.asarray(ref.dequantize(), np.float64)
    np.testing.assert_allclose(got.dequantize(), back, rtol=0, atol=0.05)

  def test_rotated_leaf_survives_a_checkpoint(self):
    params = {"d": {"kernel": _data(2)[0, :, :].T.copy()}}  # [36, 9]
    params["d"]["kernel"] = np.tile(params["d"]["kernel"], (1, 2))
    recipe = qjax.Recipe((qjax.rule("kernel", "int4", method="hadamard+rtn"),))
    q = qjax.quantize(params, recipe)
    with tempfile.TemporaryDirectory() as d:
      checkpoint.save(f"{d}/ck", q, recipe=recipe)
      back = checkpoint.restore(f"{d}/ck")
    self.assertIsInstance(back["d"]["kernel"], rotated.Rotated)
    np.testing.assert_array_equal(
      back["d"]["kernel"].dequantize(), q["d"]["kernel"].dequantize()
    )

  def test_conv_kernels_are_refused(self):
    with self.assertRaisesRegex(ValueError, r"Dense kernels.*\(3, 3, 4, 8\)"):
      qjax.Hadamard().transform(jnp.ones((3, 3, 4, 8)), Stats())

  def test_wide_conv_with_statistics_is_refused(self):
    # with calibration statistics a conv runs as its patch matrix [72, 8];
    # a rotation of patches is not what its input transform does
    w = np.random.default_rng(0).standard_normal((3, 3, 8, 8))
    recipe = qjax.Recipe((qjax.rule("kernel", "int4", method="hadamard+gptq"),))
    with self.assertRaisesRegex(ValueError, r"c/kernel.*mixes with its taps"):
      qjax.quantize(
        {"c": {"kernel": w.astype(np.float32)}},
        recipe,
        hessians={"c/kernel": jnp.eye(72)},
      )

  def test_pointwise_conv_rotates_like_a_dense_layer(self):
    # A 1x1 conv mixes channels only, so x R through R^T W is x W; a CNN's
    # pointwise convs take the rotation (MobileNetV2's expand/project).
    class Pointwise(nn.Module):
      @nn.compact
      def __call__(self, x):
        h = nn.relu(nn.Conv(72, (1, 1), name="expand")(x))
        return nn.Conv(36, (1, 1), name="project")(h)

    model = Pointwise()
    x = _data(3).reshape(4, 3, 3, 36)
    variables = model.init(jax.random.key(1), x)
    want = model.apply(variables, x)
    recipe = qjax.Recipe((qjax.rule("kernel", "int16", method="hadamard+rtn"),))
    q = qjax.quantize(variables["params"], recipe)
    leaf = q["expand"]["kernel"]
    self.assertIsInstance(leaf, rotated.Rotated)
    self.assertEqual(leaf.shape, (1, 1, 36, 72))
    int16 = activations.recipe(activations.act_rule("", "int16", "token"))
    got = qjax.apply(model, {"params": q}, x, activations=int16)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)
    # the stored weight is R^T W, not W: the output is float's only because
    # the input was rotated too
    inner = np.asarray(leaf.inner.dequantize()).reshape(36, 72)
    w = np.asarray(variables["params"]["expand"]["kernel"]).reshape(36, 72)
    r = hadamard.rotation(36, seed=0)
    np.testing.assert_allclose(inner, r.T @ w, rtol=0, atol=1e-3)
    self.assertGreater(np.abs(inner - w).max(), 0.1)


if __name__ == "__main__":
  absltest.main()
