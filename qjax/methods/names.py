"""Method names for configs and rules: 'gptq', 'magr+gptq+cd', 'pipe', ...

`from_name(name, options)` builds the chain a '+'-joined name stands for.
One name takes its options flat (`act_order=True`); several take them per
stage (`magr={'alpha': 1e-4}, gptq={'act_order': True}`). A name sequence
without a quantizer gets RTN in front of its first refinement ('pipe' is
RTN then Pipe, 'magr+pipe' MagR, RTN, Pipe), and a sequence of transforms
only gets RTN at the end ('magr' is MagR then RTN).
"""

from collections.abc import Mapping

from qjax.methods import base
from qjax.methods.data_free import RTN, Pipe
from qjax.methods.factorized import FTQ, QAF
from qjax.methods.hessian import GPTQ, CoordinateDescent, MagR
from qjax.methods.rotation import Hadamard
from qjax.methods.smoothing import SmoothQuant
from qjax.methods.two_stream import GPFQ, ErrorDiffusion

BY_NAME = {
  cls.name: cls
  for cls in (
    RTN,
    GPTQ,
    MagR,
    Hadamard,
    SmoothQuant,
    CoordinateDescent,
    Pipe,
    ErrorDiffusion,
    GPFQ,
    QAF,
    FTQ,
  )
}


def from_name(name: str, options: Mapping | None = None) -> base.Chain:
  """The chain `name` stands for, with `options` (see the module docstring).

  Raises:
    ValueError: an unknown stage name (listing the known ones), an option a
      stage does not have (listing its options), or stages out of order.
  """
  options = dict(options or {})
  parts = [p.strip() for p in name.split("+")]
  unknown = [p for p in parts if p not in BY_NAME]
  if unknown:
    raise ValueError(
      f"unknown method {name!r}; known stages: {', '.join(BY_NAME)} (joined "
      "by '+', e.g. 'magr+gptq+cd')"
    )
  if len(set(parts)) != len(parts):
    raise ValueError(f"method {name!r} repeats a stage")
  if len(parts) == 1:
    per_stage = {parts[0]: options}
  else:
    stray = sorted(k for k in options if k not in parts)
    if stray:
      raise ValueError(
        f"method {name!r} takes its options per stage ("
        + ", ".join(f"{p}={{...}}" for p in parts)
        + f"); got {', '.join(map(repr, stray))}"
      )
    per_stage = options
  stages = []
  for p in parts:
    opts = per_stage.get(p, {})
    if not isinstance(opts, Mapping):
      raise ValueError(f"method {name!r}: options of {p!r} must be a mapping")
    stages.append(base.build(BY_NAME[p], opts, where=f"method {name!r}"))
  kinds = [s.stage for s in stages]
  if "quantizer" not in kinds:
    at = kinds.index("refinement") if "refinement" in kinds else len(stages)
    stages.insert(at, RTN())
  return base.chain(*stages)
