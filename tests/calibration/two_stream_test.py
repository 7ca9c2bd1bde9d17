"""Error Diffusion and GPFQ: against a slow NumPy reference, and properties."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import qjax
from qjax import formats
from qjax.calibration import BlockModel
from qjax.formats import packing
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


def _slow_gpfq_mxfp4(w, x, xq, scales):
  """GPFQ (Lybrand & Saab) column by column on explicit float64 streams, MX
  blocks of 32 input rows. 'weights': each block's scale from w;
  'feedback': from the block's values after the feedback of earlier blocks,
  z0_t = <xq_t, u> / |xq_t|^2 + w_t <xq_t, x_t> / |xq_t|^2 at the block's
  start (the reading in error_diffusion's docstring)."""
  n_in, n_out = w.shape
  q = np.zeros_like(w)

  def target(t, j, u):
    return (xq[:, t] @ u + w[t, j] * (xq[:, t] @ x[:, t])) / (
      xq[:, t] @ xq[:, t]
    )

  for j in range(n_out):
    u = np.zeros(x.shape[0])
    for b in range(0, n_in, 32):
      rows = range(b, b + 32)
      if scales == "feedback":
        basis = [target(t, j, u) for t in rows]
      else:
        basis = [w[t, j] for t in rows]
      amax = np.max(np.abs(basis))
      scale = 2.0 ** (np.floor(np.log2(amax)) - 2) if amax > 0 else 0.0
      for t in rows:
        z = target(t, j, u)
        q[t, j] = _round_e2m1(z / scale) * scale if scale > 0 else 0.0
        u = u + w[t, j] * x[:, t] - q[t, j] * xq[:, t]
  return q


class ReferenceTest(parameterized.TestCase):
  @parameterized.parameters("weights", "feedback")
  def test_gpfq_matches_slow_reference(self, scales):
    fmt, scaling = formats.block_format("mxfp4")
    rng = np.random.default_rng(7)
    w = rng.standard_normal((96, 12))
    x = rng.standard_normal((400, 96)) @ (
      np.eye(96) + 0.3 * rng.standard_normal((96, 96)) / 10
    )
    xq = x + 0.05 * rng.standard_normal(x.shape)
    want = _slow_gpfq_mxfp4(w, x, xq, scales)
    got = ed.gpfq(
      jnp.asarray(w, jnp.float32),
      jnp.asarray(xq.T @ xq, jnp.float32),
      jnp.asarray(xq.T @ x, jnp.float32),
      fmt,
      scaling,
      scales=scales,
    )
    q = np.asarray(got.dequantize(), np.float64)
    # float32 statistics vs float64 streams may flip a value on a rounding
    # boundary, and a flip feeds back; a wrong scale rule changes far more.
    self.assertGreater(np.mean(q == want), 0.99)
    rel = np.linalg.norm(q - want) / np.linalg.norm(want)
    self.assertLess(rel, 0.01)

  @parameterized.parameters("mxfp4", "nvfp4")
  def test_gpfq_feedback_scales_differ_from_weight_scales(self, name):
    fmt, scaling = formats.block_format(name)
    rng = np.random.default_rng(8)
    w = jnp.asarray(rng.standard_normal((96, 12)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((400, 96)), jnp.float32)
    xq = x + 0.3 * jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    g, c = xq.T @ xq, xq.T @ x
    a = ed.gpfq(w, g, c, fmt, scaling)
    b = ed.gpfq(w, g, c, fmt, scaling, scales="feedback")
    # The first block sees no feedback yet, but its targets already differ
    # from w (C != G); later blocks differ more.
    differ = np.mean(np.asarray(a.scale) != np.asarray(b.scale))
    self.assertGreater(differ, 0.05)
    if name == "nvfp4":  # the second level stays W's, as for 'weights'
      self.assertEqual(float(b.tensor_scale), float(a.tensor_scale))
    self.assertLess(
      float(jnp.linalg.norm(xq @ b.dequantize() - x @ w)),
      float(
        jnp.linalg.norm(xq @ qjax.rtn(w, fmt, scaling).dequantize() - x @ w)
      ),
    )


class PropertyTest(parameterized.TestCase):
  @parameterized.parameters("weights", "feedback")
  def test_gpfq_is_causal_and_takes_a_ragged_last_block(self, scales):
    # Row t depends on rows <= t only, so the first 32 of 48 rows quantize
    # as if the last 16 did not exist; those 16 form a short last block.
    fmt = qjax.formats.get("int4")
    ragged = qjax.formats.scaling.Scaling("block", (0,), (32,), ragged=True)
    rng = np.random.default_rng(9)
    w = jnp.asarray(rng.standard_normal((48, 6)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((300, 48)), jnp.float32)
    xq = x + 0.3 * jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    g, c = xq.T @ xq, xq.T @ x
    whole = ed.gpfq(w, g, c, fmt, ragged, scales=scales)
    head = ed.gpfq(w[:32], g[:32, :32], c[:32, :32], fmt, ragged, scales)
    np.testing.assert_array_equal(whole.scale[:1], head.scale)
    np.testing.assert_array_equal(whole.dequantize()[:32], head.dequantize())
    self.assertEqual(whole.scale.shape, (2, 6))
    self.assertTrue(np.all(np.asarray(whole.scale) > 0))
    # A weight shorter than one block (MobileNetV2's 16-channel convs) is
    # one block of its own length.
    parts = w[:16], g[:16, :16], c[:16, :16], fmt
    short = ed.gpfq(*parts, ragged, scales)
    exact = qjax.formats.scaling.Scaling("block", (0,), (16,))
    np.testing.assert_array_equal(
      short.dequantize(), ed.gpfq(*parts, exact, scales).dequantize()
    )

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
    fmt, scaling = formats.block_format("mxfp4")
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
  def test_gpfq_scales_are_checked(self):
    w, g = jnp.ones((48, 4)), jnp.eye(48)
    fmt, scaling = formats.block_format("mxfp4")
    with self.assertRaisesRegex(ValueError, "one of .'weights', 'feedback'"):
      ed.gpfq(w, g, g, fmt, scaling, scales="inputs")

  def test_rank_deficient_is_reported_not_nan(self):
    params, model, calib, _ = _mlp(3, d=64, n=40)  # 40 rows < 64 inputs
    recipe = qjax.Recipe([qjax.rule("fc/kernel", "mxfp4", method="ed")])
    with self.assertWarnsRegex(
      UserWarning, r"b0/fc/kernel.*rank-deficient.*rank \d+/64"
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
      ValueError, "b0/fc/kernel.*needs two_stream statistics"
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
