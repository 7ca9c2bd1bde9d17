"""Quality and size metrics for quantized models."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from qjax import qtensor


def token_windows(
  ids, window: int, count: int, *, from_end: bool = False
) -> np.ndarray:
  """`count` non-overlapping windows of `window` tokens: [count, window].

  Windows start at the first token (evaluation) or end at the last one
  (`from_end`, calibration), so the two never overlap while
  2 * count * window <= len(ids).

  Raises:
    ValueError: the text is too short.
  """
  ids = np.asarray(ids, np.int32)
  need = window * count
  if len(ids) < need:
    raise ValueError(
      f"need {need} tokens for {count} windows of {window}, "
      f"the text has {len(ids)}"
    )
  chunk = ids[len(ids) - need :] if from_end else ids[:need]
  return chunk.reshape(count, window)


def perplexity(
  logits_fn, windows: np.ndarray, *, progress: bool = True
) -> float:
  """exp(mean next-token NLL) over windows, each scored independently.

  Args:
    logits_fn: [1, t] int32 -> [1, t, vocab] logits.
    windows: [n, t] token ids; each gives t - 1 predictions.
  """
  total, count = 0.0, 0
  for w in tqdm(windows, desc="perplexity", disable=not progress):
    w = jnp.asarray(w[None])
    logp = jax.nn.log_softmax(logits_fn(w)[:, :-1].astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(logp, w[:, 1:, None], -1)
    total += float(jnp.sum(nll))
    count += nll.size
  return math.exp(total / count)


def cosine_similarity(a, b) -> np.ndarray:
  """Row-wise cosine similarity of [n, d] arrays."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.sum(a * b, -1) / (
    np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
  )


def top1_agreement(reference_logits, logits) -> float:
  """Fraction of rows whose argmax matches the reference's."""
  return float(
    np.mean(np.argmax(reference_logits, -1) == np.argmax(logits, -1))
  )


def kl_divergence(reference_logits, logits) -> float:
  """Mean KL(softmax(reference) || softmax(logits)) over rows, in nats."""
  p = jax.nn.log_softmax(jnp.asarray(reference_logits, jnp.float32), -1)
  q = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), -1)
  return float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), -1)))


def accuracy(logits, labels) -> float:
  return float(np.mean(np.argmax(logits, -1) == np.asarray(labels)))


def model_bytes(tree) -> int:
  """Bytes stored by a parameter tree (QTensors count their packed size)."""
  total = 0
  for leaf in jax.tree.leaves(tree, is_leaf=qtensor.is_quantized):
    if qtensor.is_quantized(leaf):
      total += leaf.nbytes
    else:
      total += math.prod(np.shape(leaf)) * np.dtype(leaf.dtype).itemsize
  return total


def quantized_bits_per_weight(qtree) -> float:
  """Bits per weight over the QTensor leaves only (codes, scales, zeros)."""
  leaves = [
    x
    for x in jax.tree.leaves(qtree, is_leaf=qtensor.is_quantized)
    if qtensor.is_quantized(x)
  ]
  n = sum(x.size for x in leaves)
  return 8 * sum(x.nbytes for x in leaves) / n if n else float("nan")
