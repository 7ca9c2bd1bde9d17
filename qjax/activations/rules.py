"""Activation rules: which layer inputs are quantized, and how.

A rule's pattern is `re.search`ed in a layer's '/'-joined path (the path of
the module, 'layer_3/mlp/down', not of its kernel); the first matching rule
decides, and a rule with quant None leaves that input in float. Layers no
rule matches stay float. KV caches are quantized by rules that match a
qjax.activations.Tap placed where the cache is written (SmolLM2's
'layer_i/k_cache' and 'layer_i/v_cache').
"""

import dataclasses
import re

from qjax import paths
from qjax.activations import quantizer

SKIP = "skip"


@dataclasses.dataclass(frozen=True)
class ActRule:
  """pattern -> ActQuant (None: leave the matched inputs in float)."""

  pattern: str
  quant: quantizer.ActQuant | None

  def __post_init__(self):
    paths.check_regex(self.pattern, "activation rule pattern")


def act_rule(pattern: str, fmt="int8", granularity="token", **kw) -> ActRule:
  """ActRule(pattern, act_quant(fmt, granularity, **kw)); fmt 'skip' or
  None leaves the matched inputs in float."""
  if fmt is None or fmt == SKIP:
    if kw:
      raise ValueError(f"a skip rule takes no options; got {sorted(kw)}")
    return ActRule(pattern, None)
  return ActRule(pattern, quantizer.act_quant(fmt, granularity, **kw))


@dataclasses.dataclass(frozen=True)
class ActRecipe:
  """Ordered activation rules (first match wins); hashable."""

  rules: tuple[ActRule, ...]

  def __post_init__(self):
    rules = tuple(self.rules)
    for r in rules:
      if not isinstance(r, ActRule):
        raise ValueError(
          f"an ActRecipe holds ActRules (qjax.activations.act_rule), got {r!r}"
        )
    object.__setattr__(self, "rules", rules)

  def match(self, path: str) -> quantizer.ActQuant | None:
    for r in self.rules:
      if re.search(r.pattern, path):
        return r.quant
    return None

  @property
  def static(self) -> bool:
    """Whether any rule needs calibrated scales."""
    return any(r.quant is not None and r.quant.static for r in self.rules)

  @classmethod
  def from_config(cls, config) -> "ActRecipe":
    """From [{'pattern': ..., 'format': 'int8', 'granularity': 'token',
    'static': False, 'observer': 'minmax', ...}, ...] (a list of mappings,
    e.g. an ml_collections ConfigDict's rules)."""
    if hasattr(config, "to_dict"):
      config = config.to_dict()
    if isinstance(config, dict):
      config = config.get("rules", [])
    rules = []
    for i, rc in enumerate(config):
      rc = dict(rc)
      unknown = set(rc) - {
        "pattern",
        "format",
        "granularity",
        "block_size",
        "scale_format",
        "static",
        "observer",
        "percentile",
        "rotate",
        "rotate_seed",
      }
      if unknown:
        raise ValueError(f"activation rule {i}: unknown keys {sorted(unknown)}")
      pattern = rc.pop("pattern")
      fmt = rc.pop("format", "int8")
      granularity = rc.pop("granularity", "token")
      rules.append(act_rule(pattern, fmt, granularity, **rc))
    return cls(tuple(rules))


def recipe(*rules: ActRule) -> ActRecipe:
  """ActRecipe(rules)."""
  return ActRecipe(tuple(rules))
