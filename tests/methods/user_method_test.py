"""A method written here, outside qjax, runs through qjax.quantize with
calibration and through checkpoint save/restore with no change to qjax."""

import dataclasses
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

import qjax
from qjax import formats
from qjax.calibration import BlockModel
from qjax.io import checkpoint


@dataclasses.dataclass(frozen=True)
class SignTernary(qjax.Quantizer):
  """W -> s_j * t, t in {-1, 0, +1} with t = sign(w) where |w| > threshold
  * mean|w_j| (TWN's rule), and per output channel j the scale that
  minimises the layer's output error ||X (w_j - s_j t_j)||^2:
  s_j = t_j^T H w_j / t_j^T H t_j."""

  threshold: float = 0.7
  needs = frozenset({"hessian"})

  def check(self, fmt, scaling):
    if fmt != formats.get("int2") or scaling.mode != "channel":
      raise ValueError("SignTernary writes int2 codes, one scale per channel")

  def quantize(self, w, fmt, scaling, stats):
    w = jnp.asarray(w, jnp.float32)
    cut = self.threshold * jnp.mean(jnp.abs(w), axis=0)
    t = jnp.where(jnp.abs(w) > cut, jnp.sign(w), 0.0)
    h = stats.hessian
    num = jnp.sum(t * (h @ w), axis=0)
    den = jnp.sum(t * (h @ t), axis=0)
    scale = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 1.0)
    codes = fmt.encode(t)
    return qjax.QTensor(
      formats.pack(codes, fmt.bits),
      scale.reshape(1, -1).astype(jnp.float32),
      None,
      None,
      fmt,
      scaling,
      tuple(w.shape),
      np.dtype(np.float32),
    )


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.gelu(nn.Dense(24, name="fc")(x))


def _model_and_data():
  keys = jax.random.split(jax.random.key(0), 4)
  params = {
    f"b{i}": {
      "fc": {
        "kernel": jax.random.normal(keys[i], (24, 24)) / 5,
        "bias": jnp.zeros(24),
      }
    }
    for i in range(2)
  }
  model = BlockModel(
    embed=lambda p, b: b,
    blocks=("b0", "b1"),
    block_module=_Block(),
    block_args=lambda b: (),
  )
  x = jax.random.normal(keys[3], (2, 64, 24))
  return params, model, [x[0], x[1]]


def _slow_ternary(w, h, threshold):
  w, h = np.asarray(w, np.float64), np.asarray(h, np.float64)
  out = np.zeros_like(w)
  for j in range(w.shape[1]):
    col = w[:, j]
    t = np.where(np.abs(col) > threshold * np.abs(col).mean(), np.sign(col), 0)
    s = (t @ h @ col) / (t @ h @ t)
    out[:, j] = s * t
  return out


class UserMethodTest(absltest.TestCase):
  def test_runs_through_calibration_and_checkpoints(self):
    params, model, batches = _model_and_data()
    recipe = qjax.Recipe(
      (qjax.rule("fc/kernel", "int2", method=SignTernary()),)
    )
    self.assertTrue(recipe.needs_calibration)
    q = qjax.quantize(params, recipe, calib=(model, batches))
    got = q["b0"]["fc"]["kernel"]
    self.assertIsInstance(got, qjax.QTensor)
    # Block 0 sees the calibration inputs themselves: the slow reference.
    x = np.concatenate([np.asarray(b, np.float64) for b in batches])
    h = 2 * x.T @ x / len(x)
    want = _slow_ternary(params["b0"]["fc"]["kernel"], h, 0.7)
    np.testing.assert_allclose(got.dequantize(), want, rtol=2e-5, atol=1e-6)
    # Sign preserving, three levels per channel.
    w = np.asarray(params["b1"]["fc"]["kernel"])
    deq = np.asarray(q["b1"]["fc"]["kernel"].dequantize())
    nonzero = deq != 0
    self.assertTrue(np.all(np.sign(deq[nonzero]) == np.sign(w[nonzero])))
    for j in range(deq.shape[1]):
      self.assertLessEqual(len(np.unique(np.abs(deq[:, j]))), 2)
    # And it survives a checkpoint.
    path = tempfile.mkdtemp() + "/ckpt"
    checkpoint.save(path, q, recipe=recipe)
    back = checkpoint.restore(path)
    np.testing.assert_array_equal(back["b1"]["fc"]["kernel"].dequantize(), deq)
    self.assertEqual(back["b1"]["fc"]["kernel"].fmt, formats.get("int2"))

  def test_composes_and_is_checked_at_build(self):
    rule = qjax.rule(
      "kernel", "int2", method=qjax.chain(qjax.MagR(iters=3), SignTernary())
    )
    self.assertEqual(rule.needs, frozenset({"hessian"}))
    with self.assertRaisesRegex(ValueError, "SignTernary writes int2"):
      qjax.rule("kernel", "int4", method=SignTernary())
    with self.assertRaisesRegex(ValueError, "go into the method object"):
      qjax.rule("kernel", "int2", method=SignTernary(), threshold=0.5)

  def test_without_statistics_the_error_names_the_layer(self):
    params, _, _ = _model_and_data()
    recipe = qjax.Recipe(
      (qjax.rule("fc/kernel", "int2", method=SignTernary()),)
    )
    with self.assertRaisesRegex(ValueError, "'b0/fc/kernel'.*needs hessian"):
      qjax.quantize(params, recipe)


if __name__ == "__main__":
  absltest.main()
