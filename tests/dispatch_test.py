"""The one dispatcher: statistics checks, conv views, keys, errors."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

import qjax
from qjax import dispatch, formats
from qjax.methods import base


class DispatchTest(absltest.TestCase):
  def test_missing_statistics_name_the_parameter_and_the_need(self):
    rule = qjax.rule("k", "int4", method="gptq")
    with self.assertRaisesRegex(ValueError, "'a/k'.*'gptq' needs hessian"):
      dispatch.apply_rule(rule, jnp.ones((8, 4)), base.Stats(), "a/k")

  def test_a_pointwise_conv_is_quantized_as_its_matrix(self):
    w = jax.random.normal(jax.random.key(0), (1, 1, 16, 8))
    x = jax.random.normal(jax.random.key(1), (64, 16))
    stats = base.Stats(hessian=x.T @ x)
    rule = qjax.rule("k", "int4", formats.per_channel(-1), method="gptq")
    got = dispatch.apply_rule(rule, w, stats, "conv/k").leaf
    want = qjax.gptq(w[0, 0], stats.hessian, formats.get("int4"), rule.scaling)
    self.assertEqual(got.shape, (1, 1, 16, 8))
    np.testing.assert_array_equal(got.codes[0, 0], want[0].codes)
    # A 3x3 conv's statistics are over its patches (3*3*16 inputs): a
    # Hessian of the wrong size names the parameter.
    with self.assertRaisesRegex(ValueError, "'c/k'.*size 16 do not match"):
      dispatch.apply_rule(rule, jnp.ones((3, 3, 16, 8)), stats, "c/k")

  def test_a_ragged_block_longer_than_the_channels_is_one_block(self):
    # MobileNetV2's 16-channel pointwise convs under mxfp4 (blocks of 32,
    # ragged): one short block per output, the same scales as RTN's, and
    # GPTQ of the conv is GPTQ of its [16, 8] matrix
    w = jax.random.normal(jax.random.key(0), (1, 1, 16, 8))
    x = jax.random.normal(jax.random.key(1), (64, 16))
    stats = base.Stats(hessian=x.T @ x)
    rule = qjax.rule("k", "mxfp4", method="gptq", axis=-2, ragged=True)
    got = dispatch.apply_rule(rule, w, stats, "conv/k").leaf
    matrix = qjax.rule("k", "mxfp4", method="gptq", axis=-2, ragged=True)
    want = dispatch.apply_rule(matrix, w[0, 0], stats, "m/k").leaf
    np.testing.assert_array_equal(got.codes.reshape(-1), want.codes.reshape(-1))
    np.testing.assert_array_equal(got.scale.reshape(-1), want.scale.reshape(-1))
    self.assertEqual(got.scale.shape, (1, 1, 1, 8))
    # 144 channels: four blocks of 32 and a short one of 16
    w = jax.random.normal(jax.random.key(2), (1, 1, 144, 8))
    x = jax.random.normal(jax.random.key(3), (256, 144))
    stats = base.Stats(hessian=x.T @ x)
    got = dispatch.apply_rule(rule, w, stats, "conv/k").leaf
    want = dispatch.apply_rule(matrix, w[0, 0], stats, "m/k").leaf
    np.testing.assert_array_equal(got.codes.reshape(-1), want.codes.reshape(-1))
    np.testing.assert_array_equal(got.scale.reshape(-1), want.scale.reshape(-1))
    self.assertEqual(got.scale.shape, (1, 1, 5, 8))

  def test_each_leaf_gets_its_own_key(self):
    w = jax.random.uniform(jax.random.key(3), (8, 8))
    params = {"a": {"kernel": w}, "b": {"kernel": w}}
    rule = qjax.rule(
      "kernel",
      "int2",
      formats.per_tensor(),
      method=qjax.RTN(rounding="stochastic"),
    )
    tree, used = dispatch.quantize_tree(
      params, qjax.Recipe((rule,)), key=jax.random.key(0)
    )
    self.assertEqual(used, {0})
    a, b = (tree[k]["kernel"].codes for k in "ab")
    self.assertFalse(np.array_equal(a, b))  # same values, different keys
    with self.assertRaisesRegex(
      ValueError, "'a/kernel'.*needs quantize\\(key=\\)"
    ):
      dispatch.quantize_tree(params, qjax.Recipe((rule,)))

  def test_skip_leaves_paths_alone(self):
    params = {"a": {"kernel": jnp.ones((8, 8))}}
    tree, used = dispatch.quantize_tree(
      params, qjax.Recipe((qjax.rule("kernel", "int4"),)), skip={"a/kernel"}
    )
    self.assertIs(tree["a"]["kernel"], params["a"]["kernel"])
    self.assertEqual(used, set())

  def test_paths(self):
    tree = {"a": [{"b": 1}], "c": 2}
    got = [
      qjax.paths.path_str(p)
      for p, _ in jax.tree_util.tree_leaves_with_path(tree)
    ]
    self.assertEqual(got, ["a/0/b", "c"])


if __name__ == "__main__":
  absltest.main()
