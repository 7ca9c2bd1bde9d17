"""Calibration on models qjax has never seen: blocks found by watching the
float model (qjax.calibration.discover), for Linen and NNX, and the same
codes as the hand-written BlockModels of the shipped models."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest
from flax import nnx

import qjax
from qjax import calibration, formats, intercept
from tests import user_models as um


def _lm_recipe(method, bits="int3"):
  # q/k/v kernels are [dim, heads, head_dim]: one scale per (head, column).
  return qjax.Recipe(
    (
      qjax.rule(
        r"attn/(q|k|v)/kernel",
        bits,
        formats.per_block(um.DIM, 0),
        method=method,
      ),
      qjax.rule("kernel", bits, method=method),
    )
  )


def _quiet(fn, *args, **kwargs):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # rank-deficient G: LayerNorm-like inputs
    return fn(*args, **kwargs)


def _leaves_equal(test, a, b):
  fa = jax.tree_util.tree_leaves_with_path(a)
  fb = jax.tree_util.tree_leaves_with_path(b)
  test.assertEqual([p for p, _ in fa], [p for p, _ in fb])
  for (p, x), (_, y) in zip(fa, fb, strict=True):
    np.testing.assert_array_equal(x, y, err_msg=qjax.api.path_str(p))


class NnxLanguageModelTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    cls.lm = um.TinyLM()
    cls.params = nnx.state(cls.lm, nnx.Param)
    cls.calib = um.token_batches(8, 0)
    cls.held = um.token_batches(4, 99)
    graphdef, _, rest = nnx.split(cls.lm, nnx.Param, ...)
    cls.forward = staticmethod(lambda p, ids: nnx.merge(graphdef, p, rest)(ids))

  def _held_out_error(self, q):
    dq = qjax.dequantize(q)
    return np.mean(
      [
        float(
          jnp.mean((self.forward(dq, b) - self.forward(self.params, b)) ** 2)
        )
        for b in self.held
      ]
    )

  def test_blocks_and_chains(self):
    walk = calibration.discover(self.lm, self.params.to_pure_dict(), self.calib)
    self.assertEqual(walk.names, ("layers/0", "layers/1"))
    # layers/1 takes layers/0's output and the same mask: a chain.
    self.assertIsNone(walk.records[0]["template"])
    self.assertIsNotNone(walk.records[1]["template"])

  def test_gptq_and_ed_beat_rtn_on_held_out_tokens(self):
    rtn = self._held_out_error(qjax.quantize(self.params, _lm_recipe("rtn")))
    errors = {}
    for method in ("gptq", "ed"):
      q = _quiet(
        qjax.quantize,
        self.params,
        _lm_recipe(method),
        calib=(self.lm, self.calib),
      )
      self.assertIsInstance(q, nnx.State)
      for name in ("q", "o"):
        self.assertIsInstance(
          q["layers"][1]["attn"][name]["kernel"].get_value(), qjax.QTensor
        )
      errors[method] = self._held_out_error(q)
    # Measured: RTN 0.198, GPTQ 0.105, ED 0.114 (int3, per output).
    self.assertLess(errors["gptq"], 0.8 * rtn, errors)
    self.assertLess(errors["ed"], 0.8 * rtn, errors)

  def test_statistics_of_each_layer_kind_are_its_input_rows(self):
    # Slow reference: capture every layer's input by hand, then X^T X.
    walk = calibration.discover(self.lm, self.params.to_pure_dict(), self.calib)
    pure = self.params.to_pure_dict()
    calls = walk.first_calls(pure, self.calib[:2])
    hs = walk.hessians("layers/0", pure["layers"][0], calls)
    block = self.lm.layers[0]
    seen = {}

    def keep(layer, next_fun, args, kwargs):
      seen.setdefault(intercept.path(layer), []).append(np.asarray(args[0]))
      return next_fun(*args, **kwargs)

    for args, kwargs in calls:
      with intercept.nnx_calls(block, keep, lambda m: m is not block):
        block(*args, **kwargs)
    x = np.concatenate(seen["attn/q"]).reshape(-1, um.DIM).astype(np.float64)
    np.testing.assert_allclose(
      hs["attn/q/kernel"], 2 * x.T @ x / len(x), rtol=1e-5, atol=1e-5
    )
    # The Einsum 'btnh,nhd->btd' contracts n and h: rows [n*h].
    o = np.concatenate(seen["attn/o"]).reshape(-1, um.HEADS * um.HEAD_DIM)
    o = o.astype(np.float64)
    np.testing.assert_allclose(
      hs["attn/o/kernel"], 2 * o.T @ o / len(o), rtol=1e-5, atol=1e-5
    )


class LinenCnnTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    cls.model = um.TinyCNN()
    cls.v = um.cnn_variables()
    cls.calib = um.image_batches(16, 0)
    cls.held = um.image_batches(8, 7)
    cls.stats = {"batch_stats": cls.v["batch_stats"]}

  def _held_out_error(self, q):
    dq = {**self.v, "params": qjax.dequantize(q)}
    return np.mean(
      [
        float(
          jnp.mean((self.model.apply(dq, b) - self.model.apply(self.v, b)) ** 2)
        )
        for b in self.held
      ]
    )

  def test_blocks_chains_and_breaks(self):
    walk = calibration.discover(
      self.model, self.v["params"], self.calib, collections=self.stats
    )
    self.assertEqual(walk.names, ("stem", "block1", "block2", "classifier"))
    chains = [r["template"] is not None for r in walk.records]
    # stem_bn sits between stem and block1, pooling before the classifier.
    self.assertEqual(chains, [False, False, True, False])
    # Every block's calls (chained or re-run) are the float model's.
    calls = walk.first_calls(self.v["params"], self.calib[:2])
    prev = None
    for index, name in enumerate(walk.names):
      if index:
        outs = [walk.run(walk.names[index - 1], prev, c) for c in calls]
        calls = walk.next_calls(index, outs, self.v["params"], None)
      seen = []

      def keep(module, next_fun, args, kwargs, name=name, seen=seen):
        if intercept.path(module) == name:
          seen.append(args[0])
        return next_fun(*args, **kwargs)

      with intercept.calls(keep):
        for b in self.calib[:2]:
          self.model.apply(self.v, b)
      for (args, _), want in zip(calls, seen, strict=True):
        np.testing.assert_array_equal(args[0], want)
      prev = self.v["params"][name]

  def test_gptq_and_ed_beat_rtn_on_held_out_images(self):
    recipe = qjax.Recipe((qjax.rule("kernel", "int3"),))
    rtn = self._held_out_error(qjax.quantize(self.v["params"], recipe))
    errors = {}
    for method in ("gptq", "ed"):
      q = _quiet(
        qjax.quantize,
        self.v["params"],
        qjax.Recipe((qjax.rule("kernel", "int3", method=method),)),
        calib=(self.model, self.calib, self.stats),
      )
      # The depthwise and the 3x3 stem convs are calibrated too.
      self.assertIsInstance(q["block1"]["Conv_0"]["kernel"], qjax.QTensor)
      errors[method] = self._held_out_error(q)
    # Measured: RTN 7.4e-3, GPTQ 1.7e-3, ED 3.4e-3 (int3 per channel).
    self.assertLess(errors["gptq"], 0.6 * rtn, errors)
    self.assertLess(errors["ed"], 0.6 * rtn, errors)

  def test_explicit_blocks(self):
    recipe = qjax.Recipe(
      (
        qjax.rule("block2|classifier", "int4", method="gptq"),
        qjax.rule("kernel", "int4"),
      )
    )
    walk = calibration.discover(
      self.model,
      self.v["params"],
      self.calib[:2],
      blocks=["block2", "classifier"],
      collections=self.stats,
    )
    self.assertEqual(walk.names, ("block2", "classifier"))
    q = qjax.quantize(self.v["params"], recipe, calib=(walk, self.calib[:2]))
    self.assertIsInstance(q["stem"]["kernel"], qjax.QTensor)  # RTN
    self.assertIsInstance(q["block2"]["Conv_1"]["kernel"], qjax.QTensor)

  def test_a_block_called_twice_is_an_error(self):
    class Twice(nn.Module):
      @nn.compact
      def __call__(self, x):
        dense = nn.Dense(x.shape[-1], name="shared")
        return dense(dense(x))

    x = jnp.ones((2, 4))
    params = Twice().init(jax.random.key(0), x)["params"]
    with self.assertRaisesRegex(
      ValueError, "'shared' is called more than once"
    ):
      calibration.discover(Twice(), params, [x])

  def test_no_linear_layer_is_an_error(self):
    class Norm(nn.Module):
      @nn.compact
      def __call__(self, x):
        return nn.LayerNorm(name="ln")(x)

    x = jnp.ones((2, 4))
    params = Norm().init(jax.random.key(0), x)["params"]
    with self.assertRaisesRegex(ValueError, "no block with a linear layer"):
      calibration.discover(Norm(), params, [x])


@pytest.mark.e2e  # whole real models: make test-quick skips them
class ShippedModelsTest(absltest.TestCase):
  def test_smollm2_discovery_gives_the_block_model_codes(self):
    from qjax.models import smollm2

    params = smollm2.load_params(layers=2)
    text = "In the beginning God created the heaven and the earth. " * 4
    ids = jnp.asarray(smollm2.tokenizer().encode(text).ids, jnp.int32)
    batches = [ids[None, :24], ids[None, 24:48]]
    model = smollm2.model_for(params)
    for method, scaling in (("gptq", formats.per_block(64)), ("ed", None)):
      recipe = qjax.Recipe(
        (qjax.rule("kernel", "int4", scaling, method=method),)
      )
      by_hand = _quiet(
        qjax.quantize,
        params,
        recipe,
        calib=(smollm2.block_model(params), batches),
      )
      found = _quiet(qjax.quantize, params, recipe, calib=(model, batches))
      _leaves_equal(self, found, by_hand)

  def test_mobilenet_v2_discovery_gives_the_block_model_codes(self):
    from qjax.models import mobilenet_v2 as mnv2

    v = mnv2.load_variables()
    images = mnv2.photos(2)
    batches = [images[:1], images[1:]]
    recipe = qjax.Recipe((qjax.rule("kernel", "int4", method="gptq"),))
    by_hand = qjax.quantize(
      v["params"],
      recipe,
      calib=(mnv2.block_model(v["params"], v["batch_stats"]), batches),
    )
    found = qjax.quantize(
      v["params"],
      recipe,
      calib=(mnv2.MobileNetV2(), batches, {"batch_stats": v["batch_stats"]}),
    )
    _leaves_equal(self, found, by_hand)


if __name__ == "__main__":
  absltest.main()
