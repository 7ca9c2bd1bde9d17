"""Recipe: ordered rules from a parameter-path regex to a method and format.

Paths are the '/'-joined keys of a parameter tree
('encoder/layer_0/attention/query/kernel'). The first rule whose pattern
`re.search`es a path decides it. Leaves no rule matches pass through
unchanged. By default rank-0/1 leaves (biases, norm scales) and leaves whose
path mentions 'embed', 'norm' or 'bias' are skipped, unless the deciding
rule's own pattern names that word.

A Recipe is frozen and hashable, so an equal recipe never recompiles.
"""

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from qjax.formats import presets
from qjax.formats.scaling import Scaling, per_tensor

METHODS = (
  "rtn",
  "gptq",
  "magr+rtn",
  "magr+gptq",
  "pipe",
  "magr+pipe",
  "gptq+pipe",
  "ed",
  "gpfq",
  "qaf",
  "ftq",
  "skip",
)
# CP factorization (qjax.transforms.cp_layers): QAF, or factorize-then-
# quantize; each factor has one scale (per-tensor), the authors' grid.
FACTORIZED = ("qaf", "ftq")
# Error Diffusion and GPFQ need both activation streams (qjax.diffusion).
TWO_STREAM = ("ed", "gpfq")
CALIBRATED = (
  "gptq",
  "magr+rtn",
  "magr+gptq",
  "magr+pipe",
  "gptq+pipe",
  *TWO_STREAM,
)
NAN_POLICIES = ("raise", "zero")
DEFAULT_SKIP_WORDS = ("embed", "norm", "bias")


@dataclasses.dataclass(frozen=True)
class Rule:
  """One rule of a recipe.

  Attributes:
    pattern: regex searched in the '/'-joined parameter path.
    method: 'rtn', 'gptq', 'magr+rtn', 'magr+gptq', 'pipe' (data-free
      residual expansion, qjax.transforms.residual), 'magr+pipe',
      'gptq+pipe' (GPTQ gives the first order; all but rtn and pipe need
      calibration statistics), 'qaf' / 'ftq' (a CPKernel: QAF or
      factorize-then-quantize, qjax.transforms.cp_layers; option `rate`
      required, the rest go to factorize.cp_quantized; the scaling must be
      per-tensor, the default for these) or 'skip'. Options named pipe_*
      (pipe_order, pipe_keep, pipe_rank_by) go to the expansion; magr_*
      (magr_alpha, magr_iters, magr_group_size, magr_projection,
      magr_statistics = 'hessian' | 'last_sample') go to MagR; cd_*
      (cd_sweeps, cd_damp) to the coordinate-descent refinement after GPTQ;
      the rest (e.g. shrink, act_order, clip_ratios) to the quantizer.
    fmt: element format (None for 'skip').
    scaling: scale sharing (None for 'skip').
    options: extra keyword arguments of the method, as sorted (name, value)
      pairs, e.g. (('clip_ratios', (1.0, 0.9, 0.8)),).
    nan_policy: 'raise' (NaN/Inf weights are an error naming the path) or
      'zero' (they are replaced by 0 before quantizing).
  """

  pattern: str
  method: str = "rtn"
  fmt: Any = None
  scaling: Scaling | None = None
  options: tuple[tuple[str, Any], ...] = ()
  nan_policy: str = "raise"

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(
        f"rule {self.pattern!r}: unknown method {self.method!r}; known: "
        f"{', '.join(METHODS)}"
      )
    if self.nan_policy not in NAN_POLICIES:
      raise ValueError(
        f"rule {self.pattern!r}: nan_policy must be one of {NAN_POLICIES}"
      )
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(
        f"rule pattern {self.pattern!r} is not a regex: {e}"
      ) from e
    if self.method != "skip" and (self.fmt is None or self.scaling is None):
      raise ValueError(f"rule {self.pattern!r} needs a format and a scaling")
    if self.method in FACTORIZED:
      if self.scaling.spec() != per_tensor().spec():
        raise ValueError(
          f"rule {self.pattern!r}: method {self.method!r} puts one scale on "
          f"each CP factor; scaling must be per-tensor, not "
          f"{self.scaling.spec()!r}"
        )
      if "rate" not in dict(self.options):
        raise ValueError(
          f"rule {self.pattern!r}: method {self.method!r} needs the option "
          "rate (the compression rate)"
        )
    object.__setattr__(self, "options", tuple(sorted(self.options)))

  def names_default_skip(self, word: str) -> bool:
    return word in self.pattern.lower()


def rule(
  pattern: str,
  fmt: Any = None,
  scaling: Scaling | None = None,
  *,
  method: str = "rtn",
  axis: int = 0,
  nan_policy: str = "raise",
  **options,
) -> Rule:
  """Builds a Rule; `fmt` may be a name, a block format name ('mxfp4',
  'nvfp4', ... blocked along `axis`) or a format object."""
  if method in FACTORIZED and scaling is None:
    scaling = per_tensor()
  if presets.is_block_format(fmt):
    if scaling is not None:
      raise ValueError(f"{fmt!r} fixes its own scaling; do not pass one")
    fmt, scaling = presets.block_format(fmt, axis)
  elif fmt is not None:
    fmt = presets.get(fmt)
  options = {
    k: tuple(v) if isinstance(v, list) else v for k, v in options.items()
  }
  return Rule(pattern, method, fmt, scaling, tuple(options.items()), nan_policy)


@dataclasses.dataclass(frozen=True)
class Recipe:
  rules: tuple[Rule, ...]
  skip_defaults: bool = True

  def __post_init__(self):
    object.__setattr__(self, "rules", tuple(self.rules))

  @property
  def needs_calibration(self) -> bool:
    return any(r.method in CALIBRATED for r in self.rules)

  @property
  def needs_two_streams(self) -> bool:
    """Whether a rule needs the float and the quantized stream (ED)."""
    return any(r.method in TWO_STREAM for r in self.rules)

  @property
  def needs_last_sample(self) -> bool:
    """Whether a rule runs MagR on the last calibration sample's Gram."""
    return any(
      dict(r.options).get("magr_statistics") == "last_sample"
      for r in self.rules
    )

  def match(self, path: str, ndim: int) -> tuple[int | None, str]:
    """(index of the deciding rule or None, reason) for one leaf."""
    for i, r in enumerate(self.rules):
      if not re.search(r.pattern, path):
        continue
      if r.method == "skip":
        return None, f"skipped by rule {i} {r.pattern!r}"
      if self.skip_defaults:
        if ndim < 2 and not any(map(r.names_default_skip, DEFAULT_SKIP_WORDS)):
          return None, f"rank {ndim}: skipped by default"
        for word in DEFAULT_SKIP_WORDS:
          if word in path.lower() and not r.names_default_skip(word):
            return None, f"'{word}' leaves are skipped by default"
      return i, f"rule {i} {r.pattern!r}"
    return None, "no rule matched"

  @classmethod
  def from_config(cls, config: Mapping) -> "Recipe":
    """From a mapping (e.g. an ml_collections ConfigDict):

    {'rules': [{'pattern': 'kernel', 'format': 'int4',
                'scaling': {'mode': 'block', 'axes': [0], 'sizes': [128]},
                'options': {'clip_ratios': [1.0, 0.9]}}, ...],
     'skip_defaults': True}
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
        "nan_policy",
        "options",
      }
      if unknown:
        raise ValueError(f"recipe rule {i}: unknown keys {sorted(unknown)}")
      scaling = rc.get("scaling")
      if isinstance(scaling, Mapping):
        scaling = dict(scaling)
        scaling["axes"] = tuple(scaling.get("axes", (-1,)))
        scaling["sizes"] = tuple(scaling.get("sizes", ()))
        scaling = Scaling(**scaling)
      rules.append(
        rule(
          rc["pattern"],
          rc.get("format"),
          scaling,
          method=rc.get("method", "rtn"),
          axis=rc.get("axis", 0),
          nan_policy=rc.get("nan_policy", "raise"),
          **dict(rc.get("options", {})),
        )
      )
    return cls(tuple(rules), config.get("skip_defaults", True))
