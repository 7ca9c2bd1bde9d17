"""Calibrated weight methods that see quantized activations
(qjax.quantize(..., activations=)).

A method written here records the statistics it is handed. The reference
runs the two-block model by hand, block by block, with fake-quant
(qjax.activations.fake_quant, tested bit for bit elsewhere) at every layer
input a rule matches: block 0 on the calibration inputs, block 1 on what
block 0 gives with its quantized weights. The statistics must be those of
the quantized inputs, and differ from the float ones.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from flax import nnx

import qjax
from qjax import activations as act
from qjax.activations import quantizer

_HI = jax.lax.Precision.HIGHEST
_RECORDED = []


@dataclasses.dataclass(frozen=True)
class RecordingRTN(qjax.Quantizer):
  """RTN that keeps the statistics it receives (a user's own method)."""

  needs = frozenset({"hessian"})

  def quantize(self, w, fmt, scaling, stats):
    _RECORDED.append((np.asarray(w), stats))
    return qjax.RTN().quantize(w, fmt, scaling, stats)


@dataclasses.dataclass(frozen=True)
class RecordingTwoStream(qjax.Quantizer):
  needs = frozenset({"two_stream"})

  def quantize(self, w, fmt, scaling, stats):
    _RECORDED.append((np.asarray(w), stats))
    return qjax.RTN().quantize(w, fmt, scaling, stats)


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = jax.nn.gelu(nn.Dense(32, name="up")(x))
    return x + nn.Dense(16, name="down")(h)


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    return Block(name="block_1")(Block(name="block_0")(x))


class NnxBlock(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(16, 32, rngs=rngs)
    self.down = nnx.Linear(32, 16, rngs=rngs)

  def __call__(self, x):
    return x + self.down(jax.nn.gelu(self.up(x)))


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.block_0 = NnxBlock(rngs)
    self.block_1 = NnxBlock(rngs)

  def __call__(self, x):
    return self.block_1(self.block_0(x))


# Whole-model paths: a block run by itself must still match them.
_ACTS = act.recipe(act.act_rule(r"^block_[01]/(up|down)$", "int4", "token"))
_LAYERS = [(b, n) for b in ("block_0", "block_1") for n in ("up", "down")]


def _setup():
  net = Net()
  params = net.init(jax.random.key(0), jnp.ones((1, 16)))["params"]
  rng = np.random.default_rng(0)
  spread = np.linspace(0.1, 8.0, 16)  # uneven channels: int4 inputs hurt
  batches = [
    jnp.asarray(rng.standard_normal((64, 16)) * spread, jnp.float32)
    for _ in range(2)
  ]
  return net, params, batches


def _fq(x):
  return quantizer.fake_quant(x, _ACTS.rules[0].quant)


def _dense(p, x):
  return jnp.matmul(x, p["kernel"], precision=_HI) + p["bias"]


def _block_inputs(p, x, quantize):
  """The inputs of a block's up and down layers, and its output."""
  q = _fq if quantize else (lambda v: v)
  x_up = q(x)
  x_down = q(jax.nn.gelu(_dense(p["up"], x_up)))
  return x_up, x_down, x + _dense(p["down"], x_down)


def _gram(xs):
  rows = sum(x.shape[0] for x in xs)
  return sum(np.asarray(jnp.matmul(x.T, x, precision=_HI)) for x in xs) * (
    2.0 / rows
  )


def _reference_hessians(params, deq, batches, quantize=True):
  """H of each layer: block 0 with float weights on the batches, block 1
  with float weights on block 0's output under quantized weights."""
  out = {}
  xs = batches
  for name in ("block_0", "block_1"):
    ins = [_block_inputs(params[name], x, quantize) for x in xs]
    out[(name, "up")] = _gram([i[0] for i in ins])
    out[(name, "down")] = _gram([i[1] for i in ins])
    xs = [_block_inputs(deq[name], x, quantize)[2] for x in xs]
  return out


def _recorded_by_layer(params):
  got = {}
  for w, stats in _RECORDED:
    for b, layer_name in _LAYERS:
      if np.array_equal(w, np.asarray(params[b][layer_name]["kernel"])):
        got[(b, layer_name)] = stats
  return got


class AwareSequentialTest(absltest.TestCase):
  def setUp(self):
    _RECORDED.clear()

  def _check(self, got, ref, unaware):
    for layer in _LAYERS:
      np.testing.assert_allclose(
        got[layer], ref[layer], rtol=2e-5, atol=1e-6, err_msg=str(layer)
      )
      # int4 inputs move H well beyond float32 noise
      err = np.abs(unaware[layer] - ref[layer]).max()
      self.assertGreater(err, 1e-2 * np.abs(ref[layer]).max(), layer)

  def test_linen_hessians_are_those_of_the_quantized_inputs(self):
    net, params, batches = _setup()
    recipe = qjax.Recipe((qjax.rule("kernel", "int4", method=RecordingRTN()),))
    q = qjax.quantize(params, recipe, calib=(net, batches), activations=_ACTS)
    deq = qjax.dequantize(q)
    got = {k: s.hessian for k, s in _recorded_by_layer(params).items()}
    ref = _reference_hessians(params, deq, batches)
    unaware = _reference_hessians(params, deq, batches, quantize=False)
    self._check(got, ref, unaware)

  def test_without_rules_the_hessians_stay_float(self):
    net, params, batches = _setup()
    recipe = qjax.Recipe((qjax.rule("kernel", "int4", method=RecordingRTN()),))
    q = qjax.quantize(params, recipe, calib=(net, batches))
    got = {k: s.hessian for k, s in _recorded_by_layer(params).items()}
    ref = _reference_hessians(params, qjax.dequantize(q), batches, False)
    for layer in _LAYERS:
      np.testing.assert_allclose(got[layer], ref[layer], rtol=2e-5, atol=1e-6)

  def test_nnx_model_gets_the_same_hessians(self):
    net, params, batches = _setup()
    model = NnxNet(nnx.Rngs(0))
    for b, layer_name in _LAYERS:  # the Linen model's weights
      layer = getattr(getattr(model, b), layer_name)
      layer.kernel.set_value(params[b][layer_name]["kernel"])
      layer.bias.set_value(params[b][layer_name]["bias"])
    recipe = qjax.Recipe((qjax.rule("kernel", "int4", method=RecordingRTN()),))
    state = nnx.state(model, nnx.Param)
    q = qjax.quantize(state, recipe, calib=(model, batches), activations=_ACTS)
    deq = qjax.dequantize(q.to_pure_dict())
    got = {k: s.hessian for k, s in _recorded_by_layer(params).items()}
    self.assertLen(got, 4)
    ref = _reference_hessians(params, deq, batches)
    unaware = _reference_hessians(params, deq, batches, quantize=False)
    self._check(got, ref, unaware)

  def test_gptq_codes_change(self):
    net, params, batches = _setup()
    recipe = qjax.Recipe((qjax.rule("kernel", "int4", method="gptq"),))
    plain = qjax.quantize(params, recipe, calib=(net, batches))
    aware = qjax.quantize(
      params, recipe, calib=(net, batches), activations=_ACTS
    )
    for b, layer_name in _LAYERS:
      a, p = (
        aware[b][layer_name]["kernel"].codes,
        plain[b][layer_name]["kernel"].codes,
      )
      self.assertFalse(
        np.array_equal(np.asarray(a), np.asarray(p)), (b, layer_name)
      )


class AwareTwoStreamTest(absltest.TestCase):
  def test_only_the_quantized_stream_is_quantized(self):
    _RECORDED.clear()
    net, params, batches = _setup()
    recipe = qjax.Recipe(
      (qjax.rule("kernel", "int4", method=RecordingTwoStream()),)
    )
    q = qjax.quantize(params, recipe, calib=(net, batches), activations=_ACTS)
    deq = qjax.dequantize(q)
    got = _recorded_by_layer(params)
    self.assertLen(got, 4)
    xs_f, xs_q = batches, batches
    for name in ("block_0", "block_1"):
      f = [_block_inputs(params[name], x, False) for x in xs_f]
      # the quantized stream: weights quantized so far, inputs quantized
      qi = [_block_inputs(deq[name], x, True) for x in xs_q]
      for i, layer in enumerate(("up", "down")):
        x = np.concatenate([np.asarray(r[i]) for r in f])
        xq = np.concatenate([np.asarray(r[i]) for r in qi])
        s = got[(name, layer)]
        np.testing.assert_allclose(s.g, xq.T @ xq, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(s.c, xq.T @ x, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(s.mean_x, x.mean(0), rtol=1e-5, atol=1e-5)
      xs_f = [r[2] for r in f]
      xs_q = [r[2] for r in qi]


class AwareErrorsTest(absltest.TestCase):
  def test_activations_need_calibration(self):
    _, params, _ = _setup()
    recipe = qjax.Recipe((qjax.rule("kernel", "int4"),))
    with self.assertRaisesRegex(ValueError, "calib"):
      qjax.quantize(params, recipe, activations=_ACTS)
    with self.assertRaisesRegex(ValueError, "without activations"):
      qjax.quantize(params, recipe, act_scales={})


if __name__ == "__main__":
  absltest.main()
