"""Recipe: ordered rules from a parameter-path regex to a method and format.

Paths are the '/'-joined keys of a parameter tree
('encoder/layer_0/attention/query/kernel'). The first rule whose pattern
`re.search`es a path decides it. Leaves no rule matches pass through
unchanged. By default rank-0/1 leaves (biases, norm scales) and leaves whose
path mentions 'embed', 'norm' or 'bias' are skipped, unless the deciding
rule's own pattern names that word.

A rule's method is a chain of method objects (qjax.methods): built from an
object, a chain, or a name with options, and checked when the rule is built
(unknown options, options out of range, a format the method cannot use), so
a typo fails before any calibration runs.

A Recipe is frozen and hashable, so an equal recipe never recompiles.
"""

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from qjax import paths
from qjax.formats import names as format_names
from qjax.formats.scaling import Scaling, per_channel, per_tensor
from qjax.methods import base, names

NAN_POLICIES = ("raise", "zero")
DEFAULT_SKIP_WORDS = ("embed", "norm", "bias")
SKIP = "skip"


@dataclasses.dataclass(frozen=True)
class Rule:
  """One rule of a recipe.

  Attributes:
    pattern: regex searched in the '/'-joined parameter path.
    method: a qjax.methods.Chain, or None for a rule that skips what it
      matches.
    fmt: element format (None for a skip rule).
    scaling: scale sharing (None for a skip rule).
    nan_policy: 'raise' (NaN/Inf weights are an error naming the path) or
      'zero' (they are replaced by 0 before quantizing).
  """

  pattern: str
  method: base.Chain | None
  fmt: Any = None
  scaling: Scaling | None = None
  nan_policy: str = "raise"

  def __post_init__(self):
    if self.nan_policy not in NAN_POLICIES:
      raise ValueError(
        f"rule {self.pattern!r}: nan_policy must be one of {NAN_POLICIES}"
      )
    paths.check_regex(self.pattern)
    if self.method is None:
      return
    if not isinstance(self.method, base.Chain):
      raise ValueError(
        f"rule {self.pattern!r}: method must be a qjax.chain(...); use "
        "qjax.rule() to build one from a method object or name"
      )
    if self.fmt is None or self.scaling is None:
      raise ValueError(f"rule {self.pattern!r} needs a format and a scaling")
    try:
      self.method.check(self.fmt, self.scaling)
    except ValueError as e:
      raise ValueError(f"rule {self.pattern!r}: {e}") from e

  @property
  def skips(self) -> bool:
    return self.method is None

  @property
  def needs(self) -> frozenset:
    return frozenset() if self.method is None else self.method.needs

  @property
  def method_name(self) -> str:
    return SKIP if self.method is None else self.method.name

  def names_default_skip(self, word: str) -> bool:
    return word in self.pattern.lower()


def as_chain(method, options: Mapping | None = None) -> base.Chain | None:
  """A rule's method from a name (with options), a method object or a chain;
  None for 'skip'."""
  options = dict(options or {})
  if isinstance(method, str):
    if method == SKIP:
      if options:
        raise ValueError(f"a skip rule takes no options; got {sorted(options)}")
      return None
    return names.from_name(method, options)
  if options:
    raise ValueError(
      f"options {sorted(options)} go into the method object itself (e.g. "
      f"GPTQ(act_order=True)), not next to {type(method).__name__}"
    )
  return base.chain(method)


def rule(
  pattern: str,
  fmt: Any = None,
  scaling: Scaling | None = None,
  *,
  method: Any = "rtn",
  axis: int = -2,
  ragged: bool | None = None,
  nan_policy: str = "raise",
  **options,
) -> Rule:
  """Builds a Rule.

  Args:
    pattern: regex over '/'-joined parameter paths.
    fmt: a format name ('int4', 'e2m1', 'nf4'), a block format name
      ('mxfp4', 'nvfp4', 'mxfp6e2', 'bfp16', ... blocked along `axis`) or a
      format object.
    scaling: how scales are shared (qjax.formats.per_channel, per_block,
      ...). Default: per output channel (the last axis), or per tensor for
      QAF/FTQ; block formats fix their own.
    method: a method object (qjax.GPTQ(), ...), a qjax.chain(...), a name
      ('gptq', 'magr+gptq+cd', 'pipe', see qjax.methods.names) or 'skip'.
    axis: the axis blocks of a block format run along: the contraction
      axis, -2 of a Flax Dense kernel [in, out] and of an HWIO conv kernel
      [h, w, in, out]; -1 for the raw [out, in] layout of PyTorch,
      safetensors and GGUF sources.
    ragged: for block scalings, whether a block size that does not divide
      its axis leaves a short last block (None: the scaling's own setting).
    nan_policy: 'raise' or 'zero'.
    **options: the named method's options (flat for one name, per stage
      for several: magr={'alpha': 1e-4}).

  Raises:
    ValueError: an unknown method, option or format (listing the valid
      ones), or a format/scaling the method cannot use.
  """
  chain = as_chain(method, options)
  if chain is None:
    return Rule(pattern, None, nan_policy=nan_policy)
  if format_names.is_block_format(fmt):
    if scaling is not None:
      raise ValueError(f"{fmt!r} fixes its own scaling; do not pass one")
    fmt, scaling = format_names.block_format(fmt, axis)
  elif fmt is not None:
    fmt = format_names.get(fmt)
  if fmt is not None and scaling is None:
    per_tensor_only = chain.default_scaling == "tensor"
    scaling = per_tensor() if per_tensor_only else per_channel(-1)
  if ragged is not None and scaling is not None:
    if scaling.mode != "block":
      raise ValueError(
        f"rule {pattern!r}: ragged applies to block scalings, not "
        f"{scaling.spec()!r}"
      )
    scaling = dataclasses.replace(scaling, ragged=bool(ragged))
  return Rule(pattern, chain, fmt, scaling, nan_policy)


@dataclasses.dataclass(frozen=True)
class Recipe:
  rules: tuple[Rule, ...]
  skip_defaults: bool = True

  def __post_init__(self):
    object.__setattr__(self, "rules", tuple(self.rules))

  @property
  def needs(self) -> frozenset:
    """The statistics (qjax.methods.STATISTICS) any rule needs."""
    return frozenset().union(*(r.needs for r in self.rules))

  @property
  def needs_calibration(self) -> bool:
    return bool(self.needs)

  @property
  def needs_two_streams(self) -> bool:
    """Whether a rule needs the float and the quantized stream (ED)."""
    return "two_stream" in self.needs

  @property
  def needs_last_sample(self) -> bool:
    """Whether a rule runs MagR on the last calibration sample's Gram."""
    return "last_sample" in self.needs

  def match(
    self, path: str, ndim: int, size: int | None = None
  ) -> tuple[int | None, str]:
    """(index of the deciding rule or None, reason) for one leaf of rank
    `ndim` (and `size` elements, when known: a zero-size leaf has nothing
    to quantize and stays as it is)."""
    if size == 0:
      return None, "zero-size: nothing to quantize"
    for i, r in enumerate(self.rules):
      if not re.search(r.pattern, path):
        continue
      if r.skips:
        return None, f"skipped by rule {i} {r.pattern!r}"
      if self.skip_defaults:
        if ndim < 2 and not any(map(r.names_default_skip, DEFAULT_SKIP_WORDS)):
          return None, f"rank {ndim}: skipped by default"
        for word in DEFAULT_SKIP_WORDS:
          if word in path.lower() and not r.names_default_skip(word):
            return None, f"'{word}' leaves are skipped by default"
      return i, f"rule {i} {r.pattern!r} ({r.method_name})"
    return None, "no rule matched"

  def unused(self, used) -> list[str]:
    """'index: pattern' of the quantizing rules whose index is not in used."""
    return [
      f"{i}: {r.pattern!r}"
      for i, r in enumerate(self.rules)
      if i not in used and not r.skips
    ]

  @classmethod
  def from_config(cls, config: Mapping) -> "Recipe":
    """From a mapping (e.g. an ml_collections ConfigDict):

    {'rules': [{'pattern': 'kernel', 'format': 'int4', 'method': 'gptq',
                'scaling': {'mode': 'block', 'axes': [0], 'sizes': [128]},
                'options': {'act_order': True}}, ...],
     'skip_defaults': True}

    'options' are the method's (per stage for a '+'-joined method:
    {'magr': {'alpha': 1e-4}, 'gptq': {...}}).
    """
    if hasattr(config, "to_dict"):
      config = config.to_dict()
    rules = []
    for i, rc in enumerate(config["rules"]):
      rc = dict(rc)
      unknown = set(rc) - {
        "pattern",
        "format",
        "scaling",
        "method",
        "axis",
        "ragged",
        "nan_policy",
        "options",
      }
      if unknown:
        raise ValueError(f"recipe rule {i}: unknown keys {sorted(unknown)}")
      scaling = rc.get("scaling")
      if isinstance(scaling, Mapping):
        scaling = Scaling.from_config(scaling)
      rules.append(
        rule(
          rc["pattern"],
          rc.get("format"),
          scaling,
          method=rc.get("method", "rtn"),
          axis=rc.get("axis", -2),
          ragged=rc.get("ragged"),
          nan_policy=rc.get("nan_policy", "raise"),
          **dict(rc.get("options") or {}),
        )
      )
    return cls(tuple(rules), config.get("skip_defaults", True))
