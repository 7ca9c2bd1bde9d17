"""SmoothQuant: Eq. (4) against NumPy, the calibration statistic against the
inputs a test-written model really sees, the stage against GPTQ of the
smoothed problem, the leaf at inference and through a checkpoint."""

import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

import qjax
from qjax import activations
from qjax.io import checkpoint
from qjax.methods import Stats
from qjax.transforms import rotated, smoothquant

_SEEN: dict[str, list] = {}


class _Dense(nn.DenseGeneral):
  """A user's layer that keeps a copy of every input it receives (a
  DenseGeneral, so that qjax.apply runs its own code for packed kernels)."""

  def __call__(self, x):
    if not isinstance(x, jax.core.Tracer):  # calibration runs under jit
      _SEEN.setdefault(self.name, []).append(np.asarray(x))
    return super().__call__(x)


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = _Dense(64, name="up")(x)
    h = h * jnp.where(jnp.arange(64) == 9, 40.0, 1.0)  # an outlier channel
    return _Dense(32, name="down")(nn.gelu(h))


class _Model(nn.Module):
  @nn.compact
  def __call__(self, x):
    return _Block(name="block")(x)


def _batches(seed=0, n=3):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal((2, 8, 32)).astype(np.float32) for _ in range(n)]


def _numpy_scales(absmax, w, alpha):
  a = np.maximum(absmax.astype(np.float64), 1e-5)
  m = np.maximum(np.abs(w.astype(np.float64)).max(-1), 1e-5)
  return a**alpha / m ** (1 - alpha)


class ScalesTest(absltest.TestCase):
  def test_equation_4(self):
    rng = np.random.default_rng(0)
    absmax = np.abs(rng.standard_normal(16)).astype(np.float32) * 10
    absmax[3] = 0.0  # a dead channel: clamped, finite
    w = rng.standard_normal((16, 8)).astype(np.float32)
    for alpha in (0.5, 0.8):
      got = np.asarray(smoothquant.smoothing_scales(absmax, w, alpha))
      want = _numpy_scales(absmax, w, alpha)
      np.testing.assert_allclose(got, want, rtol=2e-6)
    with self.assertRaisesRegex(ValueError, "alpha must be in"):
      qjax.SmoothQuant(alpha=1.5)


class ModelTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.model, self.batches = _Model(), _batches()
    self.params = self.model.init(jax.random.key(0), self.batches[0])["params"]
    _SEEN.clear()
    for b in self.batches:
      self.model.apply({"params": self.params}, b)
    self.inputs = {k: np.concatenate(v) for k, v in _SEEN.items()}

  def _quantize(self, method, fmt="int8"):
    recipe = qjax.Recipe((qjax.rule("kernel", fmt, method=method),))
    return qjax.quantize(
      self.params, recipe, calib=(self.model, self.batches), progress=False
    )

  def test_scales_come_from_the_inputs_each_layer_sees(self):
    q = self._quantize(qjax.chain(qjax.SmoothQuant(0.5), qjax.RTN()))
    for name in ("up", "down"):
      leaf = q["block"][name]["kernel"]
      self.assertIsInstance(leaf, smoothquant.Smoothed)
      x = self.inputs[name].reshape(-1, leaf.shape[0])
      w = np.asarray(self.params["block"][name]["kernel"])
      want = _numpy_scales(np.abs(x).max(0), w, 0.5)
      np.testing.assert_allclose(leaf.s, want, rtol=2e-6)
      # dequantize() is in the model's basis (an error of step / (2 s_j) per
      # row, larger where s_j is small)
      err = np.abs(np.asarray(leaf.dequantize()) - w).max()
      self.assertLess(err, 0.05 * np.abs(w).max())

  def test_gptq_after_smoothing_is_gptq_of_the_smoothed_problem(self):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((48, 8)).astype(np.float32)
    mix = rng.standard_normal((48, 48)) * np.linspace(0.1, 2, 48)
    x = (rng.standard_normal((256, 48)) @ mix).astype(np.float32)
    x[:, 7] *= 30
    h = (2 / 256) * x.T @ x
    absmax = np.abs(x).max(0)
    fmt, scaling = qjax.formats.get("int4"), qjax.formats.per_channel(-1)
    stats = Stats(hessian=jnp.asarray(h), input_absmax=jnp.asarray(absmax))
    got = qjax.chain(qjax.SmoothQuant(), qjax.GPTQ())(w, fmt, scaling, stats)
    s = np.asarray(smoothquant.smoothing_scales(absmax, w, 0.5))
    ref, _ = qjax.gptq(
      w * s[:, None], h / s[:, None] / s[None, :], fmt, scaling
    )
    np.testing.assert_array_equal(got.leaf.inner.codes, ref.codes)
    np.testing.assert_array_equal(got.leaf.inner.scale, ref.scale)
    np.testing.assert_allclose(
      got.leaf.dequantize(),
      np.asarray(ref.dequantize()) / s[:, None],
      rtol=1e-6,
    )

  def test_activation_rule_quantizes_x_over_s(self):
    q = self._quantize(qjax.chain(qjax.SmoothQuant(0.5), qjax.RTN()))
    recipe = activations.recipe(activations.act_rule("down", "int8", "token"))
    _SEEN.clear()
    qjax.apply(
      self.model,
      {"params": q},
      self.batches[0],
      activations=recipe,
      mode="dequantize",
    )
    seen = _SEEN["down"][0]
    _SEEN.clear()
    qjax.apply(self.model, {"params": q}, self.batches[0], mode="dequantize")
    x = _SEEN["down"][0]
    s = np.asarray(q["block"]["down"]["kernel"].s)
    y = x / s
    scale = np.abs(y).max(-1, keepdims=True) / np.float32(127)
    want = (np.clip(np.rint(y / scale), -128, 127) * scale).astype(np.float32)
    np.testing.assert_allclose(seen, want * s, rtol=1e-6, atol=1e-7)

  def test_pointwise_conv_is_smoothed_like_a_dense_layer(self):
    class Pointwise(nn.Module):
      @nn.compact
      def __call__(self, x):
        h = nn.Conv(64, (1, 1), name="expand")(x)
        h = h * jnp.where(jnp.arange(64) == 9, 40.0, 1.0)
        return nn.Conv(32, (1, 1), name="project")(nn.gelu(h))

    model = Pointwise()
    batches = [b.reshape(2, 2, 4, 32) for b in self.batches]
    params = model.init(jax.random.key(2), batches[0])["params"]
    recipe = qjax.Recipe(
      (qjax.rule("kernel", "int16", method="smoothquant+rtn"),)
    )
    q = qjax.quantize(params, recipe, calib=(model, batches))
    leaf = q["project"]["kernel"]
    self.assertIsInstance(leaf, smoothquant.Smoothed)
    self.assertEqual(leaf.s.shape, (64,))
    # Eq. (4) from the inputs the project conv sees and its [in, out] matrix
    x = np.concatenate(
      [
        np.asarray(
          nn.Conv(64, (1, 1)).apply({"params": params["expand"]}, b)
        ).reshape(-1, 64)
        * np.where(np.arange(64) == 9, 40.0, 1.0)
        for b in batches
      ]
    )
    x = np.asarray(jax.nn.gelu(x))
    w = np.asarray(params["project"]["kernel"]).reshape(64, 32)
    np.testing.assert_allclose(
      leaf.s, _numpy_scales(np.abs(x).max(0), w, 0.5), rtol=1e-4
    )
    int16 = activations.recipe(activations.act_rule("", "int16", "token"))
    got = qjax.apply(model, {"params": q}, batches[0], activations=int16)
    want = model.apply({"params": params}, batches[0])
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)

  def test_smoothing_lowers_w8a8_error_on_an_outlier_channel(self):
    recipe = activations.recipe(activations.act_rule("down", "int8", "token"))
    x = self.batches[0]
    want = self.model.apply({"params": self.params}, x)
    errs = {}
    for name, method in (
      ("plain", qjax.RTN()),
      ("smooth", qjax.chain(qjax.SmoothQuant(0.5), qjax.RTN())),
    ):
      q = self._quantize(method)
      y = qjax.apply(self.model, {"params": q}, x, activations=recipe)
      errs[name] = float(jnp.mean(jnp.square(y - want)))
    self.assertLess(errs["smooth"], errs["plain"])

  def test_smoothed_and_rotated_leaf_survives_a_checkpoint(self):
    params = {
      "d": {"kernel": np.asarray(self.params["block"]["down"]["kernel"])}
    }
    stats = Stats(input_absmax=jnp.linspace(0.5, 30.0, 64))
    leaf = qjax.chain(qjax.SmoothQuant(), qjax.Hadamard(), qjax.RTN())(
      params["d"]["kernel"],
      qjax.formats.get("int4"),
      qjax.formats.per_channel(-1),
      stats,
    ).leaf
    self.assertIsInstance(leaf.inner, rotated.Rotated)
    q = {"d": {"kernel": leaf}}
    with tempfile.TemporaryDirectory() as d:
      checkpoint.save(f"{d}/ck", q)
      back = checkpoint.restore(f"{d}/ck")["d"]["kernel"]
    self.assertIsInstance(back.inner, rotated.Rotated)
    np.testing.assert_array_equal(back.s, leaf.s)
    np.testing.assert_array_equal(back.dequantize(), leaf.dequantize())


if __name__ == "__main__":
  absltest.main()
