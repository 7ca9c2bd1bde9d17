"""qmatmul(x, w): x @ dequantize(w), reading packed codes.

Implementations:
  'xla'         the reference: decode the whole weight, then one dot with
                float32 accumulation. Chosen on CPU.
  'triton'      the Pallas GPU kernel (qjax.kernels.pallas_gpu).
  'mosaic_tpu'  the Pallas TPU kernel (qjax.kernels.pallas_tpu).
  'auto'        the kernel of the default backend when it supports the
                weight, else 'xla' with a one-time warning naming the format.

Kernels take a PreparedWeight (qjax.kernels.layout.prepare, once per weight
at load time). Given a QTensor they prepare it on every call, which is right
for tests and wrong for serving: `prepare_tree` converts a whole tree once.
"""

import warnings

import jax
import jax.numpy as jnp

from qjax import qtensor
from qjax.kernels import layout, pallas_gpu, pallas_tpu

IMPLS = ("auto", "xla", "triton", "mosaic_tpu")
_KERNEL_OF_BACKEND = {"gpu": "triton", "cuda": "triton", "tpu": "mosaic_tpu"}
_warned: set[str] = set()

# Tile layout each kernel is prepared with (see layout.prepare).
PREPARE_OPTIONS = {
  "triton": dict(tile_n=128),
  "mosaic_tpu": dict(tile_n=1024, k_multiple=128),
}


def default_impl() -> str:
  """The kernel for jax.default_backend(), or 'xla' (CPU, or other)."""
  return _KERNEL_OF_BACKEND.get(jax.default_backend(), "xla")


def _describe(w) -> str:
  if isinstance(w, layout.PreparedWeight):
    return f"{w.fmt} ({w.scale_format} scales)"
  return f"{w.fmt} ({w.scaling.spec()})"


def _shape_of(w) -> tuple[int, ...]:
  return tuple(w.shape)


def reference(x: jax.Array, w) -> jax.Array:
  """x [..., K] @ dequantize(w) [K, N] -> float32 [..., N], XLA only."""
  if isinstance(w, layout.PreparedWeight):
    dense = layout.dequantize(w)
  else:
    dense = w.dequantize(jnp.float32)
  return jnp.matmul(
    x.astype(jnp.float32),
    dense,
    precision=jax.lax.Precision.HIGHEST,
    preferred_element_type=jnp.float32,
  )


def prepare(w: qtensor.QTensor, impl: str | None = None):
  """A QTensor in the layout of `impl`'s kernel (default: this backend's).

  Weights the kernel cannot take, and impl 'xla', come back unchanged.
  """
  impl = impl or default_impl()
  if impl in ("xla", "auto") or not isinstance(w, qtensor.QTensor):
    return w
  if layout.unsupported_reason(w):
    return w
  return layout.prepare(w, **PREPARE_OPTIONS[impl])


def prepare_tree(tree, impl: str | None = None):
  """`prepare` on every 2-D QTensor leaf of a tree."""
  return jax.tree.map(
    lambda w: prepare(w, impl) if qtensor.is_qtensor(w) else w,
    tree,
    is_leaf=qtensor.is_qtensor,
  )


def qmatmul(
  x: jax.Array,
  w,
  *,
  impl: str = "auto",
  interpret: bool = False,
  out_dtype=None,
) -> jax.Array:
  """x @ dequantize(w) with float32 accumulation.

  Args:
    x: [..., K] activations (float32, bfloat16 or float16; bfloat16/float16
      feed the MMA as they are, float32 at full precision).
    w: a QTensor [K, N] (Flax Dense layout: in, out) or a PreparedWeight.
    impl: one of IMPLS. An explicit kernel raises if it cannot take w.
    interpret: run the Pallas kernel in interpret mode (CPU tests).
    out_dtype: result dtype; default jnp.result_type(x, w.dtype).

  Returns:
    [..., N] in out_dtype.

  Raises:
    ValueError: unknown impl, x's last axis != K, a weight that is not 2-D,
      or an explicit kernel that does not support w's format.
  """
  if impl not in IMPLS:
    raise ValueError(f"unknown qmatmul impl {impl!r}; known: {IMPLS}")
  shape = _shape_of(w)
  if len(shape) != 2:
    raise ValueError(f"qmatmul takes a 2-D [K, N] weight, got shape {shape}")
  if x.ndim < 1 or x.shape[-1] != shape[0]:
    raise ValueError(
      f"qmatmul: x has shape {tuple(x.shape)}, its last axis must equal the "
      f"weight's K = {shape[0]} (weight shape {shape})"
    )
  out_dtype = out_dtype or jnp.result_type(x.dtype, w.dtype)
  chosen = default_impl() if impl == "auto" else impl
  if chosen != "xla":
    reason = _kernel_reason(w, chosen)
    if reason and impl != "auto":
      raise ValueError(
        f"qmatmul impl {impl!r} cannot take this weight: {reason}"
      )
    if reason:
      name = _describe(w)
      if name not in _warned:
        _warned.add(name)
        warnings.warn(
          f"qmatmul: no {chosen} kernel for {name} ({reason}); using the XLA "
          "reference",
          stacklevel=2,
        )
      chosen = "xla"
  if chosen == "xla":
    return reference(x, w).astype(out_dtype)
  if isinstance(w, qtensor.QTensor):
    w = layout.prepare(w, **PREPARE_OPTIONS[chosen])
  lead = x.shape[:-1]
  x2 = x.reshape(-1, shape[0])
  kernel = pallas_gpu.matmul if chosen == "triton" else pallas_tpu.matmul
  out = kernel(x2, w, interpret=interpret)
  return out.reshape(*lead, shape[1]).astype(out_dtype)


def _kernel_reason(w, impl: str) -> str | None:
  if isinstance(w, layout.PreparedWeight):
    want = PREPARE_OPTIONS[impl]
    if w.tile_n != want["tile_n"]:
      return f"prepared with tile_n={w.tile_n}, {impl} wants {want['tile_n']}"
    kp = w.padded_shape[0]
    if kp % want.get("k_multiple", 1):
      return f"padded K={kp} is not a multiple of {want['k_multiple']}"
    return None
  return layout.unsupported_reason(w)
