"""A small Flax CNN for Fashion-MNIST, trained once by qjax.

experiments/train_fmnist_cnn.py trains it (2 epochs, Adam) on Debian's
`dataset-fashion-mnist` and writes qjax/models/data/fmnist_cnn.msgpack, which
is committed, so tests and experiments never retrain.
"""

import gzip
import pathlib

import flax.linen as nn
import jax
import numpy as np
from flax import serialization

DATA_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
CHECKPOINT = pathlib.Path(__file__).parent / "data" / "fmnist_cnn.msgpack"
CLASSES = (
  "T-shirt/top",
  "Trouser",
  "Pullover",
  "Dress",
  "Coat",
  "Sandal",
  "Shirt",
  "Sneaker",
  "Bag",
  "Ankle boot",
)


class CNN(nn.Module):
  """images [b, 28, 28, 1] in [0, 1] -> logits [b, 10]."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(32, (3, 3), name="conv1")(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(64, (3, 3), name="conv2")(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Dense(128, name="dense1")(x.reshape(x.shape[0], -1)))
    return nn.Dense(10, name="dense2")(x)


def _read_idx(path: pathlib.Path) -> np.ndarray:
  with gzip.open(path, "rb") as f:
    data = f.read()
  ndim = data[3]
  dims = [
    int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
  ]
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
  """('train' | 'test') -> (images [n, 28, 28, 1] float32 in [0,1], labels).

  Raises:
    FileNotFoundError: the Debian package is missing (names the command).
  """
  prefix = {"train": "train", "test": "t10k"}[split]
  images = DATA_DIR / f"{prefix}-images-idx3-ubyte.gz"
  if not images.exists():
    raise FileNotFoundError(
      f"{images} is missing; run: apt-get update && apt-get install -y "
      "dataset-fashion-mnist"
    )
  x = _read_idx(images).astype(np.float32)[..., None] / 255.0
  y = _read_idx(DATA_DIR / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int32)
  return x, y


def init_params(seed: int = 0) -> dict:
  return CNN().init(jax.random.key(seed), np.zeros((1, 28, 28, 1)))["params"]


def load_params() -> dict:
  """The committed trained parameters."""
  if not CHECKPOINT.exists():
    raise FileNotFoundError(
      f"{CHECKPOINT} is missing; run: python -m experiments.train_fmnist_cnn"
    )
  return serialization.from_bytes(init_params(), CHECKPOINT.read_bytes())


@jax.jit
def logits(params, images):
  return CNN().apply({"params": params}, images)
