"""Shared pieces of the experiment configs (big_vision style).

Every experiment config has the same fields:
  model, method     'rtn', 'gptq', 'magr+gptq', 'pipe', 'ed', 'qaf', ...
                    (a '+'-joined method name, qjax.methods.names).
  bits, zero_point  the grid: intN (symmetric) or, with zero_point, uintN
                    (asymmetric min-max); `format` overrides both ('nf4',
                    'mxfp4', 'nvfp4', 'e2m3', ...).
  block, block_axis, scale_format, clip_ratios, ragged
                    scale sharing; block 0 = one scale per output channel.
  rtn, gptq, magr, cd, pipe, ed, gpfq, qaf, ftq
                    each method's own knobs, nested (config.gptq.damp,
                    config.magr.alpha); 0 / -1 where marked means "the
                    authors' default for this grid" (experiments.run_lib).
  recipe            None, or {'rules': [...]} to override all of the above
                    (qjax.Recipe.from_config).
  act               activation quantization (qjax.activations), off while
                    act.format is '': act.format / granularity /
                    block_size / static / observer / percentile / rotate
                    for the model's layer inputs (act.pattern, '' = the
                    task's linear layers), act.kv_format for an LM's KV
                    cache, act.calib_batches for static scales, and
                    act.weights_see: calibrated weight methods run their
                    forward passes under the rules (qjax.quantize's
                    `activations`).
  act_recipe        None, or {'rules': [...]} overriding act's rule
                    (qjax.activations.ActRecipe.from_config).
  resume            record calibrated blocks in workdir/resume and go on
                    from them after a kill (qjax.io.resume).
  hadamard, smoothquant
                    the pre-transforms' knobs ('hadamard+gptq',
                    'smoothquant+rtn', ... in `method`).
  name              '' = derived from the fields when the run starts, so
                    every override renames the run.

`get_config(arg)` of each model config takes 'key=value,key=value': a key
is a field path ('gptq.damp=0.02', 'bits=3') or one of the short names in
ALIASES ('act_order=true' sets gptq.act_order), typed like the field.
--config.<path>=value on the command line sets the same fields, so
':method=rtn' and '--config.method=rtn' give the same run.
"""

import ml_collections

# Short names for the nested fields (what the README's commands use).
ALIASES = {
  "act_order": ("gptq.act_order",),
  "damp": ("gptq.damp",),
  "magr_statistics": ("magr.statistics",),
  "shrink": ("magr.shrink",),
  "cd_sweeps": ("cd.sweeps",),
  "order": ("pipe.order",),
  "keep": ("pipe.keep",),
  "adjust": ("ed.adjust",),
  "gpfq_scales": ("gpfq.scales",),
  "rate": ("qaf.rate", "ftq.rate"),
  "qaf_sweeps": ("qaf.sweeps",),
  "qaf_inner": ("qaf.inner",),
  "windows": ("eval.windows",),
  "window": ("eval.window", "calib.window"),
  "text": ("eval.text",),
  "calib_windows": ("calib.windows",),
  "sentences": ("eval.sentences",),
  "calib_sentences": ("calib.sentences",),
  "crops_per_photo": ("eval.crops_per_photo",),
  "calib_images": ("calib.images",),
  "act": ("act.format",),
  "kv": ("act.kv_format",),
  "alpha": ("smoothquant.alpha",),
}


def base_config(model: str) -> ml_collections.ConfigDict:
  """The fields every experiment has (module docstring)."""
  c = ml_collections.ConfigDict()
  c.model = model
  c.name = ""
  c.method = "rtn"
  c.bits = 4
  c.zero_point = False
  c.format = ""  # '' = intN / uintN from bits and zero_point
  c.block = 128  # 0: one scale per output channel
  # Blocks run along the input (contraction) axis: -2 of a Dense kernel
  # [in, out] and of a conv kernel [kh, kw, in, out].
  c.block_axis = -2
  # The main rule's parameter-path regex (a converted safetensors file in
  # its raw [out, in] layout needs e.g. pattern='weight$', block_axis=-1).
  c.pattern = "kernel"
  c.scale_format = "float32"
  c.clip_ratios = ()
  c.ragged = True  # a short last block where the block does not divide
  c.layers = 0  # 0: the whole model; >0: a slice for tests
  # Kernels a calibrated method cannot see (a CNN's 3x3 and depthwise convs)
  # take RTN on the same grid ahead of the main rule ('' = none).
  c.rtn_pattern = ""
  # Kernels qaf / ftq factorize (a model config narrows it).
  c.factor_pattern = "kernel"
  c.rtn = {"rounding": "nearest_even"}
  # Act-order is on for SmolLM2 (its config's main job): over 5 disjoint
  # calibration sets at uint4 g128 it gave 8.43-8.74 perplexity, against
  # 10.18-10.83 without it (README). The other models keep the paper's off.
  c.gptq = {"block_size": 128, "damp": 0.01, "act_order": model == "smollm2"}
  # MagR: 0 = the authors' default for the grid (alpha 1e-3 per channel /
  # 1e-4 per group, 200 / 150 iterations, the quantizer's group, the grid
  # step shrunk by 0.8 / 0.9 / 1.0 at 2 / 3 / >= 4 bits).
  c.magr = {
    "alpha": 0.0,
    "iters": 0,
    "group_size": 0,
    "statistics": "hessian",
    "shrink": 0.0,
  }
  # Coordinate descent after GPTQ in 'magr+gptq' (-1: 30 sweeps at 2
  # bits, else 1, the authors' default).
  c.cd = {"sweeps": -1, "damp": 0.75}
  c.pipe = {"order": 2, "keep": 1.0, "rank_by": "residual"}
  c.ed = {"adjust": "lstsq"}
  c.gpfq = {"scales": "weights"}
  # QAF's sweep and ADMM-step caps: the authors' are 5000 and 1000; ours are
  # what 2 cores afford (docs/qaf.md).
  c.qaf = {"rate": 2.0, "sweeps": 20, "inner": 60}
  c.ftq = {"rate": 2.0}
  c.hadamard = {"block": 0, "seed": 0}  # 0: the layer's width
  c.smoothquant = {"alpha": 0.5}  # the paper's default, Eq. (4)
  c.recipe = None
  c.act = {
    "format": "",  # '' = float activations
    "granularity": "token",  # 'tensor' | 'token' | 'block'
    "block_size": 0,  # 'block' granularity only
    "static": False,  # False: scales computed on the fly
    "observer": "minmax",  # static scales: 'minmax' | 'percentile' | 'mse'
    "percentile": 99.99,
    "rotate": -1,  # -1: none; 0: Hadamard of the input's width; b: blocks
    "pattern": "",  # '' = the task's act_pattern
    "kv_format": "",  # an LM's keys and values, per token along the head dim
    "calib_batches": 4,  # calibration batches for static scales
    "weights_see": False,  # weight calibration under the activation rules
  }
  c.act_recipe = None
  # Record each calibrated block in workdir/resume and, when that directory
  # holds blocks of this run, go on after the last one (qjax.io.resume;
  # GPTQ's sequential mode and ED/GPFQ's two streams). Deleted once the run
  # has finished.
  c.resume = False
  c.save_checkpoint = True
  return c


def _parse(value: str, like):
  if isinstance(like, bool):
    if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
      raise ValueError(f"{value!r} is not a boolean")
    return value.lower() in ("1", "true", "yes")
  if isinstance(like, tuple):
    return tuple(float(v) for v in value.split("/") if v)
  if isinstance(like, int):
    return int(value)
  if isinstance(like, float):
    return float(value)
  return value


def _field_paths(c, prefix="") -> list[str]:
  out = []
  for key, value in c.items():
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      out += _field_paths(value, path + ".")
    else:
      out.append(path)
  return out


def set_field(c: ml_collections.ConfigDict, path: str, value: str) -> None:
  """Sets the field at dotted `path` from a string, typed like its value."""
  *parents, last = path.split(".")
  node = c
  for p in parents:
    node = node[p]
  like = node[last]
  node[last] = value if like is None else _parse(value, like)


def apply_arg(c: ml_collections.ConfigDict, arg: str | None):
  """Applies 'key=value,...' (field paths or ALIASES) to `c`; returns c.

  Raises:
    ValueError: an item that is not key=value, or an unknown key (listing
      the valid ones).
  """
  if not arg:
    return c
  paths = _field_paths(c)
  for item in arg.split(","):
    if "=" not in item:
      raise ValueError(f"config argument {item!r} is not key=value")
    key, value = item.split("=", 1)
    targets = ALIASES.get(key, (key,))
    if not all(t in paths for t in targets):
      raise ValueError(
        f"unknown config argument {key!r}; choices: "
        + ", ".join(
          sorted(
            set(paths)
            | {a for a in ALIASES if all(t in paths for t in ALIASES[a])}
          )
        )
      )
    for t in targets:
      set_field(c, t, value)
  return c
