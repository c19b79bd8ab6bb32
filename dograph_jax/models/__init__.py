"""Models for DoGraph experiments in Flax NNX: GPT-2 and the LLaMA family.

* :class:`GPT2`, :class:`GPT2Config`; :class:`Llama`, :class:`LlamaConfig`;
  the named configs of both (:data:`CONFIGS`: every name), :func:`get_config`
  and :func:`build` (the model of a config, whichever family);
* the pure boundary :func:`split_model` / :func:`apply`, with the losses
  :func:`token_losses` and :func:`sequence_loss` (the per-sample loss);
* :func:`count_params`, :func:`param_count`;
* the config fields ``attention`` (:data:`ATTENTION`: ``"xla"``, the
  default, ``"dot_product"``, ``"cudnn"``) and ``remat`` (:data:`REMAT`:
  ``"none"``, the default, ``"block"``, ``"dots"``) of both families;
* :func:`load_hf_gpt2`, :func:`load_hf_llama` — local HuggingFace checkpoints,
  without torch; :mod:`dograph_jax.models.export` writes GPT-2 and LLaMA back.
"""

import dataclasses
from typing import Any

from flax import nnx

from dograph_jax.models import gpt2 as _gpt2
from dograph_jax.models.gpt2 import (ATTENTION, GPT2, REMAT, GPT2Config, apply, count_params,
                                     sequence_loss, split_model, token_losses)
from dograph_jax.models.hf import load_hf_gpt2
from dograph_jax.models.hf_llama import load_hf_llama
from dograph_jax.models.llama import LLAMA_CONFIGS, Llama, LlamaConfig, llama_param_count

CONFIGS: dict[str, Any] = {**_gpt2.CONFIGS, **LLAMA_CONFIGS}


def get_config(name: str, **overrides: Any):
  """The named config (GPT-2 or LLaMA family) with fields replaced by ``overrides``.

  Raises:
    ValueError: an unknown name or field, or an invalid value.
  """
  if name not in CONFIGS:
    raise ValueError(f"Unknown model config {name!r}; known: {', '.join(sorted(CONFIGS))}.")
  base = CONFIGS[name]
  fields = {f.name for f in dataclasses.fields(base)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"Unknown {type(base).__name__} field(s) {unknown}; fields: "
                     f"{sorted(fields)}.")
  return dataclasses.replace(base, **overrides)


def build(config, rngs: nnx.Rngs):
  """The model of ``config``: :class:`GPT2` or :class:`Llama`."""
  if isinstance(config, LlamaConfig):
    return Llama(config, rngs=rngs)
  if isinstance(config, GPT2Config):
    return GPT2(config, rngs=rngs)
  raise TypeError(f"build: not a model config: {type(config).__name__}")


def param_count(config) -> int:
  """Parameters of the model of ``config``, analytically."""
  if isinstance(config, LlamaConfig):
    return llama_param_count(config)
  return _gpt2.param_count(config)


__all__ = [
    "ATTENTION", "CONFIGS", "GPT2", "GPT2Config", "Llama", "LlamaConfig", "REMAT", "apply",
    "build", "count_params", "get_config", "load_hf_gpt2", "load_hf_llama", "param_count",
    "sequence_loss", "split_model", "token_losses",
]
