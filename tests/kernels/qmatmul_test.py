"""qmatmul: Pallas kernels (interpret mode) and the XLA reference against a
slow NumPy reference, for every listed format and ragged shapes."""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from qjax import formats, kernels
from qjax.formats import packing
from qjax.formats.scaling import Scaling
from qjax.kernels import dispatch, layout, pallas_gpu, pallas_tpu
from qjax.quantizers import rtn


def _scaled(name, block=None, **kw):
  if block:
    return formats.get(name), Scaling(
      "block", (0,), (block,), ragged=True, **kw
    )
  return formats.get(name), Scaling("channel", (-1,), **kw)


FORMATS = {
  "int8_pc": lambda: _scaled("int8"),
  "int4_pc": lambda: _scaled("int4"),
  "int4_g32": lambda: _scaled("int4", 32),
  "int4_g64": lambda: _scaled("int4", 64),
  "int4_g128": lambda: _scaled("int4", 128),
  "uint4_g128_zero": lambda: _scaled("uint4", 128, zero_point=True),
  "int3_pc": lambda: _scaled("int3"),
  "int2_pc": lambda: _scaled("int2"),
  "e4m3_pc": lambda: _scaled("float8_e4m3fn"),
  "mxfp4": lambda: formats.block_format("mxfp4"),
  "mxfp8": lambda: formats.block_format("mxfp8_e4m3"),
  "nvfp4": lambda: formats.block_format("nvfp4"),
  "nf4_g64": lambda: _scaled("nf4", 64),
}


def _slow_reference(x, qt) -> np.ndarray:
  """Decode every code with the format, apply each element's scale (and
  zero point) by explicit block indexing, multiply in float64."""
  k, n = qt.shape
  codes = np.asarray(packing.unpack(qt.codes, qt.fmt.bits, n))
  values = np.asarray(qt.fmt.decode(codes), np.float64)
  scale = np.asarray(
    kernels_decode_scale(qt.scale, qt.scaling.scale_format), np.float64
  )
  zero = None if qt.zero is None else np.asarray(qt.zero, np.float64)
  rows = qt.scaling.sizes[0] if qt.scaling.mode == "block" else k
  w = np.empty((k, n))
  for i in range(k):  # row i of the weight uses scale row i // block
    srow = min(i // rows, scale.shape[0] - 1)
    v = values[i] - (zero[srow] if zero is not None else 0.0)
    w[i] = v * scale[srow]  # [n] or a broadcast [1] (per tensor)
  if qt.tensor_scale is not None:
    w *= float(qt.tensor_scale)
  return np.asarray(x, np.float64) @ w


def kernels_decode_scale(stored, scale_format):
  from qjax import qtensor

  return qtensor.decode_scale(
    stored, Scaling("tensor", scale_format=scale_format)
  )


def _quantized(name, k, n, seed=0):
  fmt, scaling = FORMATS[name]()
  w = jax.random.normal(jax.random.PRNGKey(seed), (k, n)) * 0.05
  return rtn.rtn(w, fmt, scaling)


def _rel(out, ref):
  out = np.asarray(out, np.float64)
  return np.linalg.norm(out - ref) / np.linalg.norm(ref)


class LayoutTest(parameterized.TestCase):
  @parameterized.parameters(*FORMATS)
  def test_prepare_round_trips_exactly(self, name):
    qt = _quantized(name, 576, 300)
    for opts in dispatch.PREPARE_OPTIONS.values():
      pw = layout.prepare(qt, **opts)
      np.testing.assert_array_equal(layout.dequantize(pw), qt.dequantize())
      kp, np_ = pw.padded_shape
      # The planes hold exactly the packed bits (plus tile padding).
      self.assertEqual(
        sum(p.size for p in pw.planes), kp * np_ * qt.fmt.bits // 8
      )


class KernelTest(parameterized.TestCase):
  @parameterized.product(name=list(FORMATS), m=[1, 20])
  def test_triton_kernel_matches_slow_reference(self, name, m):
    qt = _quantized(name, 576, 300)
    x = jax.random.normal(jax.random.PRNGKey(m), (m, 576))
    want = _slow_reference(x, qt)
    out = kernels.qmatmul(x, qt, impl="triton", interpret=True)
    self.assertLess(_rel(out, want), 2e-6)
    self.assertLess(_rel(kernels.reference(x, qt), want), 2e-6)

  @parameterized.parameters(
    "int4_pc", "int3_pc", "mxfp4", "nvfp4", "uint4_g128_zero"
  )
  def test_triton_gemv_accumulate_matches_slow_reference(self, name):
    qt = _quantized(name, 576, 300)
    x = jax.random.normal(jax.random.PRNGKey(4), (1, 576))
    pw = kernels.prepare(qt, "triton")
    out = pallas_gpu.matmul(x, pw, gemv="accumulate", interpret=True)
    self.assertLess(_rel(out, _slow_reference(x, qt)), 2e-6)

  @parameterized.parameters(*FORMATS)
  def test_tpu_kernel_matches_slow_reference(self, name):
    qt = _quantized(name, 576, 1100)
    x = jax.random.normal(jax.random.PRNGKey(5), (5, 576))
    want = _slow_reference(x, qt)
    out = kernels.qmatmul(x, qt, impl="mosaic_tpu", interpret=True)
    self.assertLess(_rel(out, want), 2e-6)

  def test_error_is_detectable(self):
    # The tolerance above would catch a swapped column slot or scale row.
    qt = _quantized("int4_g128", 576, 300)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 576))
    want = _slow_reference(x, qt)
    pw = layout.prepare(qt, tile_n=128)
    reversed_scales = dataclasses.replace(pw, scale=pw.scale[::-1])
    out = pallas_gpu.matmul(x, reversed_scales, interpret=True)
    self.assertGreater(_rel(out, want), 1e-2)
    swapped = dataclasses.replace(pw, planes=pw.planes[::-1])
    out = pallas_gpu.matmul(x, swapped, interpret=True)
    self.assertGreater(_rel(out, want), 1e-2)

  def test_bfloat16_activations(self):
    qt = _quantized("mxfp4", 576, 300)
    x = jax.random.normal(jax.random.PRNGKey(2), (20, 576)).astype(jnp.bfloat16)
    want = _slow_reference(np.asarray(x, np.float32), qt)
    out = kernels.qmatmul(x, qt, impl="triton", interpret=True)
    self.assertEqual(out.dtype, jnp.float32)  # bf16 x, float32 weights
    self.assertLess(_rel(out, want), 1e-5)

  def test_batch_axes_and_vmap(self):
    qt = _quantized("int4_g64", 576, 300)
    pw = kernels.prepare(qt, "triton")
    xs = jax.random.normal(jax.random.PRNGKey(3), (2, 3, 576))
    want = _slow_reference(xs.reshape(6, 576), qt).reshape(2, 3, 300)
    out = kernels.qmatmul(xs, pw, impl="triton", interpret=True)
    self.assertEqual(out.shape, (2, 3, 300))
    self.assertLess(_rel(out, want), 2e-6)
    mapped = jax.vmap(
      lambda x: kernels.qmatmul(x, pw, impl="triton", interpret=True)
    )(xs)
    self.assertLess(_rel(mapped, want), 2e-6)

  @parameterized.parameters(
    "int4_g128", "int3_pc", "mxfp4", "nvfp4", "uint4_g128_zero"
  )
  def test_kernels_lower_for_gpu_and_tpu(self, name):
    # Lowering runs each backend's rules (Triton IR, Mosaic) on this CPU
    # machine: unsupported ops or block shapes fail here, not on a pod.
    qt = _quantized(name, 576, 300)
    x = jnp.ones((1, 576), jnp.bfloat16)
    for impl, platform, kernel in (
      ("triton", "cuda", pallas_gpu.matmul),
      ("mosaic_tpu", "tpu", pallas_tpu.matmul),
    ):
      pw = kernels.prepare(qt, impl)
      for m in (1, 16):
        x = jnp.ones((m, 576), jnp.bfloat16)
        lowered = (
          jax.jit(kernel).trace(x, pw).lower(lowering_platforms=(platform,))
        )
        self.assertIn("custom_call", lowered.as_text())


class DispatchTest(absltest.TestCase):
  def test_cpu_uses_the_reference(self):
    self.assertEqual(kernels.default_impl(), "xla")
    qt = _quantized("int4_pc", 64, 32)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 64))
    np.testing.assert_array_equal(
      kernels.qmatmul(x, qt), kernels.reference(x, qt)
    )

  def test_unsupported_format_warns_once_or_raises(self):
    fmt, _ = _scaled("int4")
    w = jax.random.normal(jax.random.PRNGKey(0), (64, 32))
    qt = rtn.rtn(w, fmt, Scaling("channel", (0,)))  # scales along K
    x = jnp.ones((1, 64))
    with self.assertRaisesRegex(ValueError, "input axis"):
      kernels.qmatmul(x, qt, impl="triton", interpret=True)
    dispatch._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      orig = dispatch.default_impl
      dispatch.default_impl = lambda: "triton"  # as on a GPU
      try:
        a = kernels.qmatmul(x, qt)
        b = kernels.qmatmul(x, qt)
      finally:
        dispatch.default_impl = orig
    msgs = [str(c.message) for c in caught if "qmatmul" in str(c.message)]
    self.assertLen(msgs, 1)
    self.assertIn("int4", msgs[0])
    np.testing.assert_array_equal(a, b)

  def test_shape_mismatch_is_a_clear_error(self):
    qt = _quantized("int4_pc", 64, 32)
    with self.assertRaisesRegex(ValueError, "last axis must equal.*K = 64"):
      kernels.qmatmul(jnp.ones((2, 63)), qt)
    with self.assertRaisesRegex(ValueError, "unknown qmatmul impl"):
      kernels.qmatmul(jnp.ones((2, 64)), qt, impl="cuda")


if __name__ == "__main__":
  absltest.main()
