"""Calibrated methods on CNNs: pointwise convs as matrices, BatchNorm
collections, per-block modules, a block that is one Dense (MobileNetV2)."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

import qjax
from qjax import calibration, formats, qtensor
from qjax.calibration import BlockModel, two_stream
from qjax.models import mobilenet_v2 as mnv2
from qjax.quantizers import error_diffusion as ed
from qjax.quantizers.gptq import gptq
from qjax.quantizers.rtn import rtn

KERNELS = r"(stem|depthwise)/conv/kernel"


def _tiny_cnn(seed=0):
  """stem (3x3 conv+BN), an inverted residual (1x1 expand, 3x3 depthwise,
  1x1 project, each with BN) and a per-pixel Dense classifier as its own
  block; real BatchNorm statistics."""
  modules = {
    "stem": mnv2.ConvBN(16, 3, 1),
    "block_1": mnv2.InvertedResidual(16, 1, 4),
    "classifier": nn.Dense(10),
  }
  images = jax.random.normal(jax.random.key(seed), (8, 12, 12, 3))
  params, stats, x = {}, {}, images
  for i, (name, m) in enumerate(modules.items()):
    v = m.init(jax.random.key(seed + 1 + i), x)
    params[name] = v["params"]
    if "batch_stats" in v:
      # Non-trivial running statistics, so BatchNorm matters, yet mild
      # enough that ReLU6 kills no channel (a rank-deficient G would make
      # the float32/float64 pseudo-inverses disagree).
      stats[name] = jax.tree.map(lambda s: 1.3 * s + 0.02, v["batch_stats"])
    x = m.apply({"params": params[name], **_bs(stats, name)}, x)
  model = BlockModel(
    embed=lambda rest, b: b,
    blocks=tuple(modules),
    block_module=None,
    block_args=lambda b: (),
    modules=modules,
    collections={n: {"batch_stats": s} for n, s in stats.items()},
  )
  calib = jax.random.normal(jax.random.key(seed + 9), (16, 12, 12, 3))
  return params, model, [calib[:8], calib[8:]]


def _at(tree, keys):
  for k in keys:
    tree = tree[k]
  return tree


def _bs(stats, name):
  return {"batch_stats": stats[name]} if name in stats else {}


def _recipe(method, fmt="int4"):
  scaling = formats.per_channel(-1)
  return qjax.Recipe(
    (
      qjax.rule(KERNELS, fmt, scaling),
      qjax.rule("kernel", fmt, scaling, method=method),
    )
  )


def _pointwise_input(model, block, batch, part):
  """Rows [n, in] entering `part` ('expand' or 'project') of the inverted
  residual, computed step by step with the block's own submodules."""
  stats = model.collections["block_1"]["batch_stats"]
  m = model.modules["block_1"]
  hidden = batch.shape[-1] * m.expand
  if part == "expand":
    x = batch
  else:
    h = mnv2.ConvBN(hidden).apply(
      {"params": block["expand"], "batch_stats": stats["expand"]}, batch
    )
    x = mnv2.ConvBN(hidden, 3, m.stride, groups=hidden).apply(
      {"params": block["depthwise"], "batch_stats": stats["depthwise"]}, h
    )
  return np.asarray(x, np.float64).reshape(-1, x.shape[-1])


class LinearLayerTest(absltest.TestCase):
  def test_is_linear(self):
    self.assertTrue(calibration.is_linear(nn.Dense(4)))
    self.assertTrue(calibration.is_linear(nn.Conv(4, (1, 1))))
    # Every conv meets its patch matrix as a matmul (qjax.linear_layers).
    self.assertTrue(calibration.is_linear(nn.Conv(4, (3, 3))))
    self.assertTrue(calibration.is_linear(nn.Conv(4, (1, 1), strides=2)))
    self.assertTrue(
      calibration.is_linear(nn.Conv(4, (1, 1), feature_group_count=4))
    )
    self.assertFalse(calibration.is_linear(nn.ConvTranspose(4, (3, 3))))
    self.assertFalse(calibration.is_linear(nn.BatchNorm()))
    self.assertFalse(calibration.is_linear(nn.Embed(10, 4)))

  def test_matrix_quantization_viewed_as_a_conv(self):
    w = jax.random.normal(jax.random.key(0), (48, 40))
    for fmt, scaling in (
      (formats.get("int4"), formats.per_channel(-1)),
      (formats.get("uint3"), formats.per_block(16, axis=-2, zero_point=True)),
      formats.block_format("nvfp4", -2),
    ):
      qt = rtn(w, fmt, scaling)
      conv = qtensor.with_leading_unit_axes(qt, (1, 1, 48, 40))
      self.assertEqual(conv.shape, (1, 1, 48, 40))
      np.testing.assert_array_equal(
        conv.dequantize(), qt.dequantize().reshape(1, 1, 48, 40)
      )
      # Quantizing the conv kernel directly gives the same numbers.
      direct = rtn(w.reshape(1, 1, 48, 40), conv.fmt, scaling)
      np.testing.assert_array_equal(direct.codes, conv.codes)
    with self.assertRaisesRegex(ValueError, "only unit axes"):
      qtensor.with_leading_unit_axes(qt, (2, 1, 48, 40))
    front = rtn(w, formats.get("int4"), formats.per_block(16, axis=0))
    with self.assertRaisesRegex(ValueError, "negative axes"):
      qtensor.with_leading_unit_axes(front, (1, 1, 48, 40))


class SequentialGPTQTest(absltest.TestCase):
  def test_pointwise_convs_get_their_pixel_hessians(self):
    params, model, batches = _tiny_cnn()
    got = qjax.quantize(params, _recipe("gptq"), calib=(model, batches))
    # Slow reference: block inputs from the already-quantized blocks,
    # H = 2/n X^T X over every pixel in float64, GPTQ on the matrix.
    xs = list(batches)
    stem = got["stem"]["conv"]["kernel"]
    self.assertEqual(stem.scaling.spec(), "channel-1_float32")
    deq_stem = {**params["stem"], "conv": {"kernel": stem.dequantize()}}
    xs = [
      model.modules["stem"].apply(
        {"params": deq_stem, **model.collections["stem"]}, x
      )
      for x in xs
    ]
    block = params["block_1"]
    for part in ("expand", "project"):
      rows = np.concatenate(
        [_pointwise_input(model, block, x, part) for x in xs]
      )
      h = 2.0 * rows.T @ rows / len(rows)
      w = block[part]["conv"]["kernel"]
      want, _ = gptq(w[0, 0], jnp.asarray(h, jnp.float32), *_int4())
      q = got["block_1"][part]["conv"]["kernel"]
      self.assertEqual(q.shape, w.shape)
      same = np.mean(
        np.asarray(q.dequantize()[0, 0]) == np.asarray(want.dequantize())
      )
      self.assertGreater(same, 0.97, f"{part}: {same:.3f} equal")
    # The depthwise conv took its RTN rule; the classifier (a block that is
    # one Dense) was calibrated too.
    dw = got["block_1"]["depthwise"]["conv"]["kernel"]
    np.testing.assert_array_equal(
      dw.codes, rtn(block["depthwise"]["conv"]["kernel"], *_int4()).codes
    )
    self.assertIsInstance(got["classifier"]["kernel"], qtensor.QTensor)
    self.assertNotEqual(
      np.asarray(got["classifier"]["kernel"].codes).tobytes(),
      np.asarray(rtn(params["classifier"]["kernel"], *_int4()).codes).tobytes(),
    )


def _int4():
  return formats.get("int4"), formats.per_channel(-1)


class DiffusionOnCNNTest(absltest.TestCase):
  def test_every_kernel_is_quantized_and_streams_carry_depthwise_error(self):
    # Seed 5: G's spectrum has a wide gap at pinv's cutoff, so float32 and
    # float64 statistics keep the same rank.
    params, model, batches = _tiny_cnn(5)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      got = qjax.quantize(params, _recipe("ed"), calib=(model, batches))
    for path, leaf in jax.tree_util.tree_leaves_with_path(
      got, is_leaf=qtensor.is_quantized
    ):
      name = qjax.paths.path_str(path)
      if name.endswith("kernel"):
        self.assertIsInstance(leaf, qtensor.QTensor, name)

    # Reference for the project conv: float stream X through the float
    # block, quantized stream X~ through the block whose stem, expand and
    # depthwise are already quantized; then ED on the matrix.
    def stem_out(p):
      return [
        model.modules["stem"].apply(
          {"params": p, **model.collections["stem"]}, x
        )
        for x in batches
      ]

    deq = qjax.dequantize(got)
    xf, xq = stem_out(params["stem"]), stem_out(deq["stem"])
    b_float = params["block_1"]
    b_quant = {
      **b_float,
      "expand": deq["block_1"]["expand"],
      "depthwise": deq["block_1"]["depthwise"],
    }
    x = np.concatenate(
      [_pointwise_input(model, b_float, a, "project") for a in xf]
    )
    x_q = np.concatenate(
      [_pointwise_input(model, b_quant, a, "project") for a in xq]
    )
    g, c = x_q.T @ x_q, x_q.T @ x
    w = b_float["project"]["conv"]["kernel"]
    want, _ = ed.error_diffusion(
      w[0, 0],
      jnp.asarray(g, jnp.float32),
      jnp.asarray(c, jnp.float32),
      *_int4(),
    )
    q = got["block_1"]["project"]["conv"]["kernel"]

    def codes(qt):
      return np.asarray(formats.unpack(qt.codes, 4, qt.shape[-1]))

    # Scales come from max |W'|, which float32 and float64 statistics move
    # by ~1e-5: compare the codes exactly and the values closely.
    same = np.mean(codes(q)[0, 0] == codes(want))
    self.assertGreater(same, 0.97, f"{same:.3f} of codes equal")
    np.testing.assert_allclose(
      q.dequantize()[0, 0], want.dequantize(), rtol=1e-3, atol=1e-3
    )

  def test_ed_reaches_3x3_and_depthwise_convs_through_their_patches(self):
    params, model, batches = _tiny_cnn(2)
    recipe = qjax.Recipe(
      (qjax.rule("kernel", "int4", _int4()[1], method="ed"),)
    )
    q = two_stream.quantize_two_stream(
      params, recipe, model, batches, progress=False
    )
    for path in ("stem/conv", "block_1/depthwise/conv"):
      kernel = q[path.split("/")[0]]
      for k in path.split("/")[1:]:
        kernel = kernel[k]
      self.assertTrue(qtensor.is_qtensor(kernel["kernel"]), path)
    rtn_q = qjax.quantize(params, qjax.Recipe((qjax.rule("kernel", "int4"),)))
    # Depthwise inputs differ between the streams, so ED moves its codes.
    dw = ("block_1", "depthwise", "conv", "kernel")
    self.assertFalse(
      np.array_equal(_at(q, dw).dequantize(), _at(rtn_q, dw).dequantize())
    )
    # The stem sees the images themselves: GPTQ's output error on them is
    # below RTN's (the point of calibrating a 3x3 conv at all).
    q = calibration.quantize_sequential(
      params,
      qjax.Recipe((qjax.rule("kernel", "int4", _int4()[1], method="gptq"),)),
      model,
      batches,
      progress=False,
    )
    w = params["stem"]["conv"]["kernel"]
    conv = nn.Conv(16, (3, 3), use_bias=False, precision="highest")
    images = jnp.concatenate(batches)

    def out_err(k):
      y = conv.apply({"params": {"kernel": k}}, images)
      y0 = conv.apply({"params": {"kernel": w}}, images)
      return float(jnp.sum((y - y0) ** 2))

    self.assertLess(
      out_err(q["stem"]["conv"]["kernel"].dequantize()),
      out_err(rtn_q["stem"]["conv"]["kernel"].dequantize()),
    )


class MobileNetV2BlocksTest(absltest.TestCase):
  def test_block_model_reproduces_the_logits(self):
    v = mnv2.load_variables()
    images = mnv2.photos(1)
    want = mnv2.logits(v["params"], v["batch_stats"], images)
    model = mnv2.block_model(v["params"], v["batch_stats"])
    self.assertLen(model.blocks, 20)
    x = images
    for name in model.blocks:
      x = model.module(name).apply(model.variables(name, v["params"][name]), x)
    np.testing.assert_allclose(x, want, atol=1e-4)

  def test_calibration_photos_are_not_evaluation_photos(self):
    self.assertEmpty(set(mnv2.CALIBRATION_PHOTOS) & set(mnv2.PHOTOS))
    calib = mnv2.calibration_images(12)
    self.assertEqual(calib.shape, (12, 224, 224, 3))
    evaluation = mnv2.photos(4)
    for e in evaluation:
      self.assertGreater(np.min(np.abs(calib - e).mean(axis=(1, 2, 3))), 0.05)

  def test_recipe_gives_3x3_convs_a_data_free_rule(self):
    from configs import mobilenet_v2 as config_file
    from experiments import run_lib

    recipe = run_lib.recipe_from_config(
      config_file.get_config("method=gptq,format=mxfp4")
    )
    first, main = recipe.rules
    self.assertEqual((first.method_name, main.method_name), ("rtn", "gptq"))
    self.assertEqual(first.scaling.spec(), "channel-1_float32")
    self.assertTrue(main.scaling.ragged)
    self.assertEqual(recipe.match("block_3/depthwise/conv/kernel", 4)[0], 0)
    self.assertEqual(recipe.match("block_3/expand/conv/kernel", 4)[0], 1)


if __name__ == "__main__":
  absltest.main()
