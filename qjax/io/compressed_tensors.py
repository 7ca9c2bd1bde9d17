"""Export to (and read back from) vLLM's compressed-tensors safetensors layout.

`export(qtree, directory)` writes `model.safetensors` and `config.json`
(with a `quantization_config`) for a tree whose quantized leaves are Dense
kernels [in, out] in one of these formats (layouts in docs/export.md):

  qjax leaf                          compressed-tensors format
  int4/int8 (signed) or uint4/uint8  pack-quantized: weight_packed int32
  with zero points, float scales per   [out, in*b/32] (value j of a word at
  output channel or per group of       bits [j*b, (j+1)*b), offset binary:
  inputs                               signed q stored as q + 2^(b-1)),
                                       weight_scale [out, groups],
                                       weight_zero_point int32 packed along
                                       the outputs [out*b/32, groups],
                                       weight_shape int64 [out, in]
  float8_e4m3fn, float scales        float-quantized: weight F8_E4M3
                                       [out, in], weight_scale [out, groups]
  mxfp4 (e2m1, E8M0 per 32)          mxfp4-pack-quantized: weight_packed
                                       uint8 [out, in/2] (even element in
                                       the low nibble), weight_scale uint8
                                       E8M0 [out, in/32]
  nvfp4 (e2m1, E4M3 per 16, tensor)  nvfp4-pack-quantized: weight_packed
                                       as mxfp4, weight_scale F8_E4M3
                                       [out, in/16], weight_global_scale
                                       float32 [1] = 1 / qjax's tensor scale

Other leaves are written as they are (float arrays keep their dtype).
Tensor names come from `names` (Flax path -> (tensor name, transpose), as
qjax.models.smollm2.gguf_names); by default a Dense 'a/b/kernel' is the
module 'a.b' with tensor 'a.b.weight' [out, in], and any other leaf is its
path with '.' for '/'. The safetensors header's __metadata__ records each
tensor's Flax path (and NVFP4's exact tensor scale, whose reciprocal in
float32 need not invert exactly), so `load` rebuilds the tree bit for bit.
Files are written under a temporary name and renamed, so a failed export
leaves no file that loads.
"""

import json
import mmap
import os
import pathlib
import struct

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from qjax import qtensor
from qjax.formats import integer, presets
from qjax.io import linear_codes as lc_lib
from qjax.io import sources

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_E2M1 = presets.PRESETS["float4_e2m1fn"]
_E4M3 = presets.PRESETS["float8_e4m3fn"]


def _same_grid(fmt, preset) -> bool:
  if not hasattr(fmt, "exponent_bits"):
    return False
  return fmt.bits == preset.bits and np.array_equal(
    fmt.values(), preset.values()
  )


def scheme_of(qt: qtensor.QTensor, path: str) -> str:
  """The compressed-tensors format name a QTensor exports as.

  Raises:
    ValueError: naming `path`, when no compressed-tensors format holds the
      leaf exactly (listing those that do).
  """
  fmt, s = qt.fmt, qt.scaling
  float_scale = s.scale_format in ("float32", "float16", "bfloat16")
  if isinstance(fmt, integer.IntFormat) and float_scale:
    plain = fmt.step_exponent == 0 and fmt.bits in (4, 8)
    if plain and fmt.signed != s.zero_point and not s.tensor_scale:
      return "pack-quantized"
  if _same_grid(fmt, _E4M3) and float_scale and not s.zero_point:
    return "float-quantized"
  if _same_grid(fmt, _E2M1) and not s.zero_point:
    if s.scale_format == "e8m0" and not s.tensor_scale:
      return "mxfp4-pack-quantized"
    if s.scale_format == "float8_e4m3fn" and s.tensor_scale:
      return "nvfp4-pack-quantized"
  raise ValueError(
    f"{path}: {fmt} with scaling {s.spec()} has no compressed-tensors "
    "layout; supported: int4/int8 (or uint4/uint8 with zero points) with "
    "float scales, float8_e4m3fn with float scales, mxfp4, nvfp4"
  )


def default_names(tree) -> dict[str, tuple[str, bool]]:
  """Flax path -> (tensor name, transpose): 'a/b/kernel' of rank 2 is
  'a.b.weight' transposed to [out, in]; other leaves keep their path with
  '.' for '/'."""
  out = {}
  for p, leaf in lc_lib.tree_leaves(tree):
    head, _, last = p.rpartition("/")
    if last == "kernel" and len(leaf.shape) == 2:
      out[p] = (f"{head.replace('/', '.')}.weight" if head else "weight", True)
    else:
      out[p] = (p.replace("/", "."), False)
  return out


def _pack_words(values: np.ndarray, bits: int, axis: int) -> np.ndarray:
  """b-bit unsigned values -> int32 words along `axis` (value j of a word at
  bits [j*b, (j+1)*b)); the axis is zero-padded to whole words."""
  per = 32 // bits
  v = np.moveaxis(values.astype(np.uint32), axis, -1)
  pad = (-v.shape[-1]) % per
  v = np.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, pad)])
  v = v.reshape(*v.shape[:-1], -1, per)
  shifts = np.arange(per, dtype=np.uint32) * bits
  words = np.bitwise_or.reduce(v << shifts, axis=-1).astype(np.uint32)
  return np.moveaxis(words.view(np.int32), -1, axis)


def _unpack_words(words: np.ndarray, bits: int, n: int, axis: int):
  per = 32 // bits
  w = np.moveaxis(words.view(np.uint32), axis, -1)
  shifts = np.arange(per, dtype=np.uint32) * bits
  v = (w[..., None] >> shifts) & np.uint32((1 << bits) - 1)
  v = v.reshape(*w.shape[:-1], -1)[..., :n]
  return np.moveaxis(v, -1, axis)


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
  c = codes.astype(np.uint8)
  return (c[:, 0::2] | (c[:, 1::2] << 4)).astype(np.uint8)


def _unpack_nibbles(packed: np.ndarray) -> np.ndarray:
  out = np.empty((packed.shape[0], 2 * packed.shape[1]), np.uint32)
  out[:, 0::2] = packed & 0xF
  out[:, 1::2] = packed >> 4
  return out


def _weights_args(qt, scheme: str, group: int, n_in: int) -> dict:
  strategy = "channel" if group == n_in else "group"
  args = {
    "num_bits": qt.fmt.bits,
    "type": "int" if scheme == "pack-quantized" else "float",
    "symmetric": not qt.scaling.zero_point,
    "strategy": strategy,
    "group_size": None if strategy == "channel" else group,
    "dynamic": False,
  }
  if scheme == "nvfp4-pack-quantized":
    args["strategy"] = "tensor_group"
  return args


def _module_tensors(lc: lc_lib.LinearCodes, scheme: str) -> dict:
  b = lc.fmt.bits
  t = {}
  if scheme == "pack-quantized":
    signed = lc.zero is None
    # Offset binary: a signed code c (two's complement) is stored c ^ 2^(b-1),
    # i.e. q + 2^(b-1); unsigned codes are stored as they are.
    codes = lc.codes ^ np.uint32(1 << (b - 1)) if signed else lc.codes
    t["weight_packed"] = _pack_words(codes, b, axis=1)
    t["weight_shape"] = np.array(lc.codes.shape, np.int64)
    if lc.zero is not None:
      t["weight_zero_point"] = _pack_words(lc.zero, b, axis=0)
  elif scheme == "float-quantized":
    t["weight"] = lc.codes.astype(np.uint8).view(ml_dtypes.float8_e4m3fn)
  else:
    t["weight_packed"] = _pack_nibbles(lc.codes)
  scale = lc.scale
  if scheme == "nvfp4-pack-quantized":
    scale = scale.view(ml_dtypes.float8_e4m3fn)
    ts = np.float32(lc.tensor_scale)
    t["weight_global_scale"] = np.array([np.float32(1) / ts], np.float32)
  t["weight_scale"] = scale
  return t


def export(
  qtree, directory, *, names=None, model_config: dict | None = None
) -> pathlib.Path:
  """Writes `qtree` as compressed-tensors safetensors into `directory`.

  Args:
    qtree: a tree of QTensors (Dense kernels [in, out]) and arrays, as
      qjax.quantize returns.
    directory: created if missing; gets model.safetensors and config.json.
    names: Flax path -> (tensor name, transpose); default `default_names`.
      A quantized kernel's tensor name must end in '.weight'.
    model_config: fields merged into config.json beside the
      quantization_config (a model's own config.json, for a server).

  Returns:
    The safetensors file's path.

  Raises:
    ValueError: naming the leaf, for a format or scaling compressed-tensors
      cannot hold, a kernel that is not [in, out], or a path `names` lacks.
  """
  directory = pathlib.Path(directory)
  leaves = lc_lib.tree_leaves(qtree)
  names = names or default_names(qtree)
  tensors, paths, groups, ignore, exact_ts = {}, {}, {}, [], {}
  for p, leaf in leaves:
    if p not in names:
      raise ValueError(f"{p}: no tensor name for this leaf in `names`")
    name, transpose = names[p]
    if not qtensor.is_qtensor(leaf):
      x = np.asarray(leaf)
      tensors[name] = np.ascontiguousarray(x.T if transpose else x)
      paths[name] = [p, transpose]
      if x.ndim == 2 and name.endswith(".weight"):
        ignore.append(name[: -len(".weight")])
      continue
    scheme = scheme_of(leaf, p)
    lc = lc_lib.linear_codes(leaf, p)
    if not (transpose and name.endswith(".weight")):
      raise ValueError(
        f"{p}: a quantized kernel must map to '<module>.weight' stored "
        f"[out, in] (transpose=True), not {names[p]}"
      )
    module = name[: -len(".weight")]
    for k, v in _module_tensors(lc, scheme).items():
      tensors[f"{module}.{k}"] = np.ascontiguousarray(v)
    paths[name] = [p, True]
    if leaf.tensor_scale is not None:
      exact_ts[module] = float(np.float32(leaf.tensor_scale)).hex()
    args = _weights_args(leaf, scheme, lc.group, lc.in_features)
    key = json.dumps([scheme, args], sort_keys=True)
    groups.setdefault(key, (scheme, args, []))[2].append(module)
  directory.mkdir(parents=True, exist_ok=True)
  metadata = {
    "format": "pt",
    "qjax_paths": json.dumps(paths),
    "qjax_tensor_scales": json.dumps(exact_ts),
    "qjax_dtypes": json.dumps(
      {
        p: str(np.dtype(leaf.dtype))
        for p, leaf in leaves
        if qtensor.is_qtensor(leaf)
      }
    ),
  }
  config = dict(model_config or {})
  config["quantization_config"] = _quantization_config(groups, ignore)
  file = directory / WEIGHTS_FILE
  _write_atomic(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
  _save_safetensors_atomic(tensors, file, metadata)
  return file


def _quantization_config(groups: dict, ignore: list) -> dict:
  formats = sorted({scheme for scheme, _, _ in groups.values()})
  config_groups = {}
  for i, (scheme, args, modules) in enumerate(groups.values()):
    config_groups[f"group_{i}"] = {
      "targets": sorted(modules),
      "weights": args,
      "input_activations": None,
      "output_activations": None,
      "format": scheme,
    }
  return {
    "quant_method": "compressed-tensors",
    "format": formats[0] if len(formats) == 1 else "mixed-precision",
    "quantization_status": "compressed",
    "config_groups": config_groups,
    "ignore": sorted(ignore),
    "kv_cache_scheme": None,
  }


def _write_atomic(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(path.name + ".partial")
  tmp.write_text(text)
  os.replace(tmp, path)


def _save_safetensors_atomic(tensors, file: pathlib.Path, metadata) -> None:
  from safetensors.numpy import save_file

  tmp = file.with_name(file.name + ".partial")
  try:
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, file)
  finally:
    tmp.unlink(missing_ok=True)


def read_safetensors(file) -> tuple[dict[str, np.ndarray], dict]:
  """Every tensor of a safetensors file (F8_E4M3 as ml_dtypes, which the
  safetensors package's numpy reader lacks) and its __metadata__. The
  arrays are read-only views of a memory map of the file.

  Raises:
    ValueError: naming the file (and tensor), when it is truncated or its
      header is not valid.
  """
  file = pathlib.Path(file)
  with open(file, "rb") as f:
    try:
      data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except ValueError as e:  # an empty file cannot be mapped
      raise ValueError(f"{file}: not a safetensors file ({e})") from e
  try:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
  except (struct.error, ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{file}: not a safetensors file ({e})") from e
  start, size = 8 + n, len(data) - 8 - n
  metadata = header.pop("__metadata__", {}) or {}
  out = {}
  for name, h in header.items():
    begin, end = h["data_offsets"]
    dtype = np.dtype(sources.SAFETENSORS_DTYPES.get(h["dtype"], np.void))
    if dtype == np.void:
      raise ValueError(f"{file}: tensor {name!r} has dtype {h['dtype']}")
    count = int(np.prod(h["shape"], dtype=np.int64))
    if end > size or end - begin != count * dtype.itemsize:
      raise ValueError(
        f"{file}: tensor {name!r} needs bytes [{begin}, {end}) of a "
        f"{size}-byte body; the file is truncated or corrupt"
      )
    x = np.frombuffer(data, dtype, count, offset=start + begin)
    out[name] = x.reshape(h["shape"])
  return out, metadata


def load(directory) -> dict:
  """The tree `export` wrote, rebuilt from the files alone: QTensors for the
  quantized kernels (codes and scales bit for bit; per-channel scales come
  back as channel scaling, groups as blocks along axis -2), arrays for the
  rest, as nested dicts keyed by Flax path component.

  Raises:
    ValueError: a missing, truncated or inconsistent file, naming it.
  """
  directory = pathlib.Path(directory)
  try:
    config = json.loads((directory / CONFIG_FILE).read_text())
    qconfig = config["quantization_config"]
  except (OSError, ValueError, KeyError) as e:
    raise ValueError(
      f"{directory / CONFIG_FILE}: no readable quantization_config ({e})"
    ) from e
  tensors, metadata = read_safetensors(directory / WEIGHTS_FILE)
  paths = json.loads(metadata.get("qjax_paths", "{}"))
  exact_ts = json.loads(metadata.get("qjax_tensor_scales", "{}"))
  dtypes = json.loads(metadata.get("qjax_dtypes", "{}"))
  flat = {}
  for group in qconfig["config_groups"].values():
    for module in group["targets"]:
      name = f"{module}.weight"
      if name not in paths:
        raise ValueError(
          f"{directory}: module {module!r} has no recorded Flax path"
        )
      p = paths[name][0]
      lc = _linear_codes_from(
        tensors, module, group, exact_ts.get(module), dtypes.get(p)
      )
      flat[p] = lc_lib.from_linear_codes(lc)
  for name, (p, transpose) in paths.items():
    if p in flat:
      continue
    if name not in tensors:
      raise ValueError(f"{directory}: tensor {name!r} ({p}) is missing")
    x = tensors[name]
    flat[p] = jnp.asarray(x.T if transpose else x)
  return lc_lib.nest(flat)


def _linear_codes_from(tensors, module, group, exact_ts, dtype):
  scheme = group["format"]
  args = group["weights"]
  b = args["num_bits"]

  def get(k):
    name = f"{module}.{k}"
    if name not in tensors:
      raise ValueError(f"{module}: tensor {name!r} is missing")
    return tensors[name]

  scale = np.asarray(get("weight_scale"))
  zero, ts = None, None
  if scheme == "pack-quantized":
    n_out, n_in = (int(v) for v in get("weight_shape"))
    codes = _unpack_words(get("weight_packed"), b, n_in, axis=1)
    if args["symmetric"]:
      codes = codes ^ np.uint32(1 << (b - 1))
      fmt = integer.IntFormat(b, name=f"int{b}")
    else:
      fmt = integer.IntFormat(b, signed=False, name=f"uint{b}")
      zero = _unpack_words(get("weight_zero_point"), b, n_out, axis=0)
      zero = zero.astype(np.uint8)
    scale_format = str(scale.dtype)
  elif scheme == "float-quantized":
    codes = get("weight").view(np.uint8).astype(np.uint32)
    fmt, scale_format = _E4M3, str(scale.dtype)
  elif scheme in ("mxfp4-pack-quantized", "nvfp4-pack-quantized"):
    codes = _unpack_nibbles(get("weight_packed"))
    fmt = presets.BLOCK_FORMATS["mxfp4"][0]
    if scheme == "mxfp4-pack-quantized":
      scale_format = "e8m0"
    else:
      scale = scale.view(np.uint8)
      scale_format = "float8_e4m3fn"
      g = np.asarray(get("weight_global_scale"), np.float32).reshape(())
      ts = np.float32(float.fromhex(exact_ts)) if exact_ts else 1 / g
      ts = np.asarray(ts, np.float32)
  else:
    raise ValueError(f"{module}: unknown compressed-tensors format {scheme!r}")
  return lc_lib.LinearCodes(
    codes,
    scale,
    zero,
    ts,
    args["group_size"] or codes.shape[1],
    fmt,
    scale_format,
    np.dtype(dtype or np.float32),
  )
