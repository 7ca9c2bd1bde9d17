"""A quantized matrix seen as serving stacks store it: rows [out, in].

Serving formats (compressed-tensors, GGUF) keep a linear layer's weight as
[out, in] with scale groups running along `in`. qjax's Flax kernels are
[in, out] (transpose=True: scales in blocks along axis -2, or one per output
channel, axis -1); a leaf already in row layout (an embedding [vocab, d]:
transpose=False) has blocks along axis -1 or one scale per row (axis 0).
`LinearCodes` is either, unpacked into rows:

  codes         uint32 [out, in]   element codes (two's complement for signed
                                   integers, the bit pattern for floats)
  scale         [out, in / group]  stored scales (float, or uint8 E8M0 / E4M3
                                   codes)
  zero          [out, in / group]  zero points (unsigned), or None
  tensor_scale  float32 scalar     NVFP4's second-level scale, or None
  group         elements per scale along `in` (a ragged scaling's last
                group is shorter: scale has ceil(in / group) columns)

`from_linear_codes` is the inverse, so an exporter's reader rebuilds the
QTensor bit for bit.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qjax import paths as paths_lib
from qjax import qtensor
from qjax.formats import packing
from qjax.formats.scaling import Scaling


@dataclasses.dataclass(frozen=True)
class LinearCodes:
  codes: np.ndarray
  scale: np.ndarray
  zero: np.ndarray | None
  tensor_scale: np.ndarray | None
  group: int
  fmt: object
  scale_format: str
  dtype: np.dtype

  @property
  def in_features(self) -> int:
    return self.codes.shape[1]


def _group(qt: qtensor.QTensor, path: str, transpose: bool) -> int:
  """Elements per scale along `in`, or a ValueError naming `path` when the
  scales are not one per (row, group of inputs)."""
  s = qt.scaling
  if len(qt.shape) != 2:
    raise ValueError(
      f"{path}: a {len(qt.shape)}-D leaf {qt.shape} is not a matrix; "
      "serving formats store [out, in] matrices only"
    )
  in_axis = 0 if transpose else 1
  axes = tuple(a % 2 for a in s.axes)
  n_in = qt.shape[in_axis]
  if s.mode == "channel" and axes == (1 - in_axis,):
    return n_in
  if s.mode == "block" and axes == (in_axis,):
    return s.sizes[0]
  where = "axis -2 of a Dense kernel" if transpose else "the last axis"
  raise ValueError(
    f"{path}: scaling {s.spec()} is not one scale per output or per group "
    f"of inputs along {where}; serving formats cannot store it"
  )


def linear_codes(
  qt: qtensor.QTensor, path: str, transpose: bool = True
) -> LinearCodes:
  """The row view [out, in] of a QTensor: a Dense kernel [in, out]
  (transpose=True) or a matrix already [out, in].

  Raises:
    ValueError: naming `path`, when the leaf is not 2-D or its scales are
      not per row or per group along the inputs.
  """
  group = _group(qt, path, transpose)
  codes = np.asarray(packing.unpack(qt.codes, qt.fmt.bits, qt.shape[-1]))
  n_out = qt.shape[1 if transpose else 0]
  per_row = -(-qt.shape[0 if transpose else 1] // group)

  def rows(x):
    if x is None:
      return None
    x = np.asarray(x)
    if transpose:  # [groups or 1, out or 1]
      return np.ascontiguousarray(np.broadcast_to(x, (per_row, n_out)).T)
    return np.ascontiguousarray(np.broadcast_to(x, (n_out, per_row)))

  return LinearCodes(
    np.ascontiguousarray((codes.T if transpose else codes).astype(np.uint32)),
    rows(qt.scale),
    rows(qt.zero),
    None if qt.tensor_scale is None else np.asarray(qt.tensor_scale),
    group,
    qt.fmt,
    qt.scaling.scale_format,
    np.dtype(qt.dtype),
  )


def from_linear_codes(
  lc: LinearCodes, transpose: bool = True
) -> qtensor.QTensor:
  """The QTensor a LinearCodes describes: a Dense kernel [in, out]
  (transpose=True; blocks along -2, or per output channel when the group
  spans the inputs) or the rows [out, in] as they are (blocks along -1, or
  per row).

  Raises:
    ValueError: the parts break a QTensor invariant (QTensor.validate).
  """
  n_out, n_in = lc.codes.shape
  if lc.group == n_in:
    base = Scaling("channel", (-1,) if transpose else (0,), ())
  else:
    base = Scaling("block", (-2,) if transpose else (-1,), (lc.group,))
  scaling = dataclasses.replace(
    base,
    scale_format=lc.scale_format,
    zero_point=lc.zero is not None,
    tensor_scale=lc.tensor_scale is not None,
    ragged=bool(n_in % lc.group),
  )

  def orient(x):
    if x is None:
      return None
    return np.ascontiguousarray(x.T if transpose else x)

  codes = orient(lc.codes).astype(packing.code_dtype(lc.fmt.bits))
  qt = qtensor.QTensor(
    packing.pack(jnp.asarray(codes), lc.fmt.bits),
    jnp.asarray(orient(lc.scale)),
    None if lc.zero is None else jnp.asarray(orient(lc.zero)),
    None if lc.tensor_scale is None else jnp.asarray(lc.tensor_scale),
    lc.fmt,
    scaling,
    codes.shape,
    np.dtype(lc.dtype),
  )
  qt.validate()
  return qt


def tree_leaves(tree) -> list[tuple[str, object]]:
  """('/'-joined path, leaf) pairs, QTensors kept whole."""
  flat, _ = jax.tree_util.tree_flatten_with_path(
    tree, is_leaf=qtensor.is_qtensor
  )
  return [(paths_lib.path_str(k), v) for k, v in flat]


def nest(flat: dict) -> dict:
  """{'a/b/c': leaf} -> {'a': {'b': {'c': leaf}}}."""
  tree = {}
  for p, v in flat.items():
    node = tree
    *parents, last = p.split("/")
    for k in parents:
      node = node.setdefault(k, {})
    node[last] = v
  return tree
