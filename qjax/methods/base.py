"""The method protocol: every method is a small frozen object of one of three
stages, and a rule's method is a chain of them.

  Transform   w -> w'                   (MagR, Hadamard; runs before the
                                          quantizer; a change of basis also
                                          maps the statistics and wraps the
                                          result: transform_stats, wrap)
  Quantizer   w -> quantized leaf        (RTN, GPTQ, ErrorDiffusion, GPFQ,
                                          QAF, FTQ)
  Refinement  quantized leaf -> leaf     (CoordinateDescent, Pipe)

`chain(*stages)` composes them in that order: any transforms, one
quantizer, any refinements, e.g. chain(MagR(), GPTQ(), CoordinateDescent()).
A method declares the statistics it needs (`needs`, a subset of
STATISTICS); the chain needs their union, and qjax.quantize picks the
calibration driver that provides them. Every stage gets the same `Stats`.

A user-defined method is a frozen dataclass subclassing one of the three
bases (see tests/methods/user_method_test.py); nothing in qjax changes:

  @dataclasses.dataclass(frozen=True)
  class SignTernary(qjax.Quantizer):
    threshold: float = 0.5
    def quantize(self, w, fmt, scaling, stats):
      ...  # return a QTensor (or a Result)

Static and hashable: methods are jit static arguments and recipe data, so an
equal method never recompiles.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import jax

STAGES = ("transform", "quantizer", "refinement")
# 'hessian'      H = (2/n) X^T X of the layer's inputs [in, in] (GPTQ's
#                sequential mode: inputs from the already-quantized model).
# 'last_sample'  the same from the last calibration sample only (MagR's
#                authors' statistics).
# 'two_stream'   G = X~^T X~ and C = X~^T X of the quantized (X~) and float
#                (X) streams, with their means (Error Diffusion, GPFQ).
# 'input_absmax' max |X_j| per input column over the calibration set
#                (SmoothQuant), collected with 'hessian'.
STATISTICS = ("hessian", "last_sample", "two_stream", "input_absmax")


class Stats(NamedTuple):
  """What a method may read besides the weight (None where not collected).

  hessian      [in, in] float32 (2/n) X^T X ('hessian').
  last_sample  [in, in] float32, the last calibration sample's H.
  g, c         [in, in] float32 X~^T X~ and X~^T X ('two_stream').
  mean_x       [in] mean float-stream input; mean_xq the quantized one's.
  rows         number of calibration rows behind g and c.
  input_absmax [in] max |X_j| per input column ('input_absmax').
  bias         [out] the layer's float bias, where it has one.
  key          this leaf's jax.random key (stochastic rounding), or None.
  """

  hessian: jax.Array | None = None
  last_sample: jax.Array | None = None
  g: jax.Array | None = None
  c: jax.Array | None = None
  mean_x: jax.Array | None = None
  mean_xq: jax.Array | None = None
  rows: Any = None
  bias: jax.Array | None = None
  key: jax.Array | None = None
  input_absmax: jax.Array | None = None

  def available(self) -> frozenset:
    """The STATISTICS these stats hold."""
    have = set()
    if self.hessian is not None:
      have.add("hessian")
    if self.last_sample is not None:
      have.add("last_sample")
    if self.g is not None and self.c is not None:
      have.add("two_stream")
    if self.input_absmax is not None:
      have.add("input_absmax")
    return frozenset(have)


class Result(NamedTuple):
  """What a quantizer or refinement returns.

  leaf  the quantized leaf (QTensor or a qtensor.CompositeLeaf).
  info  the method's diagnostics (e.g. GPTQInfo), or None.
  bias  [out] a new bias for the layer (Error Diffusion's bias step), or
        None to keep it.
  """

  leaf: Any
  info: Any = None
  bias: jax.Array | None = None


def as_result(out) -> Result:
  return out if isinstance(out, Result) else Result(out)


class Method:
  """Base of every method. Subclasses are frozen dataclasses whose fields are
  the method's options, and set `stage` (one of STAGES) and `needs`."""

  stage: ClassVar[str] = ""
  needs: ClassVar[frozenset] = frozenset()
  # Its name in recipes and logs ('' = the class name, lower case).
  name: ClassVar[str] = ""
  # The scaling a rule gives it when none is named: 'channel' (one scale
  # per output channel) or 'tensor'.
  default_scaling: ClassVar[str] = "channel"

  @classmethod
  def options(cls) -> tuple[str, ...]:
    """The option names (dataclass fields)."""
    return tuple(f.name for f in dataclasses.fields(cls))

  def check(self, fmt, scaling) -> None:
    """Raises ValueError when this method cannot use fmt/scaling (called when
    a rule is built, before any data is seen)."""


class Transform(Method):
  stage = "transform"

  def transform(self, w: jax.Array, stats: Stats) -> jax.Array:
    """w [..] -> w' of the same shape and dtype."""
    raise NotImplementedError

  def transform_stats(self, stats: Stats, w: jax.Array) -> Stats:
    """The statistics of the inputs that meet w' (later stages see these),
    given the weight w this transform received. A transform that keeps the
    inputs (MagR) keeps them as they are."""
    del w
    return stats

  def wrap(self, result: Result, w: jax.Array, stats: Stats) -> Result:
    """The quantized w' -> a leaf in the original basis (called after the
    quantizer and refinements, last transform first, with the weight and
    statistics this transform received). Default: as it is."""
    del w, stats
    return result


class Quantizer(Method):
  stage = "quantizer"

  def quantize(self, w: jax.Array, fmt, scaling, stats: Stats):
    """w -> a quantized leaf of w's shape, or a Result."""
    raise NotImplementedError


class Refinement(Method):
  stage = "refinement"

  def refine(
    self, result: Result, *, original, weight, fmt, scaling, stats: Stats
  ):
    """The quantizer's result -> a better leaf or Result. `original` is the
    weight as given, `weight` the one the quantizer saw (after transforms).
    """
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Chain:
  """Stages run in order: transforms, one quantizer, refinements."""

  stages: tuple[Method, ...]

  @property
  def needs(self) -> frozenset:
    return frozenset().union(*(s.needs for s in self.stages))

  @property
  def name(self) -> str:
    return "+".join(method_name(s) for s in self.stages)

  @property
  def default_scaling(self) -> str:
    kinds = {s.default_scaling for s in self.stages}
    return "tensor" if "tensor" in kinds else "channel"

  def check(self, fmt, scaling) -> None:
    for s in self.stages:
      s.check(fmt, scaling)

  def __call__(self, w, fmt, scaling, stats: Stats) -> Result:
    weight = w
    result = None
    transforms = []
    for s in self.stages:
      if s.stage == "transform":
        transforms.append((s, weight, stats))
        weight, stats = (
          s.transform(weight, stats),
          s.transform_stats(stats, weight),
        )
      elif s.stage == "quantizer":
        result = as_result(s.quantize(weight, fmt, scaling, stats))
      else:
        refined = as_result(
          s.refine(
            result,
            original=w,
            weight=weight,
            fmt=fmt,
            scaling=scaling,
            stats=stats,
          )
        )
        # A refinement that says nothing of the bias keeps the quantizer's.
        bias = result.bias if refined.bias is None else refined.bias
        result = refined._replace(bias=bias)
    for s, w_in, stats_in in reversed(transforms):
      result = s.wrap(result, w_in, stats_in)
    return result


def method_name(m) -> str:
  return m.name or type(m).__name__.lower()


def chain(*stages) -> Chain:
  """Composes stages: any transforms, exactly one quantizer, any refinements.

  Raises:
    ValueError: a stage that is not a Method, stages out of order, or not
      exactly one quantizer.
  """
  flat = []
  for s in stages:
    flat.extend(s.stages if isinstance(s, Chain) else (s,))
  for s in flat:
    if not isinstance(s, Method) or s.stage not in STAGES:
      raise ValueError(
        f"{s!r} is not a method: subclass qjax.Transform, qjax.Quantizer or "
        "qjax.Refinement"
      )
    bad = set(s.needs) - set(STATISTICS)
    if bad:
      raise ValueError(
        f"{type(s).__name__} needs unknown statistics {sorted(bad)}; known: "
        f"{', '.join(STATISTICS)}"
      )
  order = [STAGES.index(s.stage) for s in flat]
  names = " -> ".join(f"{type(s).__name__}({s.stage})" for s in flat)
  if order != sorted(order):
    raise ValueError(
      f"stages must run transforms -> quantizer -> refinements; got {names}"
    )
  if order.count(1) != 1:
    raise ValueError(
      f"a method needs exactly one quantizer (e.g. chain(RTN(), Pipe(...)));"
      f" got {names or 'nothing'}"
    )
  return Chain(tuple(flat))


def build(cls: type, options: Mapping, where: str = "") -> Method:
  """cls(**options) with a clear error naming unknown or missing options."""
  valid = cls.options()
  unknown = sorted(set(options) - set(valid))
  prefix = f"{where}: " if where else ""
  if unknown:
    raise ValueError(
      f"{prefix}{cls.__name__} has no option {', '.join(map(repr, unknown))};"
      f" valid options: {', '.join(valid) or 'none'}"
    )
  required = [
    f.name
    for f in dataclasses.fields(cls)
    if f.default is dataclasses.MISSING
    and f.default_factory is dataclasses.MISSING
    and f.name not in options
  ]
  if required:
    raise ValueError(
      f"{prefix}{cls.__name__} needs the option(s) {', '.join(required)}"
    )
  return cls(**options)


def as_tuple(obj, name: str, kind=float) -> None:
  """Freezes a list option of a frozen dataclass into a tuple of `kind`."""
  object.__setattr__(obj, name, tuple(kind(v) for v in getattr(obj, name)))


def check_input_axis_blocks(scaling, method: str) -> None:
  """Raises ValueError unless blocks run along the input axis (0 or -2 of
  a Dense kernel [in, out]): methods that walk input rows need whole
  blocks of consecutive rows."""
  if scaling.mode == "block" and any(a % 2 != 0 for a in scaling.axes):
    raise ValueError(
      f"{method} blocks run along the input axis (0 or -2); got blocks "
      f"along {scaling.axes}"
    )


def one_of(value, choices, option: str, method: str) -> None:
  if value not in choices:
    raise ValueError(
      f"{method}: {option} must be one of {', '.join(map(repr, choices))}; "
      f"got {value!r}"
    )
