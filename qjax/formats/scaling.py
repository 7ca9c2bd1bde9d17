"""How elements share scales, and how a scale itself is stored.

A Scaling partitions a tensor into blocks (a block is a set of elements that
share one scale, the OCP MX word):
  tensor     one block.
  channel    one block per index of `axes[0]`.
  block      blocks of `sizes[i]` consecutive elements along `axes[i]` (one or
             two axes), one per index of every other axis.
The scale tensor has the input's rank; its shape is ceil(shape / block).
When `ragged` is True a block size need not divide its axis: the last block
along that axis is shorter (its statistics ignore the missing elements).

Scale formats: 'float32', 'bfloat16', 'float16' (amax / element max, rounded
to that dtype), 'e8m0' (OCP MX v1.0: 2^(floor(log2 amax) - emax_elem),
stored as uint8 E8M0 codes), 'float8_e4m3fn' (amax / element max rounded to
E4M3, stored as uint8 codes; with `tensor_scale` it is NVFP4's two-level
scheme: s_t = amax_tensor / (max_elem * 448), s_b = e4m3(amax_b / max_elem /
s_t)).
"""

import dataclasses
import math

import numpy as np

SCALE_FORMATS = ("float32", "bfloat16", "float16", "e8m0", "float8_e4m3fn")
MODES = ("tensor", "channel", "block")
SCALE_RULES = ("floor", "midmax")


@dataclasses.dataclass(frozen=True)
class Scaling:
  """Static description of scale sharing (hashable; a jit static argument).

  Attributes:
    mode: 'tensor', 'channel' or 'block'.
    axes: the channel axis, or the one or two block axes.
    sizes: block sizes along `axes` (mode 'block' only).
    scale_format: one of SCALE_FORMATS.
    zero_point: store a per-block zero point (asymmetric; unsigned integer
      elements only).
    tensor_scale: a second, float32 per-tensor scale (NVFP4).
    ragged: allow block sizes that do not divide their axis.
    scale_rule: how an E8M0 scale is chosen: 'floor' (OCP MX v1.0,
      2^(floor(log2 amax) - emax_elem)) or 'midmax' (TensorCast's option:
      one exponent higher when amax / 2^e exceeds the midpoint between the
      element max and 2^(emax_elem + 1), trading clipping for resolution).
  """

  mode: str = "channel"
  axes: tuple[int, ...] = (-1,)
  sizes: tuple[int, ...] = ()
  scale_format: str = "float32"
  zero_point: bool = False
  tensor_scale: bool = False
  ragged: bool = False
  scale_rule: str = "floor"

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"scaling mode {self.mode!r} is not one of {MODES}")
    if self.scale_format not in SCALE_FORMATS:
      raise ValueError(
        f"unknown scale format {self.scale_format!r}; known: "
        f"{', '.join(SCALE_FORMATS)}"
      )
    object.__setattr__(self, "axes", tuple(int(a) for a in self.axes))
    object.__setattr__(self, "sizes", tuple(int(s) for s in self.sizes))
    if self.mode == "block":
      if not 1 <= len(self.axes) <= 2 or len(self.sizes) != len(self.axes):
        raise ValueError(
          f"block scaling needs one size per axis (1 or 2 axes), got "
          f"axes={self.axes} sizes={self.sizes}"
        )
      if any(s < 1 for s in self.sizes):
        raise ValueError(f"block sizes must be >= 1, got {self.sizes}")
      if len(set(self.axes)) != len(self.axes):
        raise ValueError(f"block axes must differ, got {self.axes}")
    elif self.mode == "channel" and len(self.axes) != 1:
      raise ValueError(f"channel scaling takes one axis, got {self.axes}")
    if self.scale_rule not in SCALE_RULES:
      raise ValueError(
        f"scale_rule {self.scale_rule!r} is not one of {SCALE_RULES}"
      )
    if self.scale_rule != "floor" and self.scale_format != "e8m0":
      raise ValueError(
        f"scale_rule {self.scale_rule!r} is a rule for e8m0 scales, not "
        f"{self.scale_format!r}"
      )
    if self.tensor_scale and self.scale_format != "float8_e4m3fn":
      raise ValueError(
        "tensor_scale is the NVFP4 scheme: it needs "
        "scale_format='float8_e4m3fn'"
      )

  def block_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Block extents per axis for a tensor of `shape`.

    Raises:
      ValueError: an axis is out of range, or a block size does not divide
        its axis and `ragged` is False.
    """
    rank = len(shape)
    axes = []
    for a in self.axes:
      if not -rank <= a < rank:
        raise ValueError(f"scaling axis {a} is out of range for shape {shape}")
      axes.append(a % rank)
    if len(set(axes)) != len(axes):
      raise ValueError(
        f"scaling axes {self.axes} name the same axis of shape {shape}"
      )
    if self.mode == "tensor":
      return tuple(shape)
    if self.mode == "channel":
      return tuple(1 if i == axes[0] else n for i, n in enumerate(shape))
    block = [1] * rank
    for a, size in zip(axes, self.sizes, strict=True):
      if shape[a] % size and not self.ragged:
        raise ValueError(
          f"block size {size} does not divide axis {a} of shape {shape}; "
          "pick a divisor or set ragged=True (the last block is shorter)"
        )
      block[a] = size
    return tuple(block)

  def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(
      math.ceil(n / b) if n else 0
      for n, b in zip(shape, self.block_shape(shape), strict=True)
    )

  def scale_bits(self) -> int:
    return {"float32": 32, "e8m0": 8, "float8_e4m3fn": 8}.get(
      self.scale_format, 16
    )

  def scale_dtype(self) -> np.dtype:
    """How a scale is stored: its float dtype, or uint8 codes."""
    if self.scale_format in ("e8m0", "float8_e4m3fn"):
      return np.dtype(np.uint8)
    return np.dtype(self.scale_format)

  def spec(self) -> str:
    if self.mode == "tensor":
      s = "tensor"
    elif self.mode == "channel":
      s = f"channel{self.axes[0]}"
    else:
      pairs = zip(self.sizes, self.axes, strict=True)
      s = "block" + "x".join(f"{n}@{a}" for n, a in pairs)
    s += f"_{self.scale_format}"
    s += "_zp" * self.zero_point + "_ts" * self.tensor_scale
    s += "_midmax" * (self.scale_rule == "midmax")
    return s + "_ragged" * self.ragged

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_config(cls, config) -> "Scaling":
    """From a mapping of some fields ({'mode': 'block', 'axes': [0],
    'sizes': [128]}); the others take their defaults.

    Raises:
      ValueError: an unknown field (listing the valid ones).
    """
    d = dict(config)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(valid))
    if unknown:
      raise ValueError(
        f"scaling has no field {unknown}; valid: {', '.join(valid)}"
      )
    d["axes"] = tuple(d.get("axes", (-1,)))
    d["sizes"] = tuple(d.get("sizes", ()))
    return cls(**d)

  @classmethod
  def from_dict(cls, d: dict) -> "Scaling":
    d = dict(d)
    d["axes"] = tuple(d["axes"])
    d["sizes"] = tuple(d["sizes"])
    return cls(**d)


def per_tensor(scale_format: str = "float32") -> Scaling:
  return Scaling("tensor", (), (), scale_format)


def per_channel(
  axis: int = -1, scale_format: str = "float32", *, zero_point: bool = False
) -> Scaling:
  return Scaling("channel", (axis,), (), scale_format, zero_point=zero_point)


def per_block(
  size: int,
  axis: int = 0,
  scale_format: str = "float32",
  *,
  zero_point: bool = False,
  ragged: bool = False,
) -> Scaling:
  """Blocks of `size` along `axis` (0 = a Dense kernel's input axis)."""
  return Scaling(
    "block",
    (axis,),
    (size,),
    scale_format,
    zero_point=zero_point,
    ragged=ragged,
  )
