"""Train the Fashion-MNIST CNN once and write its checkpoint (committed).

python -m experiments.train_fmnist_cnn   # about 2 minutes on 2 cores
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import serialization
from tqdm.auto import tqdm

from qjax import metrics as qmetrics
from qjax.models import fmnist_cnn

_EPOCHS = flags.DEFINE_integer("epochs", 2, "passes over the training set")
_BATCH = flags.DEFINE_integer("batch", 128, "batch size")
_SEED = flags.DEFINE_integer("seed", 0, "initialisation and shuffling seed")


def main(argv):
  del argv
  x, y = fmnist_cnn.load_split("train")
  params = fmnist_cnn.init_params(_SEED.value)
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, xb, yb):
    def loss_fn(p):
      logits = fmnist_cnn.CNN().apply({"params": p}, xb)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(_SEED.value)
  for epoch in range(_EPOCHS.value):
    order = rng.permutation(len(x))
    bar = tqdm(
      range(0, len(x) - _BATCH.value + 1, _BATCH.value),
      desc=f"epoch {epoch + 1}",
    )
    for i in bar:
      idx = order[i : i + _BATCH.value]
      params, opt_state, loss = step(
        params, opt_state, jnp.asarray(x[idx]), jnp.asarray(y[idx])
      )
      bar.set_postfix(loss=f"{float(loss):.3f}")
  xt, yt = fmnist_cnn.load_split("test")
  acc = qmetrics.accuracy(np.asarray(fmnist_cnn.logits(params, xt)), yt)
  print(f"test accuracy {acc:.4f}")
  fmnist_cnn.CHECKPOINT.parent.mkdir(exist_ok=True)
  fmnist_cnn.CHECKPOINT.write_bytes(serialization.to_bytes(params))
  print(f"wrote {fmnist_cnn.CHECKPOINT}")


if __name__ == "__main__":
  app.run(main)
