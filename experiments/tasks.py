"""One task per model: load its weights and score a parameter tree.

`reference(params, config)` computes what the float model produces (or None);
`score(params, config, reference)` returns metrics for any parameter tree.
`quality` names the headline metric and `higher_is_better` its direction.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qjax import datasets
from qjax import metrics as qmetrics
from qjax.models import fmnist_cnn, minilm, mobilenet_v2, smollm2


class SmolLM2Task:
  name = "smollm2"
  quality = "perplexity"
  higher_is_better = False

  def load(self, config):
    return smollm2.load_params(layers=config.layers or None)

  @staticmethod
  @functools.lru_cache(maxsize=4)
  def _windows(window, count):
    need = window * count
    text = datasets.kjv_text()
    ids = smollm2.tokenizer().encode(text[: 8 * need]).ids  # ~4 chars/token
    return qmetrics.token_windows(ids, window, count)

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

  def score(self, params, config, reference):
    windows = self._windows(config.eval.window, config.eval.windows)
    ppl = qmetrics.perplexity(lambda w: smollm2.logits(params, w), windows)
    return {"perplexity": ppl}


class MiniLMTask:
  name = "minilm"
  quality = "cosine_mean"
  higher_is_better = True

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

  def _embed(self, params, config):
    ids, mask = self._batch(config.eval.sentences)
    layers = sum(k.startswith("layer_") for k in params)
    model = minilm.MiniLM(minilm.Config(layers=layers))
    states = jax.jit(model.apply)({"params": params}, ids, mask)
    return np.asarray(minilm.sentence_embedding(states, mask))

  def reference(self, params, config):
    return self._embed(params, config)

  def score(self, params, config, reference):
    cos = qmetrics.cosine_similarity(self._embed(params, config), reference)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}


class MobileNetV2Task:
  """Fidelity to the float model on photos (no labelled ImageNet offline)."""

  name = "mobilenet_v2"
  quality = "top1_agreement"
  higher_is_better = True

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

  def _logits(self, params, config):
    images = mobilenet_v2.photos(config.eval.crops_per_photo)
    return np.asarray(mobilenet_v2.logits(params, self._batch_stats, images))

  def reference(self, params, config):
    return self._logits(params, config)

  def score(self, params, config, reference):
    out = self._logits(params, config)
    return {
      "top1_agreement": qmetrics.top1_agreement(reference, out),
      "kl": qmetrics.kl_divergence(reference, out),
    }


class FashionMnistTask:
  """Test-set accuracy of the CNN qjax trained (experiments/train_...)."""

  name = "fmnist_cnn"
  quality = "accuracy"
  higher_is_better = True

  def load(self, config):
    return fmnist_cnn.load_params()

  @staticmethod
  @functools.lru_cache(maxsize=1)
  def _test():
    return fmnist_cnn.load_split("test")

  def reference(self, params, config):
    return np.asarray(fmnist_cnn.logits(params, self._test()[0]))

  def score(self, params, config, reference):
    x, y = self._test()
    out = np.asarray(fmnist_cnn.logits(params, x))
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
