"""Shared pieces of the experiment configs (big_vision style).

A config is flat: `format`, `block`, `scale_format`, `clip_ratios`, ... The
recipe is built from those fields when the run starts (so command-line
overrides such as --config.block=64 take effect), unless `recipe` is set to a
full rule list (see qjax.Recipe.from_config).
"""

import ml_collections


def parse_arg(arg: str | None, defaults: dict) -> dict:
  """'method=rtn,bits=4,block=128' -> dict, typed like `defaults`."""
  out = dict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    if "=" not in item:
      raise ValueError(f"config argument {item!r} is not key=value")
    key, value = item.split("=", 1)
    if key not in defaults:
      raise ValueError(
        f"unknown config argument {key!r}; choices: {', '.join(defaults)}"
      )
    kind = type(defaults[key])
    if kind is bool:
      out[key] = value.lower() in ("1", "true", "yes")
    elif kind is tuple:
      out[key] = tuple(float(v) for v in value.split("/") if v)
    else:
      out[key] = kind(value)
  return out


def base_config(model: str, args: dict) -> ml_collections.ConfigDict:
  """The fields every experiment has; `args` come from parse_arg."""
  c = ml_collections.ConfigDict()
  c.model = model
  c.method = args["method"]
  # bits=N gives intN (symmetric) or, with zero_point, uintN (asymmetric
  # min-max, as the GPTQ and MagR papers quantize); format overrides both.
  kind = "uint" if args["zero_point"] else "int"
  c.format = args["format"] or f"{kind}{args['bits']}"
  c.block = args["block"]  # 0: one scale per output channel
  # Blocks run along the input (contraction) axis: -2 of a Dense kernel
  # [in, out] and of a conv kernel [kh, kw, in, out].
  c.block_axis = -2
  c.scale_format = args["scale_format"]
  c.clip_ratios = args["clip_ratios"]
  c.ragged = True  # a short last block where the block does not divide
  c.layers = args["layers"]  # 0: the whole model; >0: a slice for tests
  c.magr_statistics = args["magr_statistics"]
  c.shrink = args["shrink"]
  c.cd_sweeps = args["cd_sweeps"]
  c.order = args["order"]  # pipe: residual terms per weight
  c.keep = args["keep"]  # pipe: fraction of channels orders >= 2 keep
  c.adjust = args["adjust"]  # ed: the adjust step (error_diffusion.ADJUSTS)
  c.gpfq_scales = args["gpfq_scales"]  # gpfq: 'weights' or 'feedback' grids
  # qaf / ftq (CP factorization, qjax.transforms.cp_layers): compression
  # rate and QAF's caps; the model config sets which kernels (factor_pattern).
  c.rate = args["rate"]
  c.qaf_sweeps = args["qaf_sweeps"]
  c.qaf_inner = args["qaf_inner"]
  c.factor_pattern = "kernel"
  c.recipe = None  # or {'rules': [...]} to override the flat fields
  c.save_checkpoint = True
  c.name = (
    f"{model}_{c.method}_{c.format}"
    + (
      f"_g{c.block}"
      if c.block and not c.format.startswith(("mx", "nv", "bfp"))
      else ""
    )
    + (f"_o{c.order}" if c.method.endswith("pipe") else "")
    + (f"_k{c.keep:g}" if c.method.endswith("pipe") and c.keep < 1 else "")
    + (f"_{c.adjust}" if c.method == "ed" and c.adjust != "lstsq" else "")
    + (
      f"_{c.gpfq_scales}"
      if c.method == "gpfq" and c.gpfq_scales != "weights"
      else ""
    )
    + (f"_rate{c.rate:g}" if c.method in ("qaf", "ftq") else "")
    + ("_clip" if c.clip_ratios else "")
    + ("_last" if c.magr_statistics == "last_sample" else "")
    + (f"_beta{c.shrink:g}" if c.shrink else "")
    + (f"_cd{c.cd_sweeps}" if c.cd_sweeps >= 0 else "")
  )
  return c


DEFAULTS = {
  "method": "rtn",
  "bits": 4,
  "format": "",
  "zero_point": False,
  "block": 128,
  "scale_format": "float32",
  "clip_ratios": (),
  "layers": 0,
  # MagR (magr+rtn, magr+gptq): which statistics it sees ('hessian' or
  # 'last_sample'), grid shrink beta (0: by bit width), coordinate-descent
  # sweeps after GPTQ (-1: by bit width); see experiments.run_lib.
  "magr_statistics": "hessian",
  "shrink": 0.0,
  "cd_sweeps": -1,
  # PIPE (pipe, magr+pipe, gptq+pipe): expansion order and the fraction of
  # output channels each order >= 2 keeps (qjax.transforms.residual).
  "order": 2,
  "keep": 1.0,
  # Error Diffusion (ed): the adjust step, 'lstsq' (our reading of the
  # paper), 'rescale' or 'bias' (qjax.quantizers.error_diffusion).
  "adjust": "lstsq",
  # GPFQ (gpfq): where each block's grid comes from, 'weights' (W before the
  # loop) or 'feedback' (its values after feedback when the block starts).
  "gpfq_scales": "weights",
  # QAF / factorize-then-quantize (qaf, ftq): the compression rate, and
  # QAF's sweep and ADMM-step caps (the authors': 5000 and 1000; ours are
  # what 2 cores afford, see the README's QAF section).
  "rate": 2.0,
  "qaf_sweeps": 20,
  "qaf_inner": 60,
}
