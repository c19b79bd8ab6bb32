"""LLaMA-family decoder in Flax NNX, built from the factored engine's taps.

RMSNorm (pre-norm), rotary position embeddings (HF's "rotate half" layout,
optionally with Llama 3's frequency scaling), grouped-query attention, a
SwiGLU MLP, no biases, and an output head tied to the token embedding or a
separate ``lm_head``. Every parameterised layer is a
:mod:`dograph_jax.models.taps` layer, and the model taps ``tokens`` /
``embeddings`` (there is no position table) and, when tied,
``head_inputs`` / ``logits``, so :func:`dograph_jax.factored_grads` works on
it as on GPT-2 (the engine's oracle tests cover both).

Parameter names follow the GPT-2 module's conventions where the engine reads
them (``wte.embedding`` is the token embedding, ``h.<i>`` the blocks) and
HuggingFace's ``LlamaForCausalLM`` elsewhere: per block ``input_layernorm``,
``attn.{q,k,v,o}_proj``, ``post_attention_layernorm``,
``mlp.{gate,up,down}_proj``; then ``norm`` and, untied, ``lm_head``.
:func:`dograph_jax.models.hf_llama.load_hf_llama` maps HF's names.

``attention`` and ``remat`` select the attention implementation and the
blocks' rematerialisation as in :mod:`dograph_jax.models.gpt2` (same
choices, same defaults: today's explicit attention, no remat).

Shapes: ``B`` batch, ``T`` tokens, ``D`` width, ``H`` query heads, ``G``
key/value heads, ``K`` head width, ``F`` MLP width, ``V`` vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dograph_jax.models import taps
from dograph_jax.models.gpt2 import (call_block, causal_dot_product_attention,
                                     check_attention_and_remat)
from dograph_jax.models.head import tied_logits

_INIT_STD = 0.02  # HF's initializer_range default for LLaMA


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
  """Llama 3.1+'s frequency-dependent RoPE scaling (HF ``rope_type: llama3``)."""
  factor: float = 32.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shape and numerics of a LLaMA-family model."""

  vocab_size: int
  n_positions: int        # context the model is used at (RoPE has no table)
  n_layer: int
  n_head: int             # H query heads
  n_kv_head: int          # G key/value heads (G divides H; G = H is plain MHA)
  d_model: int
  d_ff: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: Llama3RopeScaling | None = None
  tie_embeddings: bool = False
  head_dim_override: int | None = None  # HF's head_dim when it is not d_model / n_head
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention: str = "xla"  # "xla" | "dot_product" | "cudnn" (gpt2.ATTENTION)
  remat: str = "none"     # "none" | "block" | "dots" (gpt2.REMAT)

  def __post_init__(self):
    check_attention_and_remat(self)
    for name in ("vocab_size", "n_positions", "n_layer", "n_head", "n_kv_head", "d_model",
                 "d_ff"):
      value = getattr(self, name)
      if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}.")
    if self.head_dim_override is None and self.d_model % self.n_head:
      raise ValueError(f"LlamaConfig: d_model ({self.d_model}) must be divisible by n_head "
                       f"({self.n_head}).")
    if self.n_head % self.n_kv_head:
      raise ValueError(f"LlamaConfig: n_kv_head ({self.n_kv_head}) must divide n_head "
                       f"({self.n_head}).")
    if self.head_dim % 2:
      raise ValueError(f"LlamaConfig: rotary embeddings need an even head width, got "
                       f"{self.head_dim}.")

  @property
  def head_dim(self) -> int:
    return self.head_dim_override or self.d_model // self.n_head


LLAMA_CONFIGS: dict[str, LlamaConfig] = {
    # Tiny, for CPU tests and quick runs (vocab normally the tokenizer's).
    "llama-mini": LlamaConfig(vocab_size=512, n_positions=128, n_layer=2, n_head=4,
                              n_kv_head=2, d_model=64, d_ff=176),
    # TinyLlama-1.1B (TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T).
    "tinyllama-1.1b": LlamaConfig(vocab_size=32000, n_positions=2048, n_layer=22, n_head=32,
                                  n_kv_head=4, d_model=2048, d_ff=5632, rms_norm_eps=1e-5,
                                  rope_theta=10000.0),
    # Llama-3.2-1B and -3B (meta-llama): tied embeddings, RoPE theta 5e5 with
    # the llama3 scaling; used here at a 2048-token context (theirs: 131072).
    "llama-3.2-1b": LlamaConfig(vocab_size=128256, n_positions=2048, n_layer=16, n_head=32,
                                n_kv_head=8, d_model=2048, d_ff=8192, rms_norm_eps=1e-5,
                                rope_theta=500000.0, rope_scaling=Llama3RopeScaling(),
                                tie_embeddings=True),
    "llama-3.2-3b": LlamaConfig(vocab_size=128256, n_positions=2048, n_layer=28, n_head=24,
                                n_kv_head=8, d_model=3072, d_ff=8192, rms_norm_eps=1e-5,
                                rope_theta=500000.0, rope_scaling=Llama3RopeScaling(),
                                tie_embeddings=True),
}


def rope_frequencies(config: LlamaConfig) -> jax.Array:
  """``(K / 2,)`` float32 inverse frequencies, with Llama 3's scaling if set:
  long wavelengths (beyond ``original / low_freq_factor``) divided by
  ``factor``, short ones (below ``original / high_freq_factor``) kept, and a
  linear blend in between (HF ``_compute_llama3_parameters``)."""
  k = config.head_dim
  inv = 1.0 / (config.rope_theta ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k))
  s = config.rope_scaling
  if s is None:
    return inv
  wavelen = 2 * math.pi / inv
  low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  scaled = jnp.where(wavelen > low_wavelen, inv / s.factor, inv)
  smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
            / (s.high_freq_factor - s.low_freq_factor))
  blended = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(medium, blended, scaled)


def apply_rope(x_BxTxNxK: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotary embedding in HF's layout: ``x cos + rotate_half(x) sin``, the
  angle of position ``t`` and pair ``j`` (``j``, ``j + K/2``) being
  ``t inv_freq[j]``; computed in float32, returned in ``x``'s dtype."""
  t = x_BxTxNxK.shape[1]
  angles_TxK2 = jnp.arange(t, dtype=jnp.float32)[:, None] * inv_freq[None]
  cos = jnp.cos(angles_TxK2)[None, :, None]
  sin = jnp.sin(angles_TxK2)[None, :, None]
  x = x_BxTxNxK.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x_BxTxNxK.dtype)


def _linear(cfg: LlamaConfig, d_in: int, d_out: int, rngs: nnx.Rngs) -> taps.Linear:
  return taps.Linear(d_in, d_out, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                     kernel_init=nnx.initializers.normal(stddev=_INIT_STD), rngs=rngs)


def _rms_norm(cfg: LlamaConfig, rngs: nnx.Rngs) -> taps.RMSNorm:
  return taps.RMSNorm(cfg.d_model, epsilon=cfg.rms_norm_eps, dtype=cfg.dtype,
                      param_dtype=cfg.param_dtype, rngs=rngs)


class Attention(nnx.Module):
  """Causal grouped-query attention with rotary positions."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    k = cfg.head_dim
    self.q_proj = _linear(cfg, cfg.d_model, cfg.n_head * k, rngs)
    self.k_proj = _linear(cfg, cfg.d_model, cfg.n_kv_head * k, rngs)
    self.v_proj = _linear(cfg, cfg.d_model, cfg.n_kv_head * k, rngs)
    self.o_proj = _linear(cfg, cfg.n_head * k, cfg.d_model, rngs)

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    cfg = self.cfg
    b, t, _ = x_BxTxD.shape
    k, g = cfg.head_dim, cfg.n_kv_head
    inv_freq = rope_frequencies(cfg)
    q_BxTxHxK = apply_rope(self.q_proj(x_BxTxD).reshape(b, t, cfg.n_head, k), inv_freq)
    k_BxSxGxK = apply_rope(self.k_proj(x_BxTxD).reshape(b, t, g, k), inv_freq)
    v_BxSxGxK = self.v_proj(x_BxTxD).reshape(b, t, g, k)
    if cfg.attention != "xla":  # G key/value heads passed as they are (GQA)
      out_BxTxHxK = causal_dot_product_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK,
                                                 cfg.attention)
      return self.o_proj(out_BxTxHxK.reshape(b, t, cfg.n_head * k))
    # Query head h reads key/value head h // (H / G) (HF's repeat_kv).
    q_BxTxGxRxK = q_BxTxHxK.reshape(b, t, g, cfg.n_head // g, k)
    scores = jnp.einsum("btgrk,bsgk->bgrts", q_BxTxGxRxK, k_BxSxGxK,
                        preferred_element_type=jnp.float32) / math.sqrt(k)
    causal_TxS = jnp.tril(jnp.ones((t, t), dtype=bool))
    scores = jnp.where(causal_TxS, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(cfg.dtype)
    out_BxTxGxRxK = jnp.einsum("bgrts,bsgk->btgrk", probs, v_BxSxGxK)
    return self.o_proj(out_BxTxGxRxK.reshape(b, t, cfg.n_head * k))


class SwiGLU(nnx.Module):
  """``down(silu(gate x) * up x)``."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.gate_proj = _linear(cfg, cfg.d_model, cfg.d_ff, rngs)
    self.up_proj = _linear(cfg, cfg.d_model, cfg.d_ff, rngs)
    self.down_proj = _linear(cfg, cfg.d_ff, cfg.d_model, rngs)

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x_BxTxD)) * self.up_proj(x_BxTxD))


class LlamaBlock(nnx.Module):
  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.input_layernorm = _rms_norm(cfg, rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.post_attention_layernorm = _rms_norm(cfg, rngs)
    self.mlp = SwiGLU(cfg, rngs=rngs)

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    x_BxTxD = x_BxTxD + self.attn(self.input_layernorm(x_BxTxD))
    return x_BxTxD + self.mlp(self.post_attention_layernorm(x_BxTxD))


class Llama(nnx.Module):
  """LLaMA-family language model; ``model(tokens_BxT) -> logits_BxTxV`` (float32).

  Args:
    config: a :class:`LlamaConfig`.
    rngs: ``nnx.Rngs`` for the initialisers (normal, std 0.02; norms 1).
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.wte = nnx.Embed(config.vocab_size, config.d_model, dtype=config.dtype,
                         param_dtype=config.param_dtype,
                         embedding_init=nnx.initializers.normal(stddev=_INIT_STD), rngs=rngs)
    self.h = nnx.List([LlamaBlock(config, rngs=rngs) for _ in range(config.n_layer)])
    self.norm = _rms_norm(config, rngs)
    if not config.tie_embeddings:
      self.lm_head = _linear(config, config.d_model, config.vocab_size, rngs)

  def __call__(self, tokens_BxT: jax.Array) -> jax.Array:
    cfg = self.config
    if jnp.ndim(tokens_BxT) != 2:
      raise ValueError(f"Llama expects tokens of shape (B, T); got {jnp.shape(tokens_BxT)}.")
    if tokens_BxT.shape[1] > cfg.n_positions:
      raise ValueError(f"Llama: sequence length T={tokens_BxT.shape[1]} exceeds the context "
                       f"n_positions={cfg.n_positions}.")
    x_BxTxD = self.wte(tokens_BxT)
    tapped = taps.is_tapping()
    if tapped:
      self.sow(nnx.Intermediate, "tokens", tokens_BxT)
      x_BxTxD = self.perturb("embeddings", x_BxTxD)
    for block in self.h:
      x_BxTxD = call_block(block, x_BxTxD, cfg.remat)
    h_BxTxD = self.norm(x_BxTxD)
    if not cfg.tie_embeddings:
      return self.lm_head(h_BxTxD).astype(jnp.float32)
    wte_VxD = self.wte.embedding[...].astype(cfg.dtype)
    # (the product's weight gradient in a fast layout: models/head.py)
    logits_BxTxV = tied_logits(h_BxTxD.astype(cfg.dtype), wte_VxD)
    if tapped:
      self.sow(nnx.Intermediate, "head_inputs", h_BxTxD)
      logits_BxTxV = self.perturb("logits", logits_BxTxV)
    return logits_BxTxV


def llama_param_count(config: LlamaConfig) -> int:
  """Parameters of :class:`Llama` with ``config`` (the tied head counted once)."""
  d, f, k = config.d_model, config.d_ff, config.head_dim
  attn = d * config.n_head * k * 2 + d * config.n_kv_head * k * 2
  per_block = attn + 3 * d * f + 2 * d
  head = 0 if config.tie_embeddings else d * config.vocab_size
  return config.vocab_size * d + config.n_layer * per_block + d + head
