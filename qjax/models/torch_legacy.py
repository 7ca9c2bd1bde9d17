"""Read torch's legacy (pre-zip) `.pth` files as NumPy arrays, without torch.

The legacy file is five things in a row: a pickled magic number, a pickled
protocol version, pickled system info, the pickled object (tensors refer to
storages by a persistent id), the pickled list of storage keys, then for each
key its raw little-endian data behind an 8-byte element count.

Unpickling runs only what `find_class` allows: OrderedDict, the storage type
markers and torch's tensor-rebuild functions, all replaced by code here.
Anything else (which could run arbitrary code) is an error.
"""

import collections
import pickle
import struct

import numpy as np

MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
  "FloatStorage": np.float32,
  "DoubleStorage": np.float64,
  "HalfStorage": np.float16,
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
}


class _StorageType:
  def __init__(self, dtype):
    self.dtype = np.dtype(dtype)


class _TensorRef:
  def __init__(self, key, offset, size, stride):
    self.key, self.offset = key, offset
    self.size, self.stride = tuple(size), tuple(stride)


def _rebuild_tensor(storage, offset, size, stride, *unused):
  del unused  # requires_grad, backward hooks, metadata
  return _TensorRef(storage, offset, size, stride)


def _rebuild_parameter(tensor, requires_grad, hooks, *unused):
  del requires_grad, hooks, unused
  return tensor


_ALLOWED = {
  ("collections", "OrderedDict"): collections.OrderedDict,
  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
  ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
  def __init__(self, f):
    super().__init__(f)
    self.storages = {}  # key -> dtype

  def find_class(self, module, name):
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(_STORAGE_DTYPES[name])
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    raise pickle.UnpicklingError(
      f"refusing to load {module}.{name}: only tensors are read"
    )

  def persistent_load(self, pid):
    kind, storage_type, key = pid[0], pid[1], pid[2]
    if kind != "storage" or not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
    self.storages[key] = storage_type.dtype
    return key


def load(path) -> dict:
  """The pickled object with every tensor as a NumPy array.

  Raises:
    ValueError: not a legacy torch file, or truncated.
  """
  with open(path, "rb") as f:
    try:
      if pickle.load(f) != MAGIC:
        raise ValueError(f"{path} is not a legacy torch file (bad magic)")
      pickle.load(f)  # protocol version
      pickle.load(f)  # system info
      unpickler = _Unpickler(f)
      obj = unpickler.load()
      keys = pickle.load(f)
    except (pickle.UnpicklingError, EOFError) as e:
      raise ValueError(f"{path}: cannot read ({e})") from e
    data = {}
    for key in keys:
      dtype = unpickler.storages[key]
      head = f.read(8)
      if len(head) != 8:
        raise ValueError(f"{path} is truncated at storage {key}")
      (count,) = struct.unpack("<q", head)
      raw = f.read(count * dtype.itemsize)
      if len(raw) != count * dtype.itemsize:
        raise ValueError(f"{path} is truncated in storage {key}")
      data[key] = np.frombuffer(raw, dtype)

  def materialize(x):
    if isinstance(x, _TensorRef):
      flat = data[x.key]
      item = flat.itemsize
      view = np.lib.stride_tricks.as_strided(
        flat[x.offset :], x.size, [s * item for s in x.stride]
      )
      return np.array(view)  # own the memory, contiguous
    if isinstance(x, dict):
      return type(x)((k, materialize(v)) for k, v in x.items())
    return x

  return materialize(obj)
