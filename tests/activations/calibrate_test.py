"""Static observers (min-max, percentile, MSE) against NumPy over the layer
inputs a test-written model really sees, Linen and NNX."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from flax import nnx

from qjax import activations
from qjax.activations import observers
from tests.activations import quantizer_test

_SEEN: dict[str, list] = {}


class _RecordingDense(nn.Dense):
  """A user's Dense that keeps a copy of every input it receives."""

  def __call__(self, x):
    _SEEN.setdefault("/".join(self.scope.path), []).append(np.asarray(x))
    return super().__call__(x)


class _Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.gelu(_RecordingDense(48, name="up")(x))
    h = h * jnp.where(jnp.arange(48) == 7, 30.0, 1.0)  # an outlier channel
    return _RecordingDense(16, name="down")(h)


def _batches(n=4, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal((3, 5, 24)).astype(np.float32) for _ in range(n)]


def _float_inputs(model, variables, batches, path):
  _SEEN.clear()
  for b in batches:
    model.apply(variables, b)
  return np.concatenate([a.reshape(-1) for a in _SEEN[path]])


def _mse_reference(x, quant):
  amax = np.float32(np.abs(x).max())
  best, best_err = None, np.inf
  for r in quant.mse_ratios:
    s = np.float32(amax * np.float32(r)) / np.float32(quant.fmt.max)
    y = quantizer_test._round_element(x / s, quant.name, quant.fmt)
    err = np.sum((y.astype(np.float32) * s - x).astype(np.float64) ** 2)
    if err < best_err:
      best, best_err = r, err
  return np.float32(amax * np.float32(best))


class LinenObserversTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.model = _Mlp()
    self.batches = _batches()
    self.vars = self.model.init(jax.random.key(0), self.batches[0])

  def _scale(self, observer, fmt="int8", **kw):
    q = activations.act_quant(
      fmt, "tensor", static=True, observer=observer, **kw
    )
    recipe = activations.recipe(
      activations.act_rule(
        "down", fmt, "tensor", static=True, observer=observer, **kw
      )
    )
    scales = activations.calibrate(
      self.model, self.vars, self.batches, recipe, progress=False
    )
    self.assertEqual(sorted(scales), ["down"])
    return q, float(scales["down"])

  def test_minmax_is_the_largest_input(self):
    x = _float_inputs(self.model, self.vars, self.batches, "down")
    _, got = self._scale("minmax")
    self.assertEqual(got, np.float32(np.abs(x).max()) / np.float32(127))

  def test_percentile_matches_numpy_over_all_values(self):
    x = _float_inputs(self.model, self.vars, self.batches, "down")
    for p in (99.9, 99.0, 50.0):
      _, got = self._scale("percentile", percentile=p)
      want = np.float32(np.percentile(np.abs(x).astype(np.float64), p))
      self.assertEqual(got, want / np.float32(127), f"percentile {p}")
      self.assertLess(got, np.abs(x).max() / 127)  # not the min-max range

  def test_mse_picks_the_numpy_best_clip(self):
    x = _float_inputs(self.model, self.vars, self.batches, "down")
    quant, got = self._scale("mse", fmt="int4")
    self.assertEqual(got, _mse_reference(x, quant) / np.float32(7))
    self.assertLess(got, np.abs(x).max() / 7)  # the outlier is clipped

  def test_percentile_helper_equals_numpy_at_every_rank(self):
    rng = np.random.default_rng(3)
    v = np.abs(rng.standard_normal(1001)).astype(np.float32)
    desc = -np.sort(-v)
    for p in (0.1, 12.5, 50, 99.37, 100):
      k = observers.keep_count(v.size, p)
      got = observers.percentile_of(desc[:k], v.size, p)
      self.assertEqual(got, np.percentile(v.astype(np.float64), p))

  def test_scales_drive_inference(self):
    recipe = activations.recipe(
      activations.act_rule("down", "int8", "tensor", static=True)
    )
    scales = activations.calibrate(
      self.model, self.vars, self.batches, recipe, progress=False
    )
    import qjax  # noqa: PLC0415

    _SEEN.clear()
    qjax.apply(
      self.model,
      self.vars,
      self.batches[0],
      activations=recipe,
      act_scales=scales,
    )
    seen = _SEEN["down"][0]
    s = np.float32(scales["down"])
    x = _float_inputs(self.model, self.vars, self.batches[:1], "down")
    want = np.clip(np.rint(x / s), -128, 127).astype(np.float32) * s
    np.testing.assert_array_equal(seen.reshape(-1), want)

  def test_static_rule_that_matches_nothing_is_an_error(self):
    recipe = activations.recipe(
      activations.act_rule("nowhere", "int8", "tensor", static=True)
    )
    with self.assertRaisesRegex(ValueError, "matched a static"):
      activations.calibrate(
        self.model, self.vars, self.batches, recipe, progress=False
      )

  def test_jitted_calibration_is_refused(self):
    recipe = activations.recipe(
      activations.act_rule("down", "int8", "tensor", static=True)
    )

    class Plain(nn.Module):
      @nn.compact
      def __call__(self, x):
        return nn.Dense(4, name="down")(x)

    class Jitted(nn.Module):
      @nn.compact
      def __call__(self, x):
        return nn.jit(Plain)(name="inner")(x)

    m = Jitted()
    v = m.init(jax.random.key(0), self.batches[0])
    with self.assertRaisesRegex(ValueError, "eagerly"):
      activations.calibrate(m, v, self.batches, recipe, progress=False)


class _NnxMlp(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(24, 48, rngs=rngs)
    self.down = nnx.Linear(48, 16, rngs=rngs)

  def __call__(self, x):
    return self.down(nnx.relu(self.up(x)))


class NnxObserversTest(absltest.TestCase):
  def test_minmax_and_percentile_on_an_nnx_model(self):
    model = _NnxMlp(nnx.Rngs(0))
    batches = _batches(seed=1)
    h = np.concatenate(
      [np.asarray(nnx.relu(model.up(b))).reshape(-1) for b in batches]
    )
    recipe = activations.recipe(
      activations.act_rule(
        "down",
        "float8_e4m3fn",
        "tensor",
        static=True,
        observer="percentile",
        percentile=99.5,
      ),
      activations.act_rule("up", "int8", "tensor", static=True),
    )
    scales = activations.calibrate(model, None, batches, recipe, progress=False)
    want = np.float32(np.percentile(np.abs(h).astype(np.float64), 99.5))
    self.assertEqual(float(scales["down"]), want / np.float32(448))
    x = np.concatenate([b.reshape(-1) for b in batches])
    self.assertEqual(
      float(scales["up"]), np.float32(np.abs(x).max()) / np.float32(127)
    )


if __name__ == "__main__":
  absltest.main()
