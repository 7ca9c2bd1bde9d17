"""Float parameter files read one leaf at a time (what qjax.convert streams).

A source lists its leaves as '/'-joined Flax paths with their shapes, and
reads one leaf at a time, optionally as a global jax.Array of which this
process reads only the shards its devices hold:

  OrbaxSource(directory)       an orbax checkpoint of float arrays (partial
                               restore of one leaf, shards read in place).
  SafetensorsSource(file)      a .safetensors file (slices read lazily).
  GGUFSource(file)             a GGUF file (each tensor dequantized with
                               gguf-py, then sliced).

`names` maps Flax paths to (tensor name, transpose) for files whose layout
is not Flax's (minilm.safetensors_names, smollm2.gguf_names); without it a
tensor 'a.b.weight' becomes the leaf 'a/b/weight', untransposed.
A damaged file is a ValueError naming the file and, once reading, the leaf.
"""

import math
import mmap
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp


class Source:
  """Base class: `specs` and `read`."""

  file: pathlib.Path

  def specs(self) -> dict[str, jax.ShapeDtypeStruct]:
    """Leaf path -> shape and dtype, in a fixed (sorted) order."""
    raise NotImplementedError

  def read(self, path: str, sharding=None) -> jax.Array:
    """One leaf; with `sharding`, a global array built from this process's
    shards only."""
    spec = self.specs().get(path)
    if spec is None:
      raise KeyError(f"{self.file}: no leaf {path!r}")
    try:
      return self._read(path, spec, sharding)
    except Exception as e:  # readers raise many types for damaged files
      raise ValueError(
        f"{self.file}: cannot read leaf {path!r}; the file is truncated or "
        f"corrupt ({type(e).__name__}: {e})"
      ) from e

  def _read(self, path, spec, sharding):
    raise NotImplementedError


LAYOUTS = ("auto", "raw", "minilm", "smollm2", "llama")
# XLA:CPU adopts a host buffer without copying only when it is this aligned;
# numpy's large allocations are 16-byte aligned, so each leaf read into one
# was copied once on device_put and again by orbax on save (measured: a
# 640 MiB leaf cost 1.9 GiB more than itself).
_ALIGN = 64


def aligned_empty(shape, dtype) -> np.ndarray:
  """An uninitialised C-contiguous array whose data starts on a 64-byte
  boundary, so jax.device_put on CPU (and np.asarray of the result) share
  its memory instead of copying it."""
  dtype = np.dtype(dtype)
  nbytes = math.prod(shape) * dtype.itemsize
  raw = np.empty(nbytes + _ALIGN, np.uint8)
  start = (-raw.ctypes.data) % _ALIGN
  return raw[start : start + nbytes].view(dtype).reshape(shape)


def aligned(x) -> np.ndarray:
  """`x` as a C-contiguous, 64-byte aligned array: `x` itself when it is
  one, else one copy."""
  x = np.asarray(x)
  if x.flags.c_contiguous and x.ctypes.data % _ALIGN == 0:
    return x
  out = aligned_empty(x.shape, x.dtype)
  np.copyto(out, x)
  return out


def _from_host(spec, sharding, get_slice):
  """A global array from get_slice(index) -> np.ndarray (index: a tuple of
  slices into the leaf); without a sharding, the whole leaf. A zero-size
  leaf has no bytes to read."""
  if math.prod(spec.shape) == 0:
    zeros = np.zeros(spec.shape, spec.dtype)
    return (
      jnp.asarray(zeros)
      if sharding is None
      else jax.device_put(zeros, sharding)
    )
  if sharding is None:
    return jnp.asarray(get_slice(tuple(slice(None) for _ in spec.shape)))
  return jax.make_array_from_callback(spec.shape, sharding, get_slice)


class _NamedTensors(Source):
  """Shared by files of named tensors (safetensors, GGUF)."""

  def __init__(self, file, names):
    self.file = pathlib.Path(file)
    if not self.file.is_file():
      raise FileNotFoundError(f"{self.file}: no such file")
    shapes = self._tensor_shapes()
    if names is None:
      names = {}
      for k in shapes:
        path = k.replace(".", "/")
        if path in names:  # 'a.kernel' and 'a/kernel' would both be a/kernel
          raise ValueError(
            f"{self.file}: tensors {names[path][0]!r} and {k!r} both map to "
            f"the path {path!r}; pass names= to tell them apart"
          )
        names[path] = (k, False)
    missing = sorted(n for n, _ in names.values() if n not in shapes)
    if missing:
      raise ValueError(
        f"{self.file} lacks tensors {missing[:5]} of the requested layout"
      )
    self.names = dict(sorted(names.items()))
    self._specs = {}
    for path, (name, transpose) in self.names.items():
      shape, dtype = shapes[name]
      self._specs[path] = jax.ShapeDtypeStruct(
        tuple(reversed(shape)) if transpose else tuple(shape), dtype
      )

  def specs(self):
    return self._specs

  def _read(self, path, spec, sharding):
    name, transpose = self.names[path]
    get = self._slicer(name)

    def get_slice(index):
      if transpose:
        return aligned(get(tuple(reversed(index))).T)
      return aligned(get(index))

    try:
      return _from_host(spec, sharding, get_slice)
    finally:
      self._release()

  def _release(self):
    pass


class SafetensorsSource(_NamedTensors):
  def __init__(self, file, names=None):
    from safetensors import safe_open

    try:
      self._handle = safe_open(str(file), framework="numpy")
    except Exception as e:
      raise ValueError(
        f"{file}: not a readable safetensors file ({type(e).__name__}: {e})"
      ) from e
    super().__init__(file, names)

  def _tensor_shapes(self):
    out = {}
    for k in self._handle.keys():
      s = self._handle.get_slice(k)
      out[k] = (tuple(s.get_shape()), _safetensors_dtype(s.get_dtype()))
    return out

  def _slicer(self, name):
    s = self._handle.get_slice(name)
    return lambda index: s[index]


# safetensors dtype names -> numpy dtypes (ml_dtypes for the float8 ones).
SAFETENSORS_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "F8_E4M3": ml_dtypes.float8_e4m3fn,
  "F8_E5M2": ml_dtypes.float8_e5m2,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
}


def _safetensors_dtype(name: str) -> np.dtype:
  if name not in SAFETENSORS_DTYPES:
    raise ValueError(f"unsupported safetensors dtype {name}")
  return np.dtype(SAFETENSORS_DTYPES[name])


class GGUFSource(_NamedTensors):
  """GGUF tensors dequantized to float32 with gguf-py, one at a time."""

  def __init__(self, file, names=None):
    import gguf

    try:
      reader = gguf.GGUFReader(str(file))
      self._tensors = {t.name: t for t in reader.tensors}
      self._map = getattr(reader.data, "_mmap", None)
    except Exception as e:
      raise ValueError(
        f"{file}: not a readable GGUF file ({type(e).__name__}: {e})"
      ) from e
    if names == "llama":
      shapes = self._tensor_shapes()
      names = llama_names({k: v[0] for k, v in shapes.items()})
    super().__init__(file, names)

  def _tensor_shapes(self):
    # GGUF lists dimensions fastest-first; numpy order is the reverse.
    return {
      k: (tuple(int(d) for d in reversed(t.shape)), np.dtype(np.float32))
      for k, t in self._tensors.items()
    }

  def _slicer(self, name):
    """Dequantizes only the rows a shard asks for, a few thousand rows at a
    time into one float32 buffer: the float copy of a tensor never exists
    beside a second one (the whole leaf, then its device copy, made it 3x
    and more)."""
    from gguf.quants import dequantize

    t = self._tensors[name]
    shape = self._tensor_shapes()[name][0]
    data = t.data
    if len(shape) < 2 or data.ndim < 2 or data.shape[0] != shape[0]:
      full = np.asarray(dequantize(data, t.tensor_type), np.float32)
      if full.shape != shape:
        raise ValueError(f"tensor {name!r} has {full.shape}, not {shape}")
      return lambda index: full[index]

    def get(index):
      rows = range(*index[0].indices(shape[0]))
      if rows.step != 1:
        raise ValueError(f"tensor {name!r}: strided reads are not supported")
      out = aligned_empty((len(rows), *shape[1:]), np.float32)
      step = max(1, (8 << 20) // (4 * math.prod(shape[1:])))  # ~8 MiB
      for start in range(rows.start, rows.stop, step):
        stop = min(start + step, rows.stop)
        part = dequantize(data[start:stop], t.tensor_type)
        out[start - rows.start : stop - rows.start] = np.reshape(
          part, (stop - start, *shape[1:])
        )
      return out[(slice(None), *index[1:])]

    return get

  def _release(self):
    # The tensor's file pages stay in the page cache but leave this
    # process's resident set: without this, every tensor read so far stayed
    # mapped (Gemma 3's embedding alone added 170 MiB to the peak).
    if self._map is not None and hasattr(mmap, "MADV_DONTNEED"):
      self._map.madvise(mmap.MADV_DONTNEED)


class OrbaxSource(Source):
  """A float orbax checkpoint (e.g. written by save_float)."""

  def __init__(self, directory):
    self.file = pathlib.Path(directory).absolute()
    try:
      meta = ocp.StandardCheckpointer().metadata(self.file)
      # Newer orbax wraps the tree's metadata in `item_metadata`.
      tree = getattr(meta, "item_metadata", meta).tree
    except Exception as e:
      raise ValueError(
        f"{self.file}: not a readable orbax checkpoint "
        f"({type(e).__name__}: {e})"
      ) from e
    self._specs = {}
    for p, m in jax.tree_util.tree_leaves_with_path(tree):
      path = "/".join(str(getattr(k, "key", k)) for k in p)
      self._specs[path] = jax.ShapeDtypeStruct(tuple(m.shape), m.dtype)
    self._specs = dict(sorted(self._specs.items()))

  def specs(self):
    return self._specs

  def _read(self, path, spec, sharding):
    if sharding is None:
      sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = node = {}
    *parents, last = path.split("/")
    for k in parents:
      node = node.setdefault(k, {})
    node[last] = jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=sharding)
    got = ocp.PyTreeCheckpointer().restore(
      self.file,
      args=ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True,
      ),
    )
    for k in path.split("/"):
      got = got[k]
    return got


def save_float(directory, params) -> None:
  """Writes a float parameter tree as a plain orbax checkpoint (what
  OrbaxSource reads). Orbax's commit protocol makes it atomic (a temporary
  directory renamed when complete); collective under jax.distributed."""
  directory = pathlib.Path(directory).absolute()
  if directory.exists():
    raise FileExistsError(f"{directory} exists; remove it or pick another path")
  with ocp.StandardCheckpointer() as c:
    c.save(directory, params)
    c.wait_until_finished()


def llama_names(tensor_names) -> dict[str, tuple[str, bool]]:
  """The documented Flax tree of a GGUF file with llama.cpp tensor names
  (layout 'llama'), for any model llama.cpp writes:

    token_embd.weight          embed/embedding        [vocab, d]
    blk.N.<name>.weight (2-D)  blk_N/<name>/kernel    [in, out] (transposed
                                                      from GGUF's [out, in])
    blk.N.<name>.weight (1-D)  blk_N/<name>/scale     (norms)
    blk.N.<name>.bias          blk_N/<name>/bias
    output_norm.weight         output_norm/scale
    output.weight              output/kernel          [d, vocab]
    anything else              its name with '/' for '.'

  So the default rule ('kernel', blocks along axis -2) quantizes every
  projection, and 'embed' keeps the token embedding out unless a rule names
  it.

  Args:
    tensor_names: {GGUF tensor name: numpy shape}.
  """
  out = {}
  for name, shape in tensor_names.items():
    parts = name.split(".")
    if name == "token_embd.weight":
      path, transpose = "embed/embedding", False
    elif parts[-1] in ("weight", "bias"):
      head = parts[:-1]
      if head[0] == "blk" and len(head) > 1:
        head = [f"blk_{head[1]}", *head[2:]]
      if parts[-1] == "bias":
        leaf, transpose = "bias", False
      elif len(shape) == 2:
        leaf, transpose = "kernel", True
      else:
        leaf, transpose = "scale", False
      path = "/".join([*head, leaf])
    else:
      path, transpose = name.replace(".", "/"), False
    if path in out:
      raise ValueError(
        f"GGUF tensors {out[path][0]!r} and {name!r} both map to {path!r}"
      )
    out[path] = (name, transpose)
  return out


def open_source(path, layout: str = "auto") -> Source:
  """A source for `path`: a directory is an orbax checkpoint, *.safetensors
  and *.gguf files are read with their readers.

  Args:
    layout: 'raw' (tensor names as paths, untransposed), 'minilm' or
      'smollm2' (the Flax trees of qjax.models), 'llama' (a GGUF file with
      llama.cpp names: see llama_names), or 'auto' (the model layout when
      the file is that model's packaged file; else 'llama' for GGUF and
      'raw' otherwise).
  """
  path = pathlib.Path(path)
  if layout not in LAYOUTS:
    raise ValueError(
      f"unknown layout {layout!r}; choices: {', '.join(LAYOUTS)}"
    )
  if path.is_dir():
    if layout not in ("auto", "raw"):
      raise ValueError(
        f"layout {layout!r} applies to safetensors/GGUF files; an orbax "
        "checkpoint keeps its own paths"
      )
    return OrbaxSource(path)
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such file or directory")
  suffix = path.suffix.lower()
  if layout == "auto":
    layout = {
      ".safetensors": "minilm" if "minilm" in str(path).lower() else "raw",
      ".gguf": "smollm2" if "smollm2" in path.name.lower() else "llama",
    }.get(suffix, "raw")
  if suffix == ".safetensors":
    if layout in ("smollm2", "llama"):
      raise ValueError(f"layout {layout!r} reads a GGUF file")
    names = None
    if layout == "minilm":
      from qjax.models import minilm

      names = minilm.safetensors_names()
    return SafetensorsSource(path, names)
  if suffix == ".gguf":
    if layout == "minilm":
      raise ValueError("layout 'minilm' reads a safetensors file")
    names = None
    if layout == "smollm2":
      from qjax.models import smollm2

      names = smollm2.gguf_names()
    if layout == "llama":
      return GGUFSource(path, "llama")
    return GGUFSource(path, names)
  raise ValueError(
    f"{path}: unknown input kind; expected an orbax checkpoint directory, "
    "a .safetensors or a .gguf file"
  )
