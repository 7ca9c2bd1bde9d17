"""One task per model: load its weights and score a parameter tree.

`reference(params, config)` computes what the float model produces (or None);
`score(params, config, reference)` returns metrics for any parameter tree.
`quality` names the headline metric and `higher_is_better` its direction.

Activation quantization: `score(..., activations=recipe, act_scales=...)`
runs the model through qjax.apply under the rules (a fresh jit per call,
since a function jitted without them would replay its old trace), on a tree
that may keep its quantized leaves (a Hadamard or SmoothQuant kernel
transforms its own input). `module(params)` and `collections()` give the
Linen model and its other variables (for qjax.activations.calibrate);
`act_pattern` matches the inputs a config's activation rule quantizes by
default, and an LM's `kv_pattern` its KV-cache taps.
"""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

import qjax
from qjax import datasets
from qjax import metrics as qmetrics
from qjax.models import fmnist_cnn, minilm, mobilenet_v2, smollm2


def _act_apply(module, collections, activations, scales):
  """fn(params, *inputs): the model under the activation rules, jitted
  afresh (see the module docstring)."""
  return jax.jit(
    lambda p, *xs: qjax.apply(
      module,
      {"params": p, **collections},
      *xs,
      activations=activations,
      act_scales=scales,
      mode="dequantize",
    )
  )


class SmolLM2Task:
  name = "smollm2"
  quality = "perplexity"
  higher_is_better = False
  # The 210 Dense inputs (the tied LM head stays float) and the KV cache.
  act_pattern = r"/(q|k|v|o|gate|up|down)$"
  kv_pattern = r"/(k_cache|v_cache)$"

  def module(self, params):
    return smollm2.model_for(params)

  def collections(self):
    return {}

  def load(self, config):
    return smollm2.load_params(layers=config.layers or None)

  @staticmethod
  @functools.lru_cache(maxsize=4)
  def _windows(window, count, text_file=""):
    """`count` windows of `window` tokens from the start of the evaluation
    text: the KJV, or `text_file` (UTF-8; e.g. a WikiText-2 test split
    you have on disk, which no package registry ships)."""
    need = window * count
    if text_file:
      text = pathlib.Path(text_file).read_text(encoding="utf-8")
    else:
      text = datasets.kjv_text()
    ids = smollm2.tokenizer().encode(text[: 8 * need]).ids  # ~4 chars/token
    try:
      return qmetrics.token_windows(ids, window, count)
    except ValueError as e:
      raise ValueError(f"eval.text {text_file or 'KJV'}: {e}") from e

  def reference(self, params, config):
    return None

  def block_model(self, params):
    return smollm2.block_model(params)

  def calibration_batches(self, config):
    """Windows from the end of the text: disjoint from evaluation.

    calib.subset k > 0 takes the k-th run of `windows` windows before the
    last one (disjoint subsets, to measure how the result depends on the
    calibration text)."""
    window, count = config.calib.window, config.calib.windows
    subset = config.calib.get("subset", 0)
    runs = subset + 1
    text = datasets.kjv_text()
    ids = smollm2.tokenizer().encode(text[-8 * window * count * runs :]).ids
    windows = qmetrics.token_windows(ids, window, count * runs, from_end=True)
    return [jnp.asarray(w[None]) for w in windows[:count]]

  def score(self, params, config, reference, activations=None, act_scales=None):
    windows = self._windows(
      config.eval.window, config.eval.windows, config.eval.get("text", "")
    )
    if activations is None:
      fn = smollm2.logits
    else:
      fn = _act_apply(self.module(params), {}, activations, act_scales)
    ppl = qmetrics.perplexity(lambda w: fn(params, w), windows)
    return {"perplexity": ppl}


class MiniLMTask:
  name = "minilm"
  quality = "cosine_mean"
  higher_is_better = True
  act_pattern = r"/(query|key|value|attn_out|ffn_in|ffn_out)$"

  def module(self, params):
    layers = sum(k.startswith("layer_") for k in params)
    return minilm.MiniLM(minilm.Config(layers=layers))

  def collections(self):
    return {}

  def load(self, config):
    params = minilm.load_params()
    if config.layers:
      params = {
        k: v
        for k, v in params.items()
        if not k.startswith("layer_") or int(k[6:]) < config.layers
      }
    return params

  @staticmethod
  @functools.lru_cache(maxsize=4)
  def _batch(count):
    verses = datasets.kjv_text().split("\n")[:count]
    return minilm.encode(minilm.tokenizer(), verses)

  def block_model(self, params):
    return minilm.block_model(params)

  def calibration_batches(self, config):
    """Verses from the end of the text (disjoint from evaluation), batched."""
    count, size = config.calib.sentences, config.calib.batch
    verses = [v for v in datasets.kjv_text().split("\n") if v.strip()]
    if count > len(verses) // 2:
      raise ValueError(
        f"calib_sentences={count}: the text has {len(verses)} verses and "
        "the calibration half must stay disjoint from evaluation"
      )
    tok = minilm.tokenizer()
    # Similar lengths per batch: little padding enters the statistics.
    tail = sorted(verses[-count:], key=len)
    return [
      minilm.encode(tok, tail[i : i + size]) for i in range(0, count, size)
    ]

  def _embed(self, params, config, activations=None, act_scales=None):
    ids, mask = self._batch(config.eval.sentences)
    model = self.module(params)
    if activations is None:
      states = jax.jit(model.apply)({"params": params}, ids, mask)
    else:
      fn = _act_apply(model, {}, activations, act_scales)
      states = fn(params, ids, mask)
    return np.asarray(minilm.sentence_embedding(states, mask))

  def reference(self, params, config):
    return self._embed(params, config)

  def score(self, params, config, reference, activations=None, act_scales=None):
    emb = self._embed(params, config, activations, act_scales)
    cos = qmetrics.cosine_similarity(emb, reference)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}


class MobileNetV2Task:
  """Fidelity to the float model on photos (no labelled ImageNet offline)."""

  name = "mobilenet_v2"
  quality = "top1_agreement"
  higher_is_better = True
  # Every conv's and the classifier's input but the stem's (the image).
  act_pattern = (
    r"(block_\d+/(expand|depthwise|project)/conv|head/conv|classifier)$"
  )

  def module(self, params):
    return mobilenet_v2.MobileNetV2()

  def collections(self):
    return {"batch_stats": self._batch_stats}

  def load(self, config):
    variables = mobilenet_v2.load_variables()
    self._batch_stats = variables["batch_stats"]
    return variables["params"]

  def block_model(self, params):
    return mobilenet_v2.block_model(params, self._batch_stats)

  def calibration_batches(self, config):
    """Crops of photos the evaluation never sees, in batches."""
    images = mobilenet_v2.calibration_images(config.calib.images)
    size = config.calib.batch
    return [
      jnp.asarray(images[i : i + size]) for i in range(0, len(images), size)
    ]

  def _logits(self, params, config, activations=None, act_scales=None):
    images = mobilenet_v2.photos(config.eval.crops_per_photo)
    if activations is None:
      out = mobilenet_v2.logits(params, self._batch_stats, images)
    else:
      fn = _act_apply(
        self.module(params), self.collections(), activations, act_scales
      )
      out = fn(params, images)
    return np.asarray(out)

  def reference(self, params, config):
    return self._logits(params, config)

  def score(self, params, config, reference, activations=None, act_scales=None):
    out = self._logits(params, config, activations, act_scales)
    return {
      "top1_agreement": qmetrics.top1_agreement(reference, out),
      "kl": qmetrics.kl_divergence(reference, out),
    }


class FashionMnistTask:
  """Test-set accuracy of the CNN qjax trained (experiments/train_...)."""

  name = "fmnist_cnn"
  quality = "accuracy"
  higher_is_better = True
  act_pattern = r"(conv|dense)"

  def module(self, params):
    return fmnist_cnn.CNN()

  def collections(self):
    return {}

  def load(self, config):
    return fmnist_cnn.load_params()

  @staticmethod
  @functools.lru_cache(maxsize=1)
  def _test():
    return fmnist_cnn.load_split("test")

  def reference(self, params, config):
    return np.asarray(fmnist_cnn.logits(params, self._test()[0]))

  def score(self, params, config, reference, activations=None, act_scales=None):
    x, y = self._test()
    if activations is None:
      out = np.asarray(fmnist_cnn.logits(params, x))
    else:
      fn = _act_apply(self.module(params), {}, activations, act_scales)
      out = np.asarray(fn(params, x))
    return {
      "accuracy": qmetrics.accuracy(out, y),
      "top1_agreement": qmetrics.top1_agreement(reference, out),
    }


TASKS = {
  t.name: t
  for t in (SmolLM2Task(), MiniLMTask(), MobileNetV2Task(), FashionMnistTask())
}


def get(name: str):
  if name not in TASKS:
    raise ValueError(
      f"unknown model {name!r}; choices: {', '.join(sorted(TASKS))}"
    )
  return TASKS[name]
