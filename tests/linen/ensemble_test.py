"""PIPE ensembles on 8 simulated CPU devices (see conftest.py): members run
in parallel equal the single-device result; accounting adds up."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import qjax
from qjax import formats
from qjax.linen import ensemble
from qjax.transforms import residual

PARTITIONS = {
  "four": ((0,), (1,), (2,), (3,)),
  "pairs": ((0, 1), (2, 3)),
  "interleaved": ((0, 2), (1, 3)),
  "one_and_rest": ((0,), (1, 2, 3)),
}


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(48, name="d1")(x))
    x = nn.LayerNorm(name="norm")(x)  # shared by all members, counted once
    x = nn.gelu(nn.Dense(32, name="d2")(x))
    return nn.Dense(10, name="d3")(x)


def _setup(model, in_dim, keep, order=4):
  x = jax.random.normal(jax.random.key(1), (13, in_dim))  # 13: ragged batch
  params = model.init(jax.random.key(0), x)
  params = jax.tree.map(  # non-zero biases, so counting them twice shows
    lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), params
  )
  rule = qjax.rule(
    "kernel",
    "int4",
    formats.per_channel(),
    method="pipe",
    order=order,
    keep=keep,
  )
  return x, params, qjax.quantize(params, qjax.Recipe((rule,)))


class EnsembleTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.assertEqual(jax.device_count(), 8)

  @parameterized.product(partition=list(PARTITIONS), keep=[1.0, 0.5])
  def test_layer_psum_equals_expanded_model(self, partition, keep):
    model = MLP()
    x, _, q = _setup(model, 20, keep)
    groups = PARTITIONS[partition]
    members = ensemble.split_params(q, groups)
    mesh = ensemble.member_mesh(len(groups))
    out = ensemble.apply(
      model.apply,
      ensemble.stack(members),
      x,
      mesh=mesh,
      modules=ensemble.split_modules(q),
      combine="layer",
    )
    expanded = model.apply(qjax.dequantize(q), x)
    np.testing.assert_allclose(out, expanded, rtol=1e-5, atol=1e-5)
    single = ensemble.apply_sequential(model.apply, members, x, combine="layer")
    np.testing.assert_allclose(out, single, rtol=1e-5, atol=1e-5)

  @parameterized.parameters(*PARTITIONS)
  def test_output_ensemble_equals_its_single_device_sum(self, partition):
    model = MLP()
    x, _, q = _setup(model, 20, 0.5)
    members = ensemble.split_params(q, PARTITIONS[partition])
    out = ensemble.apply(
      model.apply,
      ensemble.stack(members),
      x,
      mesh=ensemble.member_mesh(len(members)),
      combine="output",
    )
    single = ensemble.apply_sequential(
      model.apply, members, x, combine="output"
    )
    np.testing.assert_allclose(out, single, rtol=1e-6, atol=1e-6)

  @parameterized.parameters(*PARTITIONS)
  def test_linear_model_output_ensemble_is_exact(self, partition):
    model = nn.Dense(7)
    x, _, q = _setup(model, 30, 0.5)
    members = ensemble.split_params(q, PARTITIONS[partition])
    # The bias is counted once: members other than the first hold zeros.
    for m in members[1:]:
      np.testing.assert_array_equal(m["params"]["bias"], 0)
    out = ensemble.apply(
      model.apply,
      ensemble.stack(members),
      x,
      mesh=ensemble.member_mesh(len(members)),
      combine="output",
    )
    expanded = model.apply(qjax.dequantize(q), x)
    np.testing.assert_allclose(out, expanded, rtol=1e-5, atol=1e-5)

  def test_output_ensemble_error_falls_as_member_one_grows(self):
    model = MLP()
    x, _, q = _setup(model, 20, 1.0)
    expanded = model.apply(qjax.dequantize(q), x)
    errors = []
    for groups in [((0,), (1, 2, 3)), ((0, 1), (2, 3)), ((0, 1, 2), (3,))]:
      members = ensemble.split_params(q, groups)
      out = ensemble.apply(
        model.apply,
        ensemble.stack(members),
        x,
        mesh=ensemble.member_mesh(2),
        combine="output",
      )
      errors.append(float(jnp.max(jnp.abs(out - expanded))))
    self.assertLess(errors[1], errors[0])
    self.assertLess(errors[2], errors[1])

  def test_accounting_adds_up_over_members(self):
    model = MLP()
    _, _, q = _setup(model, 20, 0.5)
    members = ensemble.split_params(q, PARTITIONS["one_and_rest"])
    total = qjax.stats(q, activation_bits=8)
    parts = [qjax.stats(m, activation_bits=8) for m in members]
    for path in ("params/d1/kernel", "params/d2/kernel", "params/d3/kernel"):
      for field in ("bytes", "macs", "bops"):
        self.assertEqual(sum(p[path][field] for p in parts), total[path][field])
    # d1: [20, 48] at order 4 with 24 kept columns per higher order.
    d1 = total["params/d1/kernel"]
    self.assertEqual(d1["macs"], 20 * (48 + 3 * 24))
    self.assertEqual(d1["bops"], 20 * (48 + 3 * 24) * 4 * 8)
    self.assertEqual(d1["orders"], 4)

  def test_bad_input(self):
    model = MLP()
    _, _, q = _setup(model, 20, 1.0)
    with self.assertRaisesRegex(ValueError, "partition the orders"):
      ensemble.split_params(q, ((0,), (2, 3)))
    with self.assertRaisesRegex(ValueError, "do not divide"):
      ensemble.member_mesh(3)
    members = ensemble.split_params(q, PARTITIONS["pairs"])
    with self.assertRaisesRegex(ValueError, "combine"):
      ensemble.apply(
        model.apply,
        ensemble.stack(members),
        jnp.ones((8, 20)),
        mesh=ensemble.member_mesh(2),
        combine="mean",
      )

  def test_split_respects_residual_split(self):
    w = jax.random.normal(jax.random.key(3), (16, 8))
    e = residual.expand(w, formats.get("int4"), formats.per_channel(), order=3)
    with self.assertRaisesRegex(ValueError, "non-empty"):
      residual.split(e, ((0, 1, 2), ()))


if __name__ == "__main__":
  absltest.main()
