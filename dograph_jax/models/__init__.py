"""Models for DoGraph experiments: GPT-2 in Flax NNX.

* :class:`GPT2`, :class:`GPT2Config`, :data:`CONFIGS`, :func:`get_config`;
* the pure boundary :func:`split_model` / :func:`apply`, with the losses
  :func:`token_losses` and :func:`sequence_loss` (the per-sample loss);
* :func:`count_params`, :func:`param_count`;
* :func:`load_hf_gpt2` — a local HuggingFace GPT-2 checkpoint, without torch.
"""

from dograph_jax.models.gpt2 import (CONFIGS, GPT2, GPT2Config, apply,
                                     count_params, get_config, param_count,
                                     sequence_loss, split_model, token_losses)
from dograph_jax.models.hf import load_hf_gpt2

__all__ = [
    "CONFIGS", "GPT2", "GPT2Config", "apply", "count_params", "get_config",
    "load_hf_gpt2", "param_count", "sequence_loss", "split_model",
    "token_losses",
]
