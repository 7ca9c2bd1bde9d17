"""The one interception helper."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from flax import nnx

from qjax import intercept


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(4, name="a")(x)
    x = nn.Conv(4, (1, 1), name="pw")(x[:, None, None, :])
    x = nn.Conv(4, (3, 3), name="k3")(x)
    return nn.Dense(2, name="b")(x.reshape(x.shape[0], -1))


class _LoggingDense(nn.Dense):
  """A user's Dense subclass that calls the base class's __call__."""

  def __call__(self, x):
    return super().__call__(x) + 0.0


class _LoggingLinear(nnx.Linear):
  def __call__(self, x):
    return super().__call__(x) + 0.0


class SubclassTest(absltest.TestCase):
  """A subclass's super().__call__ must not reach the handler twice (it
  used to: calibration counted such a layer's rows twice)."""

  def test_linen_subclass_is_handled_once_per_call(self):
    m = _LoggingDense(3)
    x = jnp.ones((2, 4))
    v = m.init(jax.random.key(0), x)
    calls = []

    def count(module, next_fun, args, kwargs):
      calls.append(type(module).__name__)
      return next_fun(*args, **kwargs)

    with intercept.calls(count):
      m.apply(v, x)
    self.assertEqual(calls, ["_LoggingDense"])

  def test_nnx_subclass_and_base_instance_are_each_handled_once(self):
    class Two(nnx.Module):
      def __init__(self):
        self.a = _LoggingLinear(4, 4, rngs=nnx.Rngs(0))
        self.b = nnx.Linear(4, 2, rngs=nnx.Rngs(1))

      def __call__(self, x):
        return self.b(self.a(x))

    model = Two()
    calls = []

    def count(module, next_fun, args, kwargs):
      calls.append(intercept.path(module))
      return next_fun(*args, **kwargs)

    linear = lambda m: isinstance(m, nnx.Linear)  # noqa: E731
    with intercept.nnx_calls(model, count, linear):
      model(jnp.ones((1, 4)))
    self.assertEqual(calls, ["a", "b"])


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

    with intercept.calls(record, lambda m: isinstance(m, nn.Dense)):
      want = net.apply(variables, x)
    self.assertEqual(seen, ["a", "b"])  # only what select picks
    with intercept.stack(
      (first, lambda m: m.name == "b"), (second, lambda m: m.name == "b")
    ):
      got = net.apply(variables, x)
    self.assertEqual(order, ["first", "second"])
    self.assertEqual(float(jnp.abs(got).sum()), 0.0)
    self.assertGreater(float(jnp.abs(want).sum()), 0.0)

  def test_nnx_calls_route_only_the_chosen_instances_and_restore(self):
    class Net(nnx.Module):
      def __init__(self, rngs):
        self.a = nnx.Linear(3, 4, rngs=rngs)
        self.b = nnx.Linear(4, 2, rngs=rngs)

      def __call__(self, x):
        return self.b(self.a(x))

    net = Net(nnx.Rngs(0))
    other = nnx.Linear(3, 4, rngs=nnx.Rngs(1))
    x = jnp.ones((2, 3))
    want = net(x)
    original = nnx.Linear.__call__
    seen = []

    def record(module, next_fun, args, kwargs):
      seen.append(intercept.path(module))
      other(args[0]) if module is net.a else None  # not routed: not chosen
      return 0 * next_fun(*args, **kwargs)

    with intercept.nnx_calls(net, record, lambda m: isinstance(m, nnx.Linear)):
      got = net(x)
    self.assertEqual(seen, ["a", "b"])
    self.assertEqual(float(jnp.abs(got).sum()), 0.0)
    # Afterwards the class is as it was.
    self.assertIs(nnx.Linear.__call__, original)
    np.testing.assert_array_equal(net(x), want)


if __name__ == "__main__":
  absltest.main()
