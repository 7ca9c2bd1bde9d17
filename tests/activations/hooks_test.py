"""Activation rules applied through interception, on models written here
(Linen and NNX): each matched layer receives exactly the fake-quant of its
float input, unmatched layers receive theirs unchanged, and weights and
activations quantize together."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from flax import nnx

import qjax
from qjax import activations
from tests.activations import quantizer_test

_SEEN: dict[str, list] = {}


def _record(path, x):
  _SEEN.setdefault(path, []).append(np.asarray(x, np.float32))


class _Dense(nn.Dense):
  def __call__(self, x):
    _record("/".join(self.scope.path), x)
    return super().__call__(x)


class _Attention(nn.Module):
  """A user's attention with its K/V cache marked by Taps."""

  @nn.compact
  def __call__(self, x):
    q = _Dense(32, name="q")(x)
    k = activations.Tap(name="k_cache")(_Dense(32, name="k")(x))
    v = activations.Tap(name="v_cache")(_Dense(32, name="v")(x))
    _record("k_used", k)
    w = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q, k) / 8.0, -1)
    return _Dense(24, name="o")(jnp.einsum("bts,bsd->btd", w, v))


def _x(seed=0):
  x = np.random.default_rng(seed).standard_normal((2, 6, 24))
  x[..., 3] *= 20
  return x.astype(np.float32)


def _fq(x, name, granularity):
  return quantizer_test._reference(x, name, qjax.formats.get(name), granularity)


class LinenTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.model = _Attention()
    self.x = _x()
    self.vars = self.model.init(jax.random.key(0), self.x)
    _SEEN.clear()
    self.model.apply(self.vars, self.x)
    self.float_inputs = {k: v[0] for k, v in _SEEN.items()}
    _SEEN.clear()

  def test_matched_layers_get_the_fake_quant_of_their_input(self):
    recipe = activations.recipe(
      activations.act_rule("o", "skip"),
      activations.act_rule("q|k$|v$", "int8", "token"),
    )
    qjax.apply(self.model, self.vars, self.x, activations=recipe)
    for name in ("q", "k", "v"):
      np.testing.assert_array_equal(
        _SEEN[name][0], _fq(self.float_inputs[name], "int8", "token")
      )
    # 'o' is skipped: it sees the float attention of quantized q, k, v
    self.assertFalse(np.array_equal(_SEEN["o"][0], self.float_inputs["o"]))

  def test_kv_cache_taps(self):
    recipe = activations.recipe(
      activations.act_rule("k_cache|v_cache", "mxfp4")
    )
    qjax.apply(self.model, self.vars, self.x, activations=recipe)
    np.testing.assert_array_equal(
      _SEEN["k_used"][0],
      quantizer_test._mx_reference(self.float_inputs["k_used"], "mxfp4"),
    )
    np.testing.assert_array_equal(_SEEN["q"][0], self.float_inputs["q"])

  def test_weights_and_activations_together(self):
    wrecipe = qjax.Recipe((qjax.rule("kernel", "int4"),))
    qparams = qjax.quantize(self.vars["params"], wrecipe)
    recipe = activations.recipe(activations.act_rule("", "int8", "tensor"))
    got = qjax.apply(
      self.model, {"params": qparams}, self.x, activations=recipe
    )
    _SEEN.clear()
    want = qjax.apply(
      self.model,
      {"params": qjax.dequantize(qparams)},
      self.x,
      activations=recipe,
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    plain = qjax.apply(self.model, {"params": qparams}, self.x)
    self.assertGreater(float(jnp.abs(got - plain).max()), 1e-4)

  def test_under_jit_equals_eager(self):
    recipe = activations.recipe(activations.act_rule("", "nvfp4"))
    model = _Plain()
    v = model.init(jax.random.key(1), self.x[..., :16])
    eager = qjax.apply(model, v, self.x[..., :16], activations=recipe)
    jitted = jax.jit(lambda v, x: qjax.apply(model, v, x, activations=recipe))(
      v, self.x[..., :16]
    )
    np.testing.assert_array_equal(eager, jitted)

  def test_errors_name_the_layer(self):
    static = activations.recipe(
      activations.act_rule("q", "int8", "tensor", static=True)
    )
    with self.assertRaisesRegex(ValueError, "layer 'q'.*no calibrated"):
      qjax.apply(self.model, self.vars, self.x, activations=static)
    with self.assertRaisesRegex(ValueError, "without an activation recipe"):
      qjax.apply(self.model, self.vars, self.x, act_scales={"q": 1.0})

    class Heads(nn.Module):
      @nn.compact
      def __call__(self, x):  # contracts axis -2 of [b, t, h, d]
        return nn.DenseGeneral(8, axis=(-2, -1), name="proj")(x)

    m = Heads()
    x = np.ones((1, 2, 4, 32), np.float32)
    v = m.init(jax.random.key(0), x)
    blocks = activations.recipe(activations.act_rule("proj", "mxfp4"))
    with self.assertRaisesRegex(ValueError, "layer 'proj'.*last axis"):
      qjax.apply(m, v, x, activations=blocks)


class _Plain(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(16)(nn.gelu(nn.Dense(32)(x)))


class _NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(24, 32, rngs=rngs)
    self.down = nnx.Linear(32, 8, rngs=rngs)
    self.cache = activations.NnxTap()

  def __call__(self, x):
    h = self.cache(nnx.relu(self.up(x)))
    return self.down(h)


class NnxTest(absltest.TestCase):
  def test_nnx_inputs_are_fake_quantized(self):
    model = _NnxNet(nnx.Rngs(0))
    x = _x(1)
    h = np.asarray(nnx.relu(model.up(x)))
    recipe = activations.recipe(activations.act_rule("down", "float8_e4m3fn"))
    params = nnx.state(model, nnx.Param)
    got = qjax.apply(model, params, x, activations=recipe, mode="dequantize")
    want = model.down(_fq(h, "float8_e4m3fn", "token"))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    tap = activations.recipe(activations.act_rule("cache", "int4", "tensor"))
    got = qjax.apply(model, params, x, activations=tap, mode="dequantize")
    want = model.down(_fq(h, "int4", "tensor"))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # the model itself is untouched afterwards
    np.testing.assert_array_equal(model(x), model.down(h))


if __name__ == "__main__":
  absltest.main()
