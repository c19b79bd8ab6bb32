"""GPT-2 in Flax NNX, with a pure-function boundary for per-sample gradients.

The network is GPT-2 (Radford et al., 2019) as HuggingFace's ``GPT2LMHeadModel``
computes it: learned token and position embeddings, ``n_layer`` pre-LayerNorm
blocks (causal self-attention with a fused ``q, k, v`` projection, then a
GELU-tanh MLP, each around a residual), a final LayerNorm, and output logits
tied to the token embedding. No dropout: DoGraph's per-sample gradients must
be a deterministic function of the parameters and the sample.

Submodules carry HuggingFace's names (``h.{i}.attn.c_attn``, ``mlp.c_fc``,
...), so a checkpoint maps onto them by renaming only (``models/hf.py``), and
every linear layer is its own ``nnx.Linear`` with a kernel of shape
``(in, out)``: the layer inputs ``X`` and output-gradients ``D`` of docs/method.md §7
are those of named modules.

The boundary to JAX transformations is a pair of pure functions:

* :func:`split_model` turns a model into ``(graphdef, params)``, ``params``
  a plain nested ``dict`` of arrays (``nnx.to_pure_dict``);
* :func:`apply` rebuilds the model from them with ``nnx.merge`` and runs it,

so ``jax.grad``, ``jax.vmap`` and optax act on ``params`` like on any pytree;
:func:`sequence_loss` is the per-sample loss DoGraph vmaps over.

Two config fields trade speed and memory without changing the function (both
models, :class:`GPT2Config` and ``LlamaConfig``; docs/method.md §7a):

* ``attention``: ``"xla"`` (default) is the explicit einsum + float32 softmax
  below, the reference; ``"dot_product"`` calls
  ``jax.nn.dot_product_attention``: cuDNN's flash attention where it applies
  (a CUDA GPU, bfloat16/float16 compute, head width a multiple of 8 up to
  128, 256 on Hopper), which never stores the ``B H T S`` scores, and JAX's
  XLA implementation elsewhere; ``"cudnn"`` insists on cuDNN (an error where
  it does not apply). See :func:`causal_dot_product_attention`.
* ``remat``: ``"none"`` (default), ``"block"`` (``nnx.remat`` of each block,
  saving nothing but its input) or ``"dots"`` (saving the outputs of the
  matmuls without batch dimensions, i.e. of the linear layers). See
  :func:`call_block`; the factored engine's taps work through it.

Shape legend: ``B`` batch, ``T`` sequence length, ``V`` vocabulary size,
``D`` model width (``d_model``), ``F`` MLP width (``d_ff``), ``H`` heads,
``K`` head width (``D / H``), ``S`` key positions (``= T``).
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
from dograph_jax.models.head import tied_logits

PyTree = Any
# GPT-2's initialiser: N(0, 0.02) for every weight matrix and embedding.
_INIT_STD = 0.02


# ------------------------------------------- attention and remat options --

# The attention implementations (the config field `attention`):
ATTENTION: dict[str, str] = {
    "xla": "explicit einsum, float32 scores and softmax (the reference)",
    "dot_product": "jax.nn.dot_product_attention: cuDNN flash attention where "
                   "it applies, JAX's XLA implementation elsewhere",
    "cudnn": "jax.nn.dot_product_attention(implementation='cudnn'); an error "
             "where cuDNN flash attention does not apply",
}
# What each block keeps for the backward pass (the config field `remat`):
REMAT: dict[str, Any] = {
    "none": None,  # no checkpoint: every intermediate autodiff needs is kept
    # only the block's input (and its parameters); the backward pass reruns
    # the whole block forward
    "block": jax.checkpoint_policies.nothing_saveable,
    # also the outputs of dot_generals without batch dimensions: every linear
    # layer's output (q/k/v/o, MLP); attention's batched einsums, softmax,
    # norms and activations are recomputed
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_attention_and_remat(config: Any) -> None:
  """Validate ``config.attention`` and ``config.remat`` (``ValueError``)."""
  name = type(config).__name__
  if config.attention not in ATTENTION:
    raise ValueError(f"{name}.attention must be one of {sorted(ATTENTION)}, got "
                     f"{config.attention!r}.")
  if config.remat not in REMAT:
    raise ValueError(f"{name}.remat must be one of {sorted(REMAT)}, got {config.remat!r}.")


def cudnn_attention_applies(dtype: Any, head_dim: int) -> str | None:
  """``None`` if cuDNN flash attention can run here, else the reason why not.

  Its conditions (``jax._src.cudnn.fused_attention_stablehlo``, JAX 0.10):
  a CUDA GPU of compute capability >= 8.0, float16/bfloat16 operands (no
  float32), a head width that is a multiple of 8 and at most 128 (256 from
  Hopper, 9.0, on). The default backend's first device decides.
  """
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"compute dtype {jnp.dtype(dtype).name} (cuDNN takes bfloat16 or float16)"
  if jax.default_backend() != "gpu":
    return f"backend {jax.default_backend()!r} (cuDNN needs a CUDA GPU)"
  capability = getattr(jax.devices()[0], "compute_capability", None)
  if capability is None:
    return "a GPU without a CUDA compute capability (not an NVIDIA GPU)"
  major_minor = tuple(int(v) for v in str(capability).split(".")[:2])
  if major_minor < (8, 0):
    return f"compute capability {capability} (cuDNN flash attention needs >= 8.0)"
  widest = 256 if major_minor >= (9, 0) else 128
  if head_dim % 8 or head_dim > widest:
    return f"head width {head_dim} (must be a multiple of 8, at most {widest})"
  return None


def causal_dot_product_attention(q_BxTxHxK: jax.Array, k_BxSxGxK: jax.Array,
                                 v_BxSxGxK: jax.Array, attention: str) -> jax.Array:
  """Causal softmax attention through ``jax.nn.dot_product_attention``.

  ``G`` key/value heads (``G`` divides ``H``; ``G = H`` is plain multi-head
  attention): query head ``h`` reads key/value head ``h // (H / G)``, as
  HF's ``repeat_kv`` and :class:`dograph_jax.models.llama.Attention` do;
  the key/value heads are passed as they are (no repeat), both
  implementations take grouped queries natively. The scale is ``1 /
  sqrt(K)``.

  Numerics, as the ``"xla"`` reference (same function; differences are
  rounding, ~1e-7 relative in float32):

  * JAX's XLA implementation computes the scores ``q k^T`` in float32 for
    float32 and bfloat16 operands alike (``preferred_element_type`` float32;
    bfloat16 operands with the ``BF16_BF16_F32`` dot algorithm), masks them
    with a large negative number (``-0.7 * finfo(float32).max`` instead of
    ``-inf``: the same softmax, every row keeps its diagonal), takes the
    softmax in float32, casts the probabilities to the compute dtype and
    multiplies them with ``v`` in it — exactly the ``"xla"`` path's order of
    casts. It stores the ``B H T S`` scores like the reference.
  * cuDNN's flash attention (bfloat16/float16 only) accumulates ``q k^T`` in
    float32, keeps the softmax statistics (row max and log-sum-exp) in
    float32, casts the probabilities to the operand dtype for the product
    with ``v`` (float32 accumulation) and never materialises the scores: the
    backward pass recomputes them block by block from ``q``, ``k``, ``v``,
    the output and the float32 log-sum-exp. The causal mask skips the upper
    triangle's blocks.

  The implementation is chosen here, at trace time: JAX's own
  ``implementation=None`` does not choose (in JAX 0.10 it always runs XLA).

  Args:
    q_BxTxHxK, k_BxSxGxK, v_BxSxGxK: queries, keys, values, one dtype.
    attention: ``"dot_product"`` (cuDNN when :func:`cudnn_attention_applies`
      says so, else XLA) or ``"cudnn"`` (cuDNN or a ``ValueError``).

  Returns:
    ``out_BxTxHxK`` in the operands' dtype.
  """
  why_not = cudnn_attention_applies(q_BxTxHxK.dtype, q_BxTxHxK.shape[-1])
  if attention == "cudnn" and why_not is not None:
    raise ValueError(f"attention='cudnn': cuDNN flash attention does not apply to {why_not}; "
                     "use attention='dot_product' (cuDNN where it applies, XLA elsewhere).")
  implementation = "cudnn" if why_not is None else "xla"
  return jax.nn.dot_product_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, is_causal=True,
                                      implementation=implementation)


def _call(block: nnx.Module, x: jax.Array) -> jax.Array:
  return block(x)


def call_block(block: nnx.Module, x_BxTxD: jax.Array, remat: str) -> jax.Array:
  """``block(x_BxTxD)``, rematerialised as ``remat`` says (:data:`REMAT`).

  ``"none"`` calls the block. Otherwise the call goes through
  ``nnx.remat`` (``jax.checkpoint`` of the block's forward, with the
  policy): the backward pass reruns the block's forward from its input and
  whatever the policy saved, instead of reading every intermediate from
  memory. ``nnx.remat`` lifts the block's state, so the factored engine's
  taps (:mod:`dograph_jax.models.taps`) pass through it unchanged: the
  perturbations ``nnx.capture`` puts on the block's layers are inputs of the
  checkpointed function (their gradient, each layer's output-gradient
  ``D``, flows out of its backward), and the values the layers ``sow``
  (their inputs ``X``, the normalised ``xhat``) are its outputs. Outputs are
  never recomputed, so under taps the engine still holds every ``X`` and
  ``D`` it reads (it needs them); remat then saves what is not tapped —
  attention's scores and probabilities, the MLP's pre-activation, the
  norms' statistics.
  """
  if remat == "none":
    return block(x_BxTxD)
  # `prevent_cse` (the default) matters in a Python loop over blocks: it puts
  # the recomputation behind an optimisation barrier, without which XLA's CSE
  # merges it back into the forward pass and keeps the intermediates after
  # all. XLA:CPU removes those barriers anyway (its `cse_barrier_expander`
  # pass), so on the CPU remat changes the program but not its memory unless
  # XLA_FLAGS=--xla_disable_hlo_passes=cse_barrier_expander (for compile-only
  # memory estimates of a GPU run).
  return nnx.remat(_call, policy=REMAT[remat])(block, x_BxTxD)


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """Shape and numerics of a GPT-2 model."""

  vocab_size: int  # V: rows of the (tied) token embedding.
  n_positions: int  # Context: the longest sequence the position table covers.
  n_layer: int  # Number of transformer blocks.
  n_head: int  # Attention heads per block; must divide d_model.
  d_model: int  # D: width of the residual stream.
  d_ff: int  # F: hidden width of the MLP (4 * d_model in GPT-2).
  layer_norm_eps: float = 1e-5  # Epsilon inside every LayerNorm.
  dtype: Any = jnp.float32  # Compute dtype of activations; logits are float32.
  param_dtype: Any = jnp.float32  # Storage dtype of parameters (keep float32).
  attention: str = "xla"  # "xla" | "dot_product" | "cudnn": see ATTENTION.
  remat: str = "none"  # "none" | "block" | "dots": see REMAT.

  def __post_init__(self):
    check_attention_and_remat(self)
    for name in ("vocab_size", "n_positions", "n_layer", "n_head", "d_model",
                 "d_ff"):
      value = getattr(self, name)
      if (not isinstance(value, numbers.Integral) or isinstance(value, bool)
          or value < 1):
        raise ValueError(f"GPT2Config.{name} must be a positive int, got {value!r}.")
    if self.d_model % self.n_head:
      raise ValueError(
          f"GPT2Config: d_model ({self.d_model}) must be divisible by n_head "
          f"({self.n_head}).")
    if not self.layer_norm_eps > 0:
      raise ValueError(
          f"GPT2Config.layer_norm_eps must be > 0, got {self.layer_norm_eps}.")
    for name in ("dtype", "param_dtype"):
      if not jnp.issubdtype(jnp.dtype(getattr(self, name)), jnp.floating):
        raise ValueError(
            f"GPT2Config.{name} must be a floating dtype, got {getattr(self, name)!r}.")

  @property
  def head_dim(self) -> int:
    """K: width of one attention head."""
    return self.d_model // self.n_head


CONFIGS: dict[str, GPT2Config] = {
    # Tiny, for CPU tests and examples; vocab_size is normally overridden by
    # the tokenizer's size.
    "mini": GPT2Config(vocab_size=512, n_positions=128, n_layer=2, n_head=2,
                       d_model=64, d_ff=256),
    # GPT-2 small, 124M parameters (HF "gpt2").
    "gpt2": GPT2Config(vocab_size=50257, n_positions=1024, n_layer=12,
                       n_head=12, d_model=768, d_ff=3072),
    # GPT-2 medium, 355M parameters (HF "gpt2-medium").
    "gpt2-medium": GPT2Config(vocab_size=50257, n_positions=1024, n_layer=24,
                              n_head=16, d_model=1024, d_ff=4096),
    # The DoGraph paper's "GPT-2 Small" (docs/method.md §6): deeper and narrower.
    "paper-small": GPT2Config(vocab_size=50257, n_positions=512, n_layer=24,
                              n_head=16, d_model=768, d_ff=3072),
    # The DoGraph paper's "GPT-2 Medium" (docs/method.md §6).
    "paper-medium": GPT2Config(vocab_size=50257, n_positions=512, n_layer=36,
                               n_head=24, d_model=768, d_ff=3072),
}


def get_config(name: str, **overrides: Any) -> GPT2Config:
  """The named config of :data:`CONFIGS`, with fields replaced by ``overrides``.

  Args:
    name: a key of :data:`CONFIGS`.
    **overrides: :class:`GPT2Config` fields to replace, e.g.
      ``vocab_size=tokenizer_size`` or ``dtype=jnp.bfloat16``.

  Returns:
    The config (validated again after the overrides).

  Raises:
    ValueError: for an unknown name, an unknown field or an invalid value.
  """
  if name not in CONFIGS:
    raise ValueError(
        f"Unknown GPT-2 config {name!r}; known: {', '.join(sorted(CONFIGS))}.")
  fields = {f.name for f in dataclasses.fields(GPT2Config)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(
        f"Unknown GPT2Config field(s) {unknown}; fields: {sorted(fields)}.")
  return dataclasses.replace(CONFIGS[name], **overrides)


def _normal(std: float):
  return nnx.initializers.normal(stddev=std)


def _linear(cfg: GPT2Config, d_in: int, d_out: int, std: float,
            rngs: nnx.Rngs) -> taps.Linear:
  return taps.Linear(d_in, d_out, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                     kernel_init=_normal(std),
                     bias_init=nnx.initializers.zeros_init(), rngs=rngs)


def _layer_norm(cfg: GPT2Config, rngs: nnx.Rngs) -> taps.LayerNorm:
  # Statistics in float32 and the result cast to `dtype`, so bfloat16
  # compute stays stable here.
  return taps.LayerNorm(cfg.d_model, epsilon=cfg.layer_norm_eps,
                        dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)


class CausalSelfAttention(nnx.Module):
  """Multi-head causal self-attention: fused ``c_attn`` (D -> 3D), ``c_proj``."""

  def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
    self.n_head = cfg.n_head
    self.head_dim = cfg.head_dim
    self.dtype = cfg.dtype
    self.attention = cfg.attention
    self.c_attn = _linear(cfg, cfg.d_model, 3 * cfg.d_model, _INIT_STD, rngs)
    # GPT-2 scales the init of projections that write into the residual
    # stream by 1/sqrt(2 n_layer): there are 2 n_layer such writes, so the
    # variance they add to the stream at init does not grow with depth.
    self.c_proj = _linear(cfg, cfg.d_model, cfg.d_model,
                          _INIT_STD / math.sqrt(2 * cfg.n_layer), rngs)

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    b, t, d = x_BxTxD.shape
    qkv_BxTx3D = self.c_attn(x_BxTxD)
    # HF's layout: the 3D outputs are [q | k | v], each split into H heads.
    q_BxTxHxK, k_BxSxHxK, v_BxSxHxK = (
        a.reshape(b, t, self.n_head, self.head_dim)
        for a in jnp.split(qkv_BxTx3D, 3, axis=-1))
    if self.attention != "xla":
      out_BxTxHxK = causal_dot_product_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK,
                                                 self.attention)
      return self.c_proj(out_BxTxHxK.reshape(b, t, d))
    # Scores and softmax in float32 whatever the compute dtype: exp of
    # bfloat16 scores loses the small differences that attention relies on.
    scores_BxHxTxS = jnp.einsum("bthk,bshk->bhts", q_BxTxHxK, k_BxSxHxK,
                                preferred_element_type=jnp.float32)
    scores_BxHxTxS = scores_BxHxTxS / math.sqrt(self.head_dim)
    causal_TxS = jnp.tril(jnp.ones((t, t), dtype=bool))
    # Every row keeps its diagonal, so no row is all -inf and softmax is safe.
    scores_BxHxTxS = jnp.where(causal_TxS, scores_BxHxTxS, -jnp.inf)
    probs_BxHxTxS = jax.nn.softmax(scores_BxHxTxS, axis=-1).astype(self.dtype)
    out_BxTxHxK = jnp.einsum("bhts,bshk->bthk", probs_BxHxTxS, v_BxSxHxK)
    return self.c_proj(out_BxTxHxK.reshape(b, t, d))


class MLP(nnx.Module):
  """``c_fc`` (D -> F), GELU (tanh approximation, HF "gelu_new"), ``c_proj``."""

  def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
    self.c_fc = _linear(cfg, cfg.d_model, cfg.d_ff, _INIT_STD, rngs)
    self.c_proj = _linear(cfg, cfg.d_ff, cfg.d_model,
                          _INIT_STD / math.sqrt(2 * cfg.n_layer), rngs)

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    h_BxTxF = jax.nn.gelu(self.c_fc(x_BxTxD), approximate=True)
    return self.c_proj(h_BxTxF)


class Block(nnx.Module):
  """Pre-LayerNorm transformer block: ``x + attn(ln_1 x)``, ``x + mlp(ln_2 x)``."""

  def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
    self.ln_1 = _layer_norm(cfg, rngs)
    self.attn = CausalSelfAttention(cfg, rngs=rngs)
    self.ln_2 = _layer_norm(cfg, rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    x_BxTxD = x_BxTxD + self.attn(self.ln_1(x_BxTxD))
    return x_BxTxD + self.mlp(self.ln_2(x_BxTxD))


class GPT2(nnx.Module):
  """GPT-2 language model with output logits tied to the token embedding.

  Parameters (a path in :func:`split_model`'s ``params``, and its shape):
  ``wte.embedding (V, D)``, ``wpe.embedding (n_positions, D)``, for each block
  ``i``: ``h.i.ln_1.{scale,bias} (D,)``, ``h.i.attn.c_attn.kernel (D, 3D)``,
  ``h.i.attn.c_proj.kernel (D, D)``, ``h.i.ln_2.*``,
  ``h.i.mlp.c_fc.kernel (D, F)``, ``h.i.mlp.c_proj.kernel (F, D)`` (each
  linear layer with a ``bias``), and ``ln_f.{scale,bias}``.

  Args:
    config: the model's :class:`GPT2Config`.
    rngs: ``nnx.Rngs`` for the initialisers (only its ``params`` stream).
  """

  def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
    self.config = config
    self.wte = nnx.Embed(config.vocab_size, config.d_model, dtype=config.dtype,
                         param_dtype=config.param_dtype,
                         embedding_init=_normal(_INIT_STD), rngs=rngs)
    self.wpe = nnx.Embed(config.n_positions, config.d_model,
                         dtype=config.dtype, param_dtype=config.param_dtype,
                         embedding_init=_normal(_INIT_STD), rngs=rngs)
    self.h = nnx.List([Block(config, rngs=rngs) for _ in range(config.n_layer)])
    self.ln_f = _layer_norm(config, rngs)

  def __call__(self, tokens_BxT: jax.Array) -> jax.Array:
    """Next-token logits.

    Args:
      tokens_BxT: integer token ids, shape ``(B, T)`` with
        ``T <= n_positions``. Ids outside ``[0, V)`` give NaN logits (the
        embedding lookup fills out-of-range rows with NaN), never silently
        wrong numbers.

    Returns:
      ``logits_BxTxV``, float32 whatever the compute dtype: logit ``[b, t]``
      scores token ``t + 1`` given tokens ``<= t``.

    Raises:
      ValueError: if ``tokens_BxT`` is not 2-D or not integer, or
        ``T > n_positions``.
    """
    cfg = self.config
    if jnp.ndim(tokens_BxT) != 2:
      raise ValueError(
          f"GPT2 expects tokens of shape (B, T); got shape {jnp.shape(tokens_BxT)}.")
    t = tokens_BxT.shape[1]
    if t > cfg.n_positions:
      raise ValueError(
          f"GPT2: sequence length T={t} exceeds the context n_positions="
          f"{cfg.n_positions}.")
    x_BxTxD = self.wte(tokens_BxT) + self.wpe(jnp.arange(t))[None]
    tapped = taps.is_tapping()
    if tapped:  # for the factored engine: the gradient wrt both embeddings
      self.sow(nnx.Intermediate, "tokens", tokens_BxT)
      x_BxTxD = self.perturb("embeddings", x_BxTxD)
    for block in self.h:
      x_BxTxD = call_block(block, x_BxTxD, cfg.remat)
    h_BxTxD = self.ln_f(x_BxTxD)
    # Tied output layer. Inputs stay in the compute dtype (bfloat16 matmuls
    # run at full speed) but accumulate and return in float32, so the
    # softmax over V ~ 50k logits is not computed from rounded values.
    wte_VxD = self.wte.embedding[...].astype(cfg.dtype)
    # (the product's weight gradient in a fast layout: models/head.py)
    logits_BxTxV = tied_logits(h_BxTxD.astype(cfg.dtype), wte_VxD)
    if tapped:  # the output use of the tied embedding: input h, gradient D
      self.sow(nnx.Intermediate, "head_inputs", h_BxTxD)
      logits_BxTxV = self.perturb("logits", logits_BxTxV)
    return logits_BxTxV


def split_model(model: GPT2) -> tuple[nnx.GraphDef, dict]:
  """Split a model into a static ``graphdef`` and a pure pytree of parameters.

  ``params`` is ``nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])``: a plain
  nested ``dict`` whose leaves are the parameter arrays (no ``nnx.Variable``
  wrappers), keyed like the module tree, block indices as ``int`` keys:
  ``params["h"][0]["attn"]["c_attn"]["kernel"]``. Gradients, per-sample
  gradients and optax states then have exactly this structure. (Checkpoint
  libraries that store keys as strings give ``"0"`` back;
  ``nnx.restore_int_paths`` restores them.)

  The model has no state but parameters (no dropout RNGs, no batch
  statistics), so nothing else needs to travel with ``params``.

  Args:
    model: a :class:`GPT2` (an abstract one from ``nnx.eval_shape`` too: then
      the leaves are ``jax.ShapeDtypeStruct``).

  Returns:
    ``(graphdef, params)``; :func:`apply` inverts it.

  Raises:
    ValueError: if the model holds non-parameter state (e.g. values left by
      ``sow`` outside ``nnx.capture``), which ``params`` could not carry.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError(
        "split_model: the model holds state other than nnx.Param "
        f"({nnx.to_pure_dict(rest)!r:.200}); pure params cannot carry it.")
  return graphdef, nnx.to_pure_dict(params)


def apply(graphdef: nnx.GraphDef, params: PyTree,
          tokens_BxT: jax.Array) -> jax.Array:
  """Pure forward pass: ``logits_BxTxV = merge(graphdef, params)(tokens_BxT)``.

  Args:
    graphdef: from :func:`split_model` (static: it has no array leaves).
    params: from :func:`split_model`, or any pytree of the same structure
      (gradients, updated parameters, tracers).
    tokens_BxT: integer token ids, ``(B, T)``, ``T <= n_positions``.

  Returns:
    float32 logits of shape ``(B, T, V)``.
  """
  return nnx.merge(graphdef, params)(tokens_BxT)


def token_losses(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
  """Per-token cross-entropy ``-log softmax(logits)[target]``, float32.

  Args:
    logits_BxTxV: unnormalised scores (any float dtype).
    targets_BxT: integer target ids in ``[0, V)``.

  Returns:
    ``losses_BxT``, float32.
  """
  logits_BxTxV = logits_BxTxV.astype(jnp.float32)
  lse_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
  target_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None],
                                   axis=-1)[..., 0]
  return lse_BxT - target_BxT


def sequence_loss(graphdef: nnx.GraphDef, params: PyTree,
                  tokens_T1: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy of ONE sequence of ``T + 1`` tokens.

  Token ``t + 1`` is predicted from tokens ``<= t`` for ``t < T``, and the
  ``T`` losses are averaged: the per-sample loss ``l_i`` of docs/method.md §2. It
  takes a single sequence so that per-sample gradients are
  ``jax.vmap(jax.grad(lambda p, x: sequence_loss(graphdef, p, x)),
  in_axes=(None, 0))`` over a ``(B, T + 1)`` token array, as
  ``dograph_jax.per_sample_grads`` does.

  Args:
    graphdef: from :func:`split_model`.
    params: from :func:`split_model`.
    tokens_T1: integer ids, shape ``(T + 1,)``, ``1 <= T <= n_positions``.

  Returns:
    Scalar float32 loss.
  """
  if jnp.ndim(tokens_T1) != 1 or tokens_T1.shape[0] < 2:
    raise ValueError(
        "sequence_loss expects ONE sequence of T + 1 >= 2 tokens, shape "
        f"(T + 1,); got shape {jnp.shape(tokens_T1)}. Vmap it over a batch.")
  logits_1xTxV = apply(graphdef, params, tokens_T1[None, :-1])
  return jnp.mean(token_losses(logits_1xTxV, tokens_T1[None, 1:]))


def count_params(params: PyTree) -> int:
  """Total number of scalars in ``params`` (arrays or ``ShapeDtypeStruct``s)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def param_count(config: GPT2Config) -> int:
  """Number of parameters of :class:`GPT2` with ``config``, analytically.

  ``V D + n_positions D + n_layer (4 D^2 + 2 D F + 9 D + F) + 2 D``: per
  block two LayerNorms (``4D``), ``c_attn`` (``3D^2 + 3D``), ``attn.c_proj``
  (``D^2 + D``), ``c_fc`` (``DF + F``) and ``mlp.c_proj`` (``FD + D``); then
  ``ln_f`` (``2D``). The token embedding is counted once: the output layer
  reuses it.
  """
  d, f = config.d_model, config.d_ff
  per_block = 4 * d * d + 2 * d * f + 9 * d + f
  return (config.vocab_size * d + config.n_positions * d
          + config.n_layer * per_block + 2 * d)
