"""The layers whose kernel meets its input as a matrix product, Linen and
NNX alike, and the rows of that product.

  Linen  nn.Dense, nn.DenseGeneral (no batch_dims), nn.Einsum, nn.Conv
  NNX    nnx.Linear, nnx.LinearGeneral (no batch_axis), nnx.Einsum, nnx.Conv

For each call `input_rows(layer, x, args, kwargs)` gives the matrix X whose
product with the kernel's matrix view is the layer's output:

  Dense / Linear   X [n, in], kernel [in, out].
  DenseGeneral / LinearGeneral
                   the contracted axes moved last: X [n, prod(in)], kernel
                   [*in, *out] viewed as [prod(in), prod(out)].
  Einsum           the contracted labels, in the kernel's order: X [n,
                   prod(contracted)], when those labels lead the kernel
                   (e.g. 'BTD,DNH->BTNH', 'BTNH,NHD->BTD').
  Conv (any kernel size, strides, dilation, padding, feature groups)
                   the patch matrix (im2col): X [n, K * in_g] per group,
                   K = prod(kernel_size), ordered (tap, channel) as kernel
                   [*kernel_size, in_g, out] flattens; G groups give
                   X [G, n, K * in_g].

Patches are extracted with a one-hot convolution at HIGHEST precision, one
group per input channel: every output is one input value times 1 plus
zeros, so X holds the input values exactly.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.linen.linear import canonicalize_padding

_HI = jax.lax.Precision.HIGHEST
_LINEN = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv)
_NNX = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv)


def kind(layer) -> str | None:
  """'dense', 'dense_general', 'einsum', 'conv', or None (not a layer whose
  kernel qjax can view as a matrix)."""
  if isinstance(layer, (nn.Dense, nnx.Linear)):
    return "dense"
  if isinstance(layer, nn.DenseGeneral):
    return None if layer.batch_dims else "dense_general"
  if isinstance(layer, nnx.LinearGeneral):
    return None if layer.batch_axis else "dense_general"
  if isinstance(layer, (nn.Einsum, nnx.Einsum)):
    return "einsum"
  if isinstance(layer, nn.Conv) and not isinstance(layer, nn.ConvLocal):
    return "conv"
  if isinstance(layer, nnx.Conv) and not isinstance(layer, nnx.ConvTranspose):
    return "conv"
  return None


def is_linear(layer) -> bool:
  """Whether calibration can see this layer (see the module docstring)."""
  return kind(layer) is not None


def groups(layer) -> int:
  """Feature groups of a conv (1 for every other layer)."""
  return int(getattr(layer, "feature_group_count", 1) or 1)


def _tuple(v, n):
  if v is None:
    return (1,) * n
  if isinstance(v, int):
    return (v,) * (n or 1)
  return tuple(int(a) for a in v)


def _einsum_labels(layer, args, kwargs) -> tuple[str, str, str]:
  eq = kwargs.get("einsum_str")
  if eq is None and len(args) > 1:
    eq = args[1]
  eq = (eq or layer.einsum_str).replace(" ", "")
  lhs, out = eq.split("->")
  x_labels, k_labels = lhs.split(",")
  if "." in eq:
    raise ValueError(f"einsum {eq!r}: ellipses are not supported")
  return x_labels, k_labels, out


def einsum_contracted(layer, args=(), kwargs=None) -> str | None:
  """The kernel labels an Einsum contracts with its input, when they lead
  the kernel and no label is a batch label of both; else None."""
  x_labels, k_labels, out = _einsum_labels(layer, args, kwargs or {})
  contracted = "".join(c for c in k_labels if c in x_labels and c not in out)
  if any(c in x_labels and c in out for c in k_labels):
    return None  # a label shared by input, kernel and output: batched
  if k_labels[: len(contracted)] != contracted:
    return None
  return contracted


def _conv_patches(layer, x) -> jax.Array:
  """[n, K, in] patches of a conv's input x [*batch, *spatial, in]."""
  ks = _tuple(layer.kernel_size, None)
  nd = len(ks)
  strides = _tuple(layer.strides, nd)
  in_dil = _tuple(layer.input_dilation, nd)
  k_dil = _tuple(layer.kernel_dilation, nd)
  x = x.reshape((-1, *x.shape[-(nd + 1) :])).astype(jnp.float32)
  padding = canonicalize_padding(layer.padding, nd)
  if padding in ("CIRCULAR", "REFLECT"):
    dilated = [(k - 1) * d + 1 for k, d in zip(ks, k_dil, strict=True)]
    pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
    x = jnp.pad(
      x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding]
    )
    padding = "VALID"
  elif padding == "CAUSAL":
    x = jnp.pad(x, [(0, 0), (k_dil[0] * (ks[0] - 1), 0), (0, 0)])
    padding = "VALID"
  c, k = x.shape[-1], math.prod(ks)
  one_hot = jnp.tile(jnp.eye(k, dtype=jnp.float32).reshape(*ks, 1, k), c)
  spatial = tuple(range(1, nd + 1))
  numbers = jax.lax.ConvDimensionNumbers(
    lhs_spec=(0, nd + 1, *spatial),
    rhs_spec=(nd + 1, nd, *range(nd)),
    out_spec=(0, nd + 1, *spatial),
  )
  out = jax.lax.conv_general_dilated(
    x,
    one_hot,
    window_strides=strides,
    padding=padding,
    lhs_dilation=in_dil,
    rhs_dilation=k_dil,
    dimension_numbers=numbers,
    feature_group_count=c,
    precision=_HI,
  )  # [b, *out_spatial, c * k], channel-major
  return out.reshape(-1, c, k).transpose(0, 2, 1)


def input_rows(layer, x, args=(), kwargs=None) -> jax.Array:
  """The layer's input as the rows of its matrix product, at least float32
  (float64 stays, for float64 calibration): [n, d], or [G, n, d] for a
  conv with G > 1 feature groups.

  Raises:
    ValueError: a layer `kind` does not know, or an Einsum whose
      contracted labels do not lead its kernel.
  """
  k = kind(layer)
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  if k == "dense":
    return x.reshape(-1, x.shape[-1]).astype(dtype)
  if k == "dense_general":
    axes = tuple(a % x.ndim for a in _tuple(layer.axis, None))
    moved = jnp.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim)))
    d = math.prod(x.shape[a] for a in axes)
    return moved.reshape(-1, d).astype(dtype)
  if k == "einsum":
    contracted = einsum_contracted(layer, args, kwargs)
    if contracted is None:
      raise ValueError(
        "this Einsum's contracted labels do not lead its kernel; only a "
        "data-free rule can quantize it"
      )
    x_labels = _einsum_labels(layer, args, kwargs or {})[0]
    src = tuple(x_labels.index(c) for c in contracted)
    moved = jnp.moveaxis(x, src, tuple(range(x.ndim - len(src), x.ndim)))
    d = math.prod(x.shape[a] for a in src)
    return moved.reshape(-1, d).astype(dtype)
  if k == "conv":
    ks = _tuple(layer.kernel_size, None)
    pointwise = all(v == 1 for v in ks) and all(
      s == 1 for s in _tuple(layer.strides, len(ks))
    )
    g = groups(layer)
    if (
      pointwise
      and g == 1
      and canonicalize_padding(layer.padding, len(ks))
      in (
        "SAME",
        "VALID",
        "CIRCULAR",
        "REFLECT",
        ((0, 0),) * len(ks),
      )
    ):
      return x.reshape(-1, x.shape[-1]).astype(dtype)
    patches = _conv_patches(layer, x)  # [n, K, in]
    n, taps, c = patches.shape
    if g == 1:
      return patches.reshape(n, taps * c)
    grouped = patches.reshape(n, taps, g, c // g).transpose(2, 0, 1, 3)
    return grouped.reshape(g, n, taps * (c // g))
  raise ValueError(f"{type(layer).__name__} is not a layer qjax calibrates")


def kernel_split(shape, d: int) -> int:
  """How many leading axes of a kernel of `shape` are its input (their
  product is d, the statistics' side).

  Raises:
    ValueError: no run of leading axes multiplies to d.
  """
  prod = 1
  for i, n in enumerate(shape):
    if prod == d and i > 0:
      return i
    prod *= int(n)
  raise ValueError(
    f"statistics of size {d} do not match the leading axes of kernel "
    f"{tuple(shape)}"
  )
