"""Error Diffusion and GPFQ: against a slow NumPy reference, and properties."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import qjax
from qjax.calibration import BlockModel
from qjax.formats import packing, presets
from qjax.quantizers import error_diffusion as ed


class _Layer(nn.Module):
  d: int

  @nn.compact
  def __call__(self, x):
    return nn.relu(nn.Dense(self.d, name="fc")(x))


def _mlp(seed, d=64, layers=3, n=1024):
  keys = jax.random.split(jax.random.PRNGKey(seed), layers + 3)
  mix = jax.random.normal(keys[0], (d, d)) / np.sqrt(d)

  def data(key):
    z = jax.random.normal(key, (n, d))
    return z + 0.8 * z @ mix  # correlated features

  params = {
    f"b{i}": {
      "fc": {
        "kernel": jax.random.normal(keys[i + 1], (d, d)) * np.sqrt(2 / d),
        "bias": jnp.full((d,), 0.1),
      }
    }
    for i in range(layers)
  }
  model = BlockModel(
    embed=lambda p, b: b,
    blocks=tuple(params),
    block_module=_Layer(d),
    block_args=lambda b: (),
  )
  return params, model, data(keys[-2]), data(keys[-1])


def _forward(model, params, x):
  for name in model.blocks:
    x = model.block_module.apply({"params": params[name]}, x)
  return x


def _quantize(params, model, calib, fmt, method="ed", **options):
  recipe = qjax.Recipe([qjax.rule("fc/kernel", fmt, method=method, **options)])
  if method == "rtn":
    return qjax.quantize(params, recipe)
  batches = [calib[: len(calib) // 2], calib[len(calib) // 2 :]]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return qjax.quantize(params, recipe, calib=(model, batches))


# --- slow reference: loops, both streams materialised, float64 -------------

_E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])


def _round_e2m1(v):
  """Nearest E2M1 magnitude, ties to the even code; saturating."""
  a = min(abs(v), 6.0)
  dist = np.abs(_E2M1 - a)
  best = np.flatnonzero(dist == dist.min())
  code = best[0] if len(best) == 1 else [c for c in best if c % 2 == 0][0]
  return np.copysign(_E2M1[code], v)


def _mx_block_quantize(w, fmt):
  """OCP MX v1.0 on blocks of 32 input rows: X = 2^(floor(log2 amax) -
  emax_elem) per block and column, elements rounded and saturated."""
  out = np.zeros_like(w)
  emax_elem = {"mxfp4": 2, "mxint8": 0}[fmt]
  for b in range(0, w.shape[0], 32):
    for j in range(w.shape[1]):
      block = w[b : b + 32, j]
      amax = np.max(np.abs(block))
      if amax == 0:
        continue
      scale = 2.0 ** (np.floor(np.log2(amax)) - emax_elem)
      for i, v in enumerate(block):
        if fmt == "mxfp4":
          out[b + i, j] = _round_e2m1(v / scale) * scale
        else:  # int8 elements k / 64, symmetric clamp at 127
          k = np.clip(np.round(v / scale * 64), -127, 127)
          out[b + i, j] = k / 64 * scale
  return out


def _slow_ed(params, model, calib, fmt):
  x = np.asarray(calib, np.float64)
  xq = x.copy()
  quantized = {}
  for name in model.blocks:
    w = np.asarray(params[name]["fc"]["kernel"], np.float64)
    b = np.asarray(params[name]["fc"]["bias"], np.float64)
    # Min-norm change D with X~ (W + D) ~ X W: lstsq of X~ D = (X - X~) W.
    d = np.linalg.lstsq(xq, (x - xq) @ w, rcond=None)[0]
    q = _mx_block_quantize(w + d, fmt)
    quantized[name] = q
    x, xq = np.maximum(x @ w + b, 0), np.maximum(xq @ q + b, 0)
  return quantized


class ReferenceTest(parameterized.TestCase):
  @parameterized.parameters("mxfp4", "mxint8")
  def test_matches_slow_reference(self, fmt):
    params, model, calib, _ = _mlp(0, d=64, layers=3, n=512)
    want = _slow_ed(params, model, calib, fmt)
    got = _quantize(params, model, calib, fmt)
    for name in model.blocks:
      q = np.asarray(got[name]["fc"]["kernel"].dequantize())
      same = np.mean(q == want[name])
      # float32 pinv vs float64 lstsq may flip a value sitting on a rounding
      # boundary; a wrong adjust or block rule changes far more.
      self.assertGreater(same, 0.97, f"{name}: {same:.3f} of values equal")
      rel = np.linalg.norm(q - want[name]) / np.linalg.norm(want[name])
      self.assertLess(rel, 0.02)


class PropertyTest(parameterized.TestCase):
  def test_adjust_lowers_the_calibration_error(self):
    params, model, calib, _ = _mlp(1)
    rtn = _quantize(params, model, calib, "mxfp4", method="rtn")
    xf = xq = calib
    for name in model.blocks:
      w = params[name]["fc"]["kernel"]
      g, c = xq.T @ xq, xq.T @ xf
      _, info = ed.adjust(w, g, c)
      self.assertLessEqual(
        float(info.error_after), float(info.error_before) + 1e-3
      )
      layer = {"params": params[name]}
      q_layer = {"params": qjax.dequantize(rtn[name])}
      xf = model.block_module.apply(layer, xf)
      xq = model.block_module.apply(q_layer, xq)

  def test_same_streams_leave_weights_unchanged(self):
    w = jax.random.normal(jax.random.PRNGKey(0), (48, 16))
    x = jax.random.normal(jax.random.PRNGKey(1), (200, 48))
    g = x.T @ x
    w2, _ = ed.adjust(w, g, g)
    np.testing.assert_array_equal(w2, w)

  def test_weights_on_the_grid_come_back_unchanged(self):
    # A format that represents the weights exactly: ED changes nothing.
    params, model, calib, _ = _mlp(2)
    on_grid = qjax.dequantize(
      _quantize(params, model, calib, "mxint8", method="rtn")
    )
    got = _quantize(on_grid, model, calib, "mxint8")
    for name in model.blocks:
      np.testing.assert_array_equal(
        got[name]["fc"]["kernel"].dequantize(), on_grid[name]["fc"]["kernel"]
      )

  @parameterized.parameters("mxfp4", "mxint8")
  def test_beats_rtn_on_held_out_data_over_seeds(self, fmt):
    errors = {"rtn": [], "ed": [], "gpfq": []}
    for seed in range(5):
      params, model, calib, test = _mlp(seed + 10)
      ref = _forward(model, params, test)
      for method in errors:
        q = _quantize(params, model, calib, fmt, method=method)
        out = _forward(model, qjax.dequantize(q), test)
        errors[method].append(float(jnp.mean((out - ref) ** 2)))
    self.assertLess(np.mean(errors["ed"]), np.mean(errors["rtn"]))
    self.assertLess(np.mean(errors["gpfq"]), np.mean(errors["rtn"]))

  def test_deterministic_and_no_recompilation(self):
    fmt, scaling = presets.block_format("mxfp4")
    w = jax.random.normal(jax.random.PRNGKey(0), (64, 32))
    x = jax.random.normal(jax.random.PRNGKey(1), (300, 64))
    xq = x + 0.01 * jax.random.normal(jax.random.PRNGKey(2), x.shape)
    a, _ = ed.error_diffusion(w, xq.T @ xq, xq.T @ x, fmt, scaling)
    sizes = ed._adjust._cache_size(), ed._gpfq._cache_size()
    ed.gpfq(w, xq.T @ xq, xq.T @ x, fmt, scaling)
    sizes = ed._adjust._cache_size(), ed._gpfq._cache_size()
    b, _ = ed.error_diffusion(w * 2, xq.T @ xq, xq.T @ x, fmt, scaling)
    b, _ = ed.error_diffusion(w, xq.T @ xq, xq.T @ x, fmt, scaling)
    ed.gpfq(w * 2, xq.T @ xq, xq.T @ x, fmt, scaling)
    self.assertEqual((ed._adjust._cache_size(), ed._gpfq._cache_size()), sizes)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.scale, b.scale)

  def test_gpfq_with_identical_streams_and_one_row_is_rtn(self):
    # GPFQ's feedback only moves later rows; the first row is plain RTN.
    fmt, scaling = (
      qjax.formats.get("int4"),
      qjax.formats.scaling.Scaling("channel", (-1,)),
    )
    w = jax.random.normal(jax.random.PRNGKey(0), (32, 8))
    x = jax.random.normal(jax.random.PRNGKey(1), (100, 32))
    g = x.T @ x
    q = ed.gpfq(w, g, g, fmt, scaling)
    r = qjax.rtn(w, fmt, scaling)
    codes = packing.unpack(q.codes, 4, 8)
    np.testing.assert_array_equal(codes[0], packing.unpack(r.codes, 4, 8)[0])


class BadInputTest(absltest.TestCase):
  def test_rank_deficient_is_reported_not_nan(self):
    params, model, calib, _ = _mlp(3, d=64, n=40)  # 40 rows < 64 inputs
    recipe = qjax.Recipe([qjax.rule("fc/kernel", "mxfp4", method="ed")])
    with self.assertWarnsRegex(
      UserWarning, r"rank-deficient.*b0/fc/kernel rank"
    ):
      q = qjax.quantize(params, recipe, calib=(model, [calib]))
    for name in model.blocks:
      self.assertTrue(
        bool(jnp.all(jnp.isfinite(q[name]["fc"]["kernel"].dequantize())))
      )

  def test_ed_without_two_streams_is_a_clear_error(self):
    params, _, _, _ = _mlp(0)
    recipe = qjax.Recipe([qjax.rule("fc/kernel", "mxfp4", method="ed")])
    with self.assertRaisesRegex(
      ValueError, "b0/fc/kernel.*quantized activation"
    ):
      qjax.quantize(params, recipe)

  def test_nan_weight_names_the_parameter(self):
    params, model, calib, _ = _mlp(0)
    kernel = params["b1"]["fc"]["kernel"].at[3, 4].set(jnp.nan)
    params = {**params, "b1": {"fc": {**params["b1"]["fc"], "kernel": kernel}}}
    recipe = qjax.Recipe([qjax.rule("fc/kernel", "mxfp4", method="ed")])
    with self.assertRaisesRegex(ValueError, "b1/fc/kernel.*1 NaN"):
      qjax.quantize(params, recipe, calib=(model, [calib]))

  def test_unknown_adjust(self):
    with self.assertRaisesRegex(ValueError, "unknown adjust 'lsq'"):
      ed.adjust(jnp.ones((4, 2)), jnp.eye(4), jnp.eye(4), "lsq")


if __name__ == "__main__":
  absltest.main()
