"""Quantizing sharded weights on 8 simulated CPU devices (see conftest.py)."""

import jax
import numpy as np
from absl.testing import absltest, parameterized
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import qjax
from qjax import formats
from qjax.quantizers import rtn

FORMATS = {
  "mxfp4": formats.block_format("mxfp4"),
  "int4_channel": (formats.get("int4"), formats.per_channel()),
  "uint3_block": (formats.get("uint3"), formats.per_block(32, zero_point=True)),
}


class ShardingTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.assertEqual(jax.device_count(), 8)

  @parameterized.product(
    fmt=list(FORMATS),
    spec=[("x", "y"), ("x", None), (None, "y")],
    axis_type=[AxisType.Auto, AxisType.Explicit],
  )
  def test_sharded_equals_unsharded(self, fmt, spec, axis_type):
    mesh = jax.make_mesh((4, 2), ("x", "y"), axis_types=(axis_type,) * 2)
    w = jax.random.normal(jax.random.key(0), (256, 128))
    ws = jax.device_put(w, NamedSharding(mesh, P(*spec)))
    element, scaling = FORMATS[fmt]
    q, q0 = rtn.rtn(ws, element, scaling), rtn.rtn(w, element, scaling)
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(q0), strict=True):
      np.testing.assert_array_equal(a, b)
    # Codes follow the weight; scales follow their blocks.
    self.assertEqual(q.codes.sharding.spec, P(*spec))
    scale_spec = tuple(q.scale.sharding.spec) + (None,) * 2
    for axis, name in enumerate(spec):
      blocks = q.scale.shape[axis]
      if name is not None and blocks >= mesh.shape[name]:
        self.assertEqual(scale_spec[axis], name)
      self.assertLen(q.codes.sharding.device_set, 8)

  def test_quantize_tree_keeps_sharding(self):
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
    sharding = NamedSharding(mesh, P(None, "x"))
    params = {
      "kernel": jax.device_put(
        jax.random.normal(jax.random.key(1), (64, 256)), sharding
      )
    }
    q = qjax.quantize(params, qjax.Recipe((qjax.rule("kernel", "mxfp8_e4m3"),)))
    self.assertEqual(q["kernel"].codes.sharding.spec, P(None, "x"))
    np.testing.assert_array_equal(
      q["kernel"].dequantize(),
      rtn.rtn(
        np.asarray(params["kernel"]), *formats.block_format("mxfp8_e4m3")
      ).dequantize(),
    )


if __name__ == "__main__":
  absltest.main()
