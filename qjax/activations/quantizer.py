"""Activation fake-quant: x -> decode(encode(x)) in any qjax format.

An activation x [..., K] is viewed as a matrix [T, K] (T = tokens, pixels:
every leading axis; K = the axis a layer contracts, the last one). The
granularity says which elements share a scale:

  tensor   one scale for the whole call (or a static one from calibration).
  token    one scale per row: per token for an LM, per pixel for a conv.
  block    blocks of `size` consecutive elements along K, one per row and
           block (OCP MX: 32 with E8M0 scales; NVFP4: 16 with E4M3 scales
           and a float32 tensor scale).

Scales follow the weight rules exactly (qjax.quantizers.rtn.block_scales),
so fake-quant is bit for bit the value a packed activation would decode to:
float32 scales are amax / element max rounded once; E8M0 is the OCP FLOOR
rule; NVFP4's block ratio and element quotient are each rounded once.
Elements saturate at the format's max. Quantization is symmetric (no zero
points): a signed element format is required.

Dynamic scales are measured on every call. Static scales come from
calibration (qjax.activations.observers): a per-tensor scale, or for NVFP4
the tensor scale with block scales still measured per call, as NVFP4
inference does.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from qjax import qtensor
from qjax.formats import exmy, integer
from qjax.formats import names as format_names
from qjax.formats.scaling import Scaling
from qjax.quantizers import rtn

GRANULARITIES = ("tensor", "token", "block")
OBSERVERS = ("minmax", "percentile", "mse")
# MSE observer: clip ratios r (amax * r) tried, largest first.
DEFAULT_MSE_RATIOS = tuple(round(1.0 - 0.02 * i, 2) for i in range(26))


@dataclasses.dataclass(frozen=True)
class ActQuant:
  """How one layer input is quantized (hashable: a jit static argument).

  Attributes:
    fmt: element format (a signed ExMy, IntFormat or Codebook).
    scaling: scale sharing over the [T, K] view (tensor; channel along axis
      0 = per token; block along axis 1 = along K).
    static: scales from calibration (tensor scaling, or the tensor scale of
      a two-level block scaling) instead of per call.
    observer: how calibration picks a static range: 'minmax' (the largest
      |x| seen), 'percentile' (the `percentile`-th percentile of |x| over
      every calibration value, NumPy's linear interpolation) or 'mse' (the
      clip ratio of `mse_ratios` whose fake-quant has the least squared
      error over the calibration set, first minimum in the given order).
    percentile: in (0, 100], for observer='percentile'.
    mse_ratios: clip ratios for observer='mse'.
    name: the name it was built from, for reports.
    rotate: None, or a Hadamard rotation of the input before it is
      quantized (qjax.transforms.hadamard): 0 over all of K, b > 0 over
      runs of b channels. The layer then receives fq(x R) R^T, which is
      fq(x R) times the rotated weight R^T W when the weight is stored
      rotated (the qjax.Hadamard method stage).
    rotate_seed: R's random signs (hadamard.rotation); the weight's
      Hadamard stage must use the same.
    orders: PIPE's input expansion (dynamic scales only): x ~ sum of
      `orders` terms, term k the fake-quant of what the first k - 1 leave,
      x - (t_1 + ... + t_{k-1}); each term is one low-bit matmul a deployment
      runs in parallel.
  """

  fmt: object
  scaling: Scaling
  static: bool = False
  observer: str = "minmax"
  percentile: float = 99.99
  mse_ratios: tuple[float, ...] = DEFAULT_MSE_RATIOS
  name: str = ""
  rotate: int | None = None
  rotate_seed: int | None = 0
  orders: int = 1

  @property
  def granularity(self) -> str:
    return {"tensor": "tensor", "channel": "token", "block": "block"}[
      self.scaling.mode
    ]

  def spec(self) -> str:
    kind = f"static-{self.observer}" if self.static else "dynamic"
    if self.orders > 1:
      kind += f"/x{self.orders}"
    turn = "" if self.rotate is None else f"/hadamard{self.rotate or ''}"
    if self.fmt is None:
      return "float" + turn
    return f"{self.name or self.fmt}/{self.granularity}/{kind}{turn}"


def act_quant(
  fmt,
  granularity: str = "token",
  *,
  block_size: int | None = None,
  scale_format: str = "float32",
  static: bool = False,
  observer: str = "minmax",
  percentile: float = 99.99,
  mse_ratios: tuple[float, ...] = DEFAULT_MSE_RATIOS,
  rotate: int | None = None,
  rotate_seed: int | None = 0,
  orders: int = 1,
  ragged: bool = False,
) -> ActQuant:
  """Builds an ActQuant.

  Args:
    fmt: an element format name ('int8', 'float8_e4m3fn', 'e2m1', 'nf4',
      ...) or object, or a block format name ('mxfp4', 'mxint8', 'nvfp4',
      'mxfp8_e4m3', 'bfp16', ...), which fixes granularity 'block' along K
      with its own block size and scales; 'none' with `rotate` set: the
      rotation alone, no quantization.
    granularity: 'tensor', 'token' or 'block' (block needs block_size).
    block_size: elements per block along K.
    scale_format: how scales are stored (qjax.formats.Scaling).
    static: calibrated scales (see ActQuant).
    observer, percentile, mse_ratios, rotate, rotate_seed, orders: see
      ActQuant.
    ragged: blocks only: an input width that is no multiple of the block
      ends in a short block (the MX spec's zero padding gives the same
      values); otherwise that is an error.

  Raises:
    ValueError: an unknown format, granularity or observer; an unsigned
      element format; a static scale the granularity cannot have.
  """
  if rotate is not None and int(rotate) < 0:
    raise ValueError(
      f"rotate must be None, 0 (all of K) or a block size > 0, got {rotate}"
    )
  rotate = None if rotate is None else int(rotate)
  if fmt == "none":
    if rotate is None:
      raise ValueError("format 'none' quantizes nothing: set rotate, or skip")
    return ActQuant(
      None,
      Scaling("tensor", (), ()),
      name="none",
      rotate=rotate,
      rotate_seed=rotate_seed,
    )
  name = fmt if isinstance(fmt, str) else getattr(fmt, "name", str(fmt))
  if format_names.is_block_format(fmt):
    if block_size is not None:
      raise ValueError(f"{fmt!r} fixes its own block size; do not pass one")
    element, scaling = format_names.block_format(fmt, axis=1)
    scaling = dataclasses.replace(scaling, ragged=bool(ragged))
  else:
    element = format_names.get(fmt)
    if granularity not in GRANULARITIES:
      raise ValueError(
        f"activation granularity {granularity!r} is not one of {GRANULARITIES}"
      )
    if granularity == "block":
      if block_size is None:
        raise ValueError("granularity 'block' needs block_size")
      scaling = Scaling(
        "block", (1,), (int(block_size),), scale_format, ragged=bool(ragged)
      )
    elif block_size is not None or ragged:
      raise ValueError(
        f"block_size and ragged apply to granularity 'block', not "
        f"{granularity!r}"
      )
    elif granularity == "token":
      scaling = Scaling("channel", (0,), (), scale_format)
    else:
      scaling = Scaling("tensor", (), (), scale_format)
  if isinstance(element, integer.IntFormat) and not element.signed:
    raise ValueError(
      f"activation format {name!r} is unsigned: activation quantization "
      "is symmetric, use a signed format"
    )
  if observer not in OBSERVERS:
    raise ValueError(f"observer {observer!r} is not one of {OBSERVERS}")
  if not 0 < percentile <= 100:
    raise ValueError(f"percentile must be in (0, 100], got {percentile}")
  ratios = tuple(float(r) for r in mse_ratios)
  if not ratios or any(not 0 < r <= 1 for r in ratios):
    raise ValueError(f"mse_ratios must be in (0, 1], got {mse_ratios}")
  if static and not (scaling.mode == "tensor" or scaling.tensor_scale):
    raise ValueError(
      f"a static scale is one per tensor: {name!r} with granularity "
      f"{granularity!r} ({scaling.spec()}) measures its scales per call; "
      "use static=False, or granularity 'tensor'"
    )
  if not isinstance(orders, int) or orders < 1:
    raise ValueError(f"orders must be an integer >= 1, got {orders!r}")
  if orders > 1 and static:
    raise ValueError(
      "input expansion (orders > 1) measures its scales per call"
    )
  return ActQuant(
    element,
    scaling,
    bool(static),
    observer,
    float(percentile),
    ratios,
    name,
    rotate,
    rotate_seed,
    orders,
  )


def _rows(x) -> jax.Array:
  x = exmy.as_float32(x, "activation")
  return x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)


def static_scale(amax, quant: ActQuant) -> jax.Array:
  """The stored static scale for a calibrated range amax (a scalar): the
  per-tensor scale amax / element max in the scale format, or NVFP4's
  tensor scale amax / (element max * 448). A zero range gives scale 1, as
  an all-zero block does."""
  amax = jnp.asarray(amax, jnp.float32).reshape(1, 1)
  if quant.scaling.tensor_scale:
    s = rtn.divide(amax, rtn.element_max(quant.fmt) * 448.0)
    return jnp.where(s > 0, s, 1.0).reshape(())
  grid = rtn.block_scales(amax, rtn._saturating(quant.fmt), quant.scaling)
  return grid.stored.reshape(())


def _grid(x2, quant: ActQuant, scale):
  fmt = rtn._saturating(quant.fmt)
  if scale is None:
    return rtn.block_scales(x2, fmt, quant.scaling)
  scale = jnp.asarray(scale)
  if quant.scaling.tensor_scale:
    return rtn.block_scales(
      x2, fmt, quant.scaling, tensor_scale=scale.astype(jnp.float32)
    )
  # A per-tensor grid around the given stored scale.
  amax_like = jnp.zeros((1, 1), jnp.float32)
  template = rtn.block_scales(amax_like, fmt, quant.scaling)
  stored = scale.astype(template.stored.dtype).reshape(1, 1)
  value = qtensor.decode_scale(stored, quant.scaling)
  exponent = None
  if template.exponent_full is not None:
    exponent = jnp.broadcast_to(stored.astype(jnp.int32) - 127, x2.shape)
  return rtn.Grid(
    stored,
    None,
    None,
    jnp.broadcast_to(value, x2.shape),
    None,
    exponent,
  )


def fake_quant(x, quant: ActQuant, scale=None) -> jax.Array:
  """decode(encode(x)) with per-call or given (static) scales.

  Args:
    x: [..., K] float activation (float32, bfloat16 or float16).
    quant: the ActQuant.
    scale: the stored static scale (static_scale), or None for dynamic.

  Returns:
    float32 [..., K]: every value is on the format's grid times its scale.

  Raises:
    ValueError: a static quant without a scale, or a block size that does
      not divide K.
  """
  if quant.fmt is None:
    return exmy.as_float32(x, "activation")
  if quant.static and scale is None:
    raise ValueError(
      f"{quant.spec()} is static: pass the scale from calibration "
      "(qjax.activations.calibrate)"
    )
  shape = jnp.shape(x)
  x2 = _rows(x)
  quant.scaling.block_shape(x2.shape)  # raises on a block that does not fit
  fmt = rtn._saturating(quant.fmt)
  total = None
  for _ in range(quant.orders):  # PIPE's input expansion for orders > 1
    residual = x2 if total is None else x2 - total
    grid = _grid(residual, quant, None if not quant.static else scale)
    term = rtn.dequantize_with(rtn.encode_grid(residual, fmt, grid), fmt, grid)
    total = term if total is None else total + term
  return total.reshape(shape)


def codes_and_grid(x, quant: ActQuant, scale=None):
  """(codes [T, K], rtn.Grid) of x's [T, K] view: what a packed activation
  would store (for tests and exporters)."""
  x2 = _rows(x)
  grid = _grid(x2, quant, scale if quant.static else None)
  return rtn.encode_grid(x2, rtn._saturating(quant.fmt), grid), grid


def bits_per_value(quant: ActQuant, k: int) -> float:
  """Element bits plus the scale bits shared by one row of K elements
  (block scalings; tensor and token scales are counted as free)."""
  if quant.fmt is None:
    return 32.0
  bits = quant.fmt.bits * quant.orders
  if quant.scaling.mode == "block":
    blocks = math.ceil(k / quant.scaling.sizes[0])
    bits += quant.orders * quant.scaling.scale_bits() * blocks / k
  return bits
