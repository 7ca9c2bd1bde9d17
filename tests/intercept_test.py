"""The one interception helper."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl.testing import absltest

from qjax import intercept


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(4, name="a")(x)
    x = nn.Conv(4, (1, 1), name="pw")(x[:, None, None, :])
    x = nn.Conv(4, (3, 3), name="k3")(x)
    return nn.Dense(2, name="b")(x.reshape(x.shape[0], -1))


class InterceptTest(absltest.TestCase):
  def test_select_route_and_nest(self):
    net = _Net()
    x = jnp.ones((2, 3))
    variables = net.init(jax.random.key(0), x)
    seen, order = [], []

    def record(module, next_fun, args, kwargs):
      seen.append(intercept.path(module))
      return next_fun(*args, **kwargs)

    def first(module, next_fun, args, kwargs):
      order.append("first")
      return next_fun(*args, **kwargs)

    def second(module, next_fun, args, kwargs):
      order.append("second")
      return 0 * next_fun(*args, **kwargs)

    with intercept.calls(record, intercept.is_linear):
      want = net.apply(variables, x)
    self.assertEqual(seen, ["a", "pw", "b"])  # not the 3x3 conv
    with intercept.stack(
      (first, lambda m: m.name == "b"), (second, lambda m: m.name == "b")
    ):
      got = net.apply(variables, x)
    self.assertEqual(order, ["first", "second"])
    self.assertEqual(float(jnp.abs(got).sum()), 0.0)
    self.assertGreater(float(jnp.abs(want).sum()), 0.0)


if __name__ == "__main__":
  absltest.main()
