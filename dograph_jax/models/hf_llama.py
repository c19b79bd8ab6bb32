"""Load a local HuggingFace LLaMA checkpoint into :class:`Llama`, without torch.

A directory as ``LlamaForCausalLM.save_pretrained`` writes it (or as
downloaded beforehand): ``config.json`` and ``model.safetensors`` or shards
listed in ``model.safetensors.index.json``. Tensors are read with
``safetensors.safe_open(..., framework="flax")`` (bfloat16 checkpoints
included, which numpy cannot hold) and cast to the parameter dtype.

Names: HF's ``model.embed_tokens.weight`` is our ``wte.embedding`` (same
``(V, D)`` layout); ``model.layers.<i>.self_attn.{q,k,v,o}_proj.weight`` and
``mlp.{gate,up,down}_proj.weight`` are ``torch.nn.Linear`` weights ``(out,
in)``, our kernels ``(in, out)``: transposed; the RMSNorm ``weight`` is our
``scale``; ``lm_head.weight`` ``(V, D)`` is our ``lm_head.kernel`` ``(D, V)``
when untied, and must be absent or equal to the embedding when tied.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import jax.numpy as jnp
from flax import nnx
from safetensors import safe_open

from dograph_jax.models.gpt2 import split_model
from dograph_jax.models.hf import _flatten, _safetensors_files, _unflatten
from dograph_jax.models.llama import Llama, Llama3RopeScaling, LlamaConfig

_LINEARS = {("attn", "q_proj"): "self_attn.q_proj", ("attn", "k_proj"): "self_attn.k_proj",
            ("attn", "v_proj"): "self_attn.v_proj", ("attn", "o_proj"): "self_attn.o_proj",
            ("mlp", "gate_proj"): "mlp.gate_proj", ("mlp", "up_proj"): "mlp.up_proj",
            ("mlp", "down_proj"): "mlp.down_proj"}


def llama_config_from_hf(hf: dict[str, Any], *, dtype: Any = jnp.float32) -> LlamaConfig:
  """Our :class:`LlamaConfig` from an HF LLaMA ``config.json`` dict.

  Raises:
    ValueError: another ``model_type``, a missing field, biases, an activation
      other than SiLU, or a RoPE scaling other than ``llama3``.
  """
  if hf.get("model_type", "llama") != "llama":
    raise ValueError(f"load_hf_llama: model_type is {hf.get('model_type')!r}, not 'llama'.")
  need = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
          "num_attention_heads")
  missing = [k for k in need if k not in hf]
  if missing:
    raise ValueError(f"load_hf_llama: config.json lacks {missing}.")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"load_hf_llama: hidden_act {hf['hidden_act']!r} is not supported (silu).")
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key, False):
      raise ValueError(f"load_hf_llama: {key}=true is not supported (no biases).")
  # transformers < 5 writes rope_theta and rope_scaling; 5.x one rope_parameters
  # dict holding both (rope_type "default" when unscaled).
  scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
  theta = hf.get("rope_theta", scaling.get("rope_theta", 10000.0))
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  rope = None
  if kind != "default":
    if kind != "llama3":
      raise ValueError(f"load_hf_llama: rope_scaling of type {kind!r} is not supported "
                       "(only 'llama3').")
    rope = Llama3RopeScaling(
        factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))
  heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim")
  return LlamaConfig(
      vocab_size=hf["vocab_size"], n_positions=hf.get("max_position_embeddings", 2048),
      n_layer=hf["num_hidden_layers"], n_head=heads,
      n_kv_head=hf.get("num_key_value_heads") or heads, d_model=hf["hidden_size"],
      d_ff=hf["intermediate_size"], rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      rope_theta=float(theta), rope_scaling=rope,
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      head_dim_override=(head_dim if head_dim and head_dim != hf["hidden_size"] // heads
                         else None),
      dtype=dtype)


def hf_llama_names(config: LlamaConfig) -> dict[tuple, tuple[str, bool]]:
  """Our parameter path -> (HF tensor name, transposed?)."""
  out = {("wte", "embedding"): ("model.embed_tokens.weight", False),
         ("norm", "scale"): ("model.norm.weight", False)}
  if not config.tie_embeddings:
    out[("lm_head", "kernel")] = ("lm_head.weight", True)
  for i in range(config.n_layer):
    pre = f"model.layers.{i}."
    out[("h", i, "input_layernorm", "scale")] = (pre + "input_layernorm.weight", False)
    out[("h", i, "post_attention_layernorm", "scale")] = (
        pre + "post_attention_layernorm.weight", False)
    for (group, name), hf_name in _LINEARS.items():
      out[("h", i, group, name, "kernel")] = (pre + hf_name + ".weight", True)
  return out


def load_hf_llama(path: str | os.PathLike, *, dtype: Any = jnp.float32,
                  n_positions: int | None = None) -> tuple[LlamaConfig, Llama]:
  """Load an HF LLaMA checkpoint directory.

  Args:
    path: directory with ``config.json`` and ``model.safetensors`` (or a
      sharded ``model.safetensors.index.json``).
    dtype: compute dtype; parameters are float32.
    n_positions: context to use the model at (default: the checkpoint's
      ``max_position_embeddings``).

  Returns:
    ``(config, model)``.

  Raises:
    FileNotFoundError: the directory, ``config.json`` or the weights are missing.
    ValueError: an unsupported configuration, or a missing, unexpected or
      wrongly shaped tensor, or an ``lm_head`` not tied as the config says.
  """
  directory = pathlib.Path(path)
  if not (directory / "config.json").is_file():
    raise FileNotFoundError(f"load_hf_llama: no config.json in {directory}.")
  config = llama_config_from_hf(json.loads((directory / "config.json").read_text()),
                                dtype=dtype)
  if n_positions is not None:
    config = dataclasses.replace(config, n_positions=n_positions)
  tensors = {}
  for file in _safetensors_files(directory):
    with safe_open(str(file), framework="flax") as f:
      for key in f.keys():
        if key.endswith("rotary_emb.inv_freq"):  # a buffer of old checkpoints
          continue
        tensors[key] = f.get_tensor(key)
  names = hf_llama_names(config)
  if config.tie_embeddings and "lm_head.weight" in tensors:
    head = tensors.pop("lm_head.weight")
    if not bool(jnp.array_equal(head, tensors.get("model.embed_tokens.weight"))):
      raise ValueError("load_hf_llama: tie_word_embeddings is true but lm_head.weight "
                       "differs from model.embed_tokens.weight.")
  wanted = {name for name, _ in names.values()}
  missing, unexpected = sorted(wanted - set(tensors)), sorted(set(tensors) - wanted)
  if missing:
    raise ValueError(f"load_hf_llama: {directory} lacks tensors {missing[:8]}.")
  if unexpected:
    raise ValueError(f"load_hf_llama: unexpected tensors {unexpected[:8]} in {directory}.")
  abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  graphdef, abstract_params = split_model(abstract)
  flat = {}
  for p, leaf in _flatten(abstract_params).items():
    name, transposed = names[p]
    array = tensors[name].T if transposed else tensors[name]
    if tuple(array.shape) != tuple(leaf.shape):
      raise ValueError(f"load_hf_llama: {name} has shape {tuple(tensors[name].shape)}, "
                       f"expected {tuple(leaf.shape[::-1] if transposed else leaf.shape)}.")
    flat[p] = jnp.asarray(array, dtype=leaf.dtype)
  return config, nnx.merge(graphdef, _unflatten(flat))
