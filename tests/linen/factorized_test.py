"""Factorized layers (qjax.transforms.cp_layers): the layer sequence equals
the conv with [[A, B, C]], BatchNorm recalibration, MAC counts, and the
parameter-tree rewrite on the real Fashion-MNIST CNN."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax.io import checkpoint
from qjax.linen import factorized as cp_layers
from qjax.models import fmnist_cnn
from qjax.transforms import cp_kernel
from qjax.transforms import factorize as fz


def _random_cp(shape, rank, seed=0):
  rng = np.random.default_rng(seed)
  modes = fz.tensor_modes(shape)
  factors = tuple(
    jnp.asarray(rng.normal(size=(m, rank)), jnp.float32) for m in modes
  )
  return cp_layers.CPKernel(factors, tuple(shape), np.dtype(np.float32))


def _numpy_conv(x, w, stride, padding):
  """Direct-loop NHWC conv with a HWIO kernel (the obviously-correct one)."""
  x = np.asarray(x, np.float64)
  w = np.asarray(w, np.float64)
  kh, kw, _, cout = w.shape
  if padding == "SAME":
    outs = [-(-n // stride) for n in x.shape[1:3]]
    pads = [
      max((o - 1) * stride + k - n, 0)
      for o, k, n in zip(outs, (kh, kw), x.shape[1:3], strict=True)
    ]
    pad = [(p // 2, p - p // 2) for p in pads]
  else:
    pad = [(0, 0), (0, 0)]
  x = np.pad(x, [(0, 0), *pad, (0, 0)])
  oh = (x.shape[1] - kh) // stride + 1
  ow = (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], oh, ow, cout))
  for i in range(oh):
    for j in range(ow):
      patch = x[:, i * stride : i * stride + kh, j * stride : j * stride + kw]
      out[:, i, j] = np.einsum("bhwc,hwco->bo", patch, w)
  return out


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize("kernel", [(3, 3), (1, 1)])
def test_factorized_conv_equals_the_conv_with_the_cp_kernel(
  stride, padding, kernel
):
  conv = nn.Conv(6, kernel, stride, padding=padding)
  x = jax.random.normal(jax.random.key(1), (2, 9, 8, 5))
  cp = _random_cp((*kernel, 5, 6), rank=4)
  bias = jnp.arange(6, dtype=jnp.float32)
  got = cp_layers.apply(conv, {"params": {"kernel": cp, "bias": bias}}, x)
  dense = cp.dequantize(jnp.float32)
  want = _numpy_conv(x, dense, stride, padding) + np.arange(6)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # The sequence, not the dense kernel, ran: a depthwise conv with R groups.
  jaxpr = str(
    jax.make_jaxpr(lambda p: cp_layers.apply(conv, {"params": p}, x))(
      {"kernel": cp, "bias": bias}
    )
  )
  if kernel == (3, 3):
    assert "feature_group_count=4" in jaxpr


def test_factorized_dense_is_two_matmuls_of_the_factors():
  dense = nn.Dense(7)
  cp = _random_cp((12, 7), rank=3)
  x = jax.random.normal(jax.random.key(2), (4, 12))
  bias = jnp.ones(7)
  got = cp_layers.apply(dense, {"params": {"kernel": cp, "bias": bias}}, x)
  a, b = cp.factors
  want = (np.asarray(x, np.float64) @ np.asarray(b)) @ np.asarray(a).T + 1
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_grouped_conv_with_a_cp_kernel_is_an_error():
  conv = nn.Conv(4, (3, 3), feature_group_count=2)
  cp = _random_cp((3, 3, 2, 4), rank=2)
  with pytest.raises(ValueError, match="grouped conv"):
    cp_layers.apply(
      conv,
      {"params": {"kernel": cp, "bias": jnp.zeros(4)}},
      jnp.ones((1, 5, 5, 4)),
    )


class _ConvBN2(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), name="c1")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=True, name="b1")(x))
    x = nn.Conv(3, (1, 1), name="c2")(x)
    return nn.BatchNorm(use_running_average=True, name="b2")(x)


def test_recalibrated_batchnorm_normalises_the_calibration_set_layer_by_layer():
  model = _ConvBN2()
  x = jax.random.normal(jax.random.key(0), (6, 7, 7, 2)) * 3 + 1
  variables = model.init(jax.random.key(1), x)
  params = dict(variables["params"])
  params["c1"] = {"kernel": _random_cp((3, 3, 2, 4), 3), "bias": jnp.ones(4)}
  variables = {"params": params, "batch_stats": variables["batch_stats"]}
  stats = cp_layers.recalibrate_batchnorm(model, variables, x)
  new = {"params": params, "batch_stats": stats}

  # Reference: each layer's statistics from the previous layers' outputs
  # under the NEW statistics, computed here step by step in NumPy.
  h = _numpy_conv(x, params["c1"]["kernel"].dequantize(), 1, "SAME") + 1
  np.testing.assert_allclose(stats["b1"]["mean"], h.mean((0, 1, 2)), rtol=1e-4)
  np.testing.assert_allclose(stats["b1"]["var"], h.var((0, 1, 2)), rtol=1e-4)
  h = np.maximum((h - h.mean((0, 1, 2))) / np.sqrt(h.var((0, 1, 2)) + 1e-5), 0)
  h = h @ np.asarray(params["c2"]["kernel"][0, 0]) + np.asarray(
    params["c2"]["bias"]
  )
  np.testing.assert_allclose(stats["b2"]["mean"], h.mean((0, 1, 2)), rtol=1e-4)
  np.testing.assert_allclose(stats["b2"]["var"], h.var((0, 1, 2)), rtol=1e-4)
  # Property: in eval mode the calibration set comes out normalised.
  out = cp_layers.apply(model, new, x)
  np.testing.assert_allclose(out.mean((0, 1, 2)), 0, atol=1e-4)
  np.testing.assert_allclose(out.var((0, 1, 2)), 1, atol=1e-3)


def test_macs_count_the_sequence_at_the_right_resolutions():
  conv = nn.Conv(6, (3, 3), 2)
  cp = _random_cp((3, 3, 5, 6), rank=4)
  x = jnp.ones((2, 8, 8, 5))
  got = cp_layers.macs(
    conv, {"params": {"kernel": cp, "bias": jnp.zeros(6)}}, x
  )
  # B on the 8x8 input, depthwise and A on the 4x4 output.
  assert list(got.values()) == [64 * 5 * 4 + 16 * (9 * 4 + 4 * 6)]
  dense = conv.init(jax.random.key(0), x)
  assert list(cp_layers.macs(conv, dense, x).values()) == [16 * 9 * 5 * 6]


@pytest.mark.e2e  # a whole real model: make test-quick skips it
def test_factorize_the_real_fmnist_cnn():
  params = fmnist_cnn.load_params()
  tree, report = cp_layers.factorize(
    params,
    r"(conv2|dense1)/kernel",
    rate=2,
    fmt="int4",
    method="qaf",
    sweeps=3,
    inner=10,
    init_sweeps=10,
    progress=False,
  )
  assert set(report) == {"conv2/kernel", "dense1/kernel"}
  cp = tree["conv2"]["kernel"]
  assert cp.rank == fz.cp_rank((3, 3, 32, 64), 2) == 87
  assert tree["conv1"]["kernel"] is params["conv1"]["kernel"]
  for f in cp.factors:  # every factor is an int4 QTensor
    assert qjax.qtensor.is_qtensor(f) and f.fmt.bits == 4
  stats = qjax.stats(tree, params)
  entry = stats["conv2/kernel"]
  assert entry["bytes"] == sum(f.nbytes for f in cp.factors)
  assert entry["rank"] == 87
  assert entry["macs"] == 87 * (64 + 32 + 9)
  np.testing.assert_allclose(
    10 ** (-entry["sqnr_db"] / 20), report["conv2/kernel"]["error"], rtol=1e-3
  )
  # The rewritten model runs and stays close to the float model.
  x, _ = fmnist_cnn.load_split("test")
  x = x[:64]
  ref = fmnist_cnn.CNN().apply({"params": params}, x)
  got = cp_layers.apply(fmnist_cnn.CNN(), {"params": tree}, x)
  agree = np.mean(np.argmax(ref, -1) == np.argmax(got, -1))
  assert agree > 0.8


def test_factorize_errors_name_the_parameter():
  params = fmnist_cnn.load_params()
  with pytest.raises(ValueError, match="matches no parameter"):
    cp_layers.factorize(params, "nothing", rate=2, fmt="int4")
  with pytest.raises(ValueError, match="'dense2/kernel'.*rank 0"):
    cp_layers.factorize(params, "dense2/kernel", rate=20, fmt="int4")
  with pytest.raises(ValueError, match="unknown method"):
    cp_layers.factorize(params, "dense2/kernel", rate=2, method="svd")
  # QAF's solver caps mean nothing to a one-shot method: an error, not a no-op.
  with pytest.raises(ValueError, match="'dense2/kernel'.*'ftq' takes.*sweeps"):
    cp_layers.factorize(
      params, "dense2/kernel", rate=2, fmt="int4", method="ftq", sweeps=5
    )


def _rank(w, rate=2):
  return fz.cp_rank(tuple(w.shape), rate)


def test_every_method_shares_the_start_and_its_checks():
  zeros = jnp.zeros((3, 3, 8, 16))
  nan = zeros.at[0, 0, 0, 0].set(jnp.nan)
  for method, kw in (("cp", {"fmt": None}), ("ftq", {"fmt": "int4"})):
    # An all-zero kernel is exactly representable: zeros, never 0/0 = NaN.
    kernel, _ = cp_kernel.factorize_kernel(
      zeros, _rank(zeros), method=method, init_sweeps=2, **kw
    )
    np.testing.assert_array_equal(kernel.dequantize(), zeros)
    with pytest.raises(ValueError, match="NaN/Inf"):
      cp_kernel.factorize_kernel(nan, _rank(nan), method=method, **kw)


def test_one_shot_methods_use_the_key_they_are_given():
  w = jax.random.normal(jax.random.key(3), (3, 3, 8, 16))

  def factors(method, seed, **kw):
    kernel, _ = cp_kernel.factorize_kernel(
      w,
      _rank(w),
      method=method,
      key=jax.random.key(seed),
      init_sweeps=2,
      **kw,
    )
    return [np.asarray(f) for f in kernel.float_factors()]

  for method, kw in (("cp", {"fmt": None}), ("ftq", {"fmt": "int8"})):
    same = factors(method, 1, **kw), factors(method, 1, **kw)
    other = factors(method, 2, **kw)
    for a, b in zip(*same, strict=True):
      np.testing.assert_array_equal(a, b)
    assert any(
      not np.array_equal(a, c) for a, c in zip(same[0], other, strict=True)
    ), method


def test_factorized_tree_round_trips_through_an_orbax_checkpoint(tmp_path):
  params = fmnist_cnn.load_params()
  tree = dict(params)
  tree["conv2"] = dict(params["conv2"])
  w = params["conv2"]["kernel"]
  qaf = cp_layers.CPKernel(
    tuple(fz.cp_then_quantize(w, 5, qjax.formats.get("int4"), init_sweeps=2)),
    (3, 3, 32, 64),
    np.dtype(np.float32),
  )
  tree["conv2"]["kernel"] = qaf
  tree["dense1"] = dict(params["dense1"])
  tree["dense1"]["kernel"] = _random_cp((3136, 128), 4)  # float factors
  checkpoint.save(tmp_path / "ckpt", tree)
  back = checkpoint.restore(tmp_path / "ckpt")
  assert isinstance(back["conv2"]["kernel"], cp_layers.CPKernel)
  assert back["conv2"]["kernel"].rank == 5
  for got, want in zip(
    jax.tree.leaves(back), jax.tree.leaves(tree), strict=True
  ):
    np.testing.assert_array_equal(got, want)


def test_recipe_methods_qaf_and_ftq_write_cp_kernels():
  params = fmnist_cnn.load_params()
  recipe = qjax.Recipe(
    [
      qjax.rule(
        "conv2/kernel", "int4", method="qaf", rate=4, sweeps=2, inner=5
      ),
      qjax.rule("dense1/kernel", "int8", method="ftq", rate=4),
    ]
  )
  # Two sweeps cannot converge; the warning names the parameter.
  with pytest.warns(UserWarning, match="'conv2/kernel': QAF stopped at the"):
    tree = qjax.quantize(params, recipe)
  conv2, dense1 = tree["conv2"]["kernel"], tree["dense1"]["kernel"]
  assert isinstance(conv2, cp_layers.CPKernel) and conv2.rank == 43
  assert isinstance(dense1, cp_layers.CPKernel)
  assert dense1.factors[0].fmt.bits == 8
  # The rule is exactly cp_layers' factorization of that kernel.
  w = params["conv2"]["kernel"]
  want, _ = cp_kernel.factorize_kernel(
    w, fz.cp_rank(w.shape, 4), "int4", sweeps=2, inner=5
  )
  np.testing.assert_array_equal(conv2.dequantize(), want.dequantize())
  with pytest.raises(ValueError, match=r"QAF needs the option\(s\) rate"):
    qjax.rule("conv2/kernel", "int4", method="qaf")
  with pytest.raises(ValueError, match="must be per-tensor"):
    qjax.rule(
      "conv2/kernel",
      "int4",
      qjax.formats.scaling.per_channel(-1),
      method="qaf",
      rate=2,
    )


def test_a_sweep_cap_hit_is_reported_with_the_parameter():
  params = {"conv": {"kernel": fmnist_cnn.load_params()["conv2"]["kernel"]}}
  with pytest.warns(UserWarning, match="'conv/kernel': QAF stopped at the"):
    _, report = cp_layers.factorize(
      params, "kernel", rate=4, fmt="int4", sweeps=1, inner=2, progress=False
    )
  assert report["conv/kernel"]["sweep_cap_hit"]
