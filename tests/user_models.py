"""Two models written the way a user writes them, neither in qjax/models:
an NNX Transformer LM (LinearGeneral q/k/v, an Einsum output projection,
Linear MLP, tied embedding) and a Linen CNN with BatchNorm and depthwise
convs. Random weights: the tests compare methods on the same model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

VOCAB, DIM, HEADS, HEAD_DIM = 64, 32, 4, 8


class RMSNorm(nnx.Module):
  def __init__(self, dim, rngs):
    self.scale = nnx.Param(jnp.ones((dim,)))

  def __call__(self, x):
    return (
      x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * self.scale
    )


class Attention(nnx.Module):
  def __init__(self, rngs):
    def proj():
      return nnx.LinearGeneral(
        DIM, (HEADS, HEAD_DIM), use_bias=False, rngs=rngs
      )

    self.q, self.k, self.v = proj(), proj(), proj()
    self.o = nnx.Einsum("btnh,nhd->btd", (HEADS, HEAD_DIM, DIM), rngs=rngs)

  def __call__(self, x, mask):
    q, k, v = self.q(x), self.k(x), self.v(x)
    s = jnp.einsum("btnh,bsnh->bnts", q, k) / HEAD_DIM**0.5
    s = jnp.where(mask, s, -1e9)
    return self.o(jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, -1), v))


class Block(nnx.Module):
  def __init__(self, rngs):
    self.attn_norm, self.mlp_norm = RMSNorm(DIM, rngs), RMSNorm(DIM, rngs)
    self.attn = Attention(rngs)
    self.up = nnx.Linear(DIM, 4 * DIM, rngs=rngs)
    self.down = nnx.Linear(4 * DIM, DIM, rngs=rngs)

  def __call__(self, x, mask):
    x = x + self.attn(self.attn_norm(x), mask)
    return x + self.down(nnx.gelu(self.up(self.mlp_norm(x))))


class TinyLM(nnx.Module):
  def __init__(self, layers=2, seed=0):
    rngs = nnx.Rngs(seed)
    self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
    self.layers = nnx.List([Block(rngs) for _ in range(layers)])
    self.norm = RMSNorm(DIM, rngs)

  def __call__(self, ids):
    t = ids.shape[1]
    mask = jnp.tril(jnp.ones((t, t), bool))
    x = self.embed(ids)
    for layer in self.layers:
      x = layer(x, mask)
    return self.embed.attend(self.norm(x))


def token_batches(n, seed, batch=8, tokens=16):
  """Token ids with structure (a noisy repeating pattern), not uniform."""
  key = jax.random.key(seed)
  base = jnp.arange(tokens) * 7 % VOCAB
  out = []
  for i in range(n):
    noise = jax.random.randint(
      jax.random.fold_in(key, i), (batch, tokens), 0, 9
    )
    out.append(((base[None] + noise) % VOCAB).astype(jnp.int32))
  return out


class DepthwiseBlock(nn.Module):
  """Depthwise 3x3 conv + BN + ReLU6, pointwise 1x1 conv + BN, residual."""

  channels: int

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(
      self.channels, (3, 3), feature_group_count=self.channels, use_bias=False
    )(x)
    h = jnp.clip(nn.BatchNorm(use_running_average=True)(h), 0, 6)
    h = nn.Conv(self.channels, (1, 1), use_bias=False)(h)
    return x + nn.BatchNorm(use_running_average=True)(h)


class TinyCNN(nn.Module):
  @nn.compact
  def __call__(self, images):
    x = nn.Conv(16, (3, 3), strides=2, name="stem")(images)
    x = jnp.clip(
      nn.BatchNorm(use_running_average=True, name="stem_bn")(x), 0, 6
    )
    x = DepthwiseBlock(16, name="block1")(x)
    x = DepthwiseBlock(16, name="block2")(x)
    return nn.Dense(10, name="classifier")(x.mean(axis=(1, 2)))


def cnn_variables(seed=0):
  """Initialised variables with non-trivial BatchNorm statistics."""
  v = TinyCNN().init(jax.random.key(seed), jnp.zeros((1, 16, 16, 3)))
  stats = jax.tree.map(
    lambda s: (
      s * 0.7 + 0.2 * jax.random.uniform(jax.random.key(seed + 1), s.shape)
    ),
    v["batch_stats"],
  )
  return {"params": v["params"], "batch_stats": stats}


def image_batches(n, seed, batch=8):
  """Smooth random images (blurred noise), so convs see correlated inputs."""
  out = []
  for i in range(n):
    x = jax.random.normal(jax.random.key(seed * 1000 + i), (batch, 16, 16, 3))
    x = (x + jnp.roll(x, 1, 1) + jnp.roll(x, 1, 2)) / 3
    out.append(x)
  return out
