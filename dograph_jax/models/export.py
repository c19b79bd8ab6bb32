"""Export GPT-2 and LLaMA models to the HuggingFace layout (the inverse of
:mod:`hf` and :mod:`hf_llama`), without torch.

:func:`export_hf` dispatches on the config: :func:`export_hf_llama` writes
``LlamaForCausalLM``'s layout (kernels transposed to ``(out, in)``, the
Llama 3 RoPE scaling as ``rope_scaling``, ``lm_head.weight`` only when
untied); :func:`export_hf_gpt2` GPT-2's, as follows.

:func:`export_hf_gpt2` writes ``config.json`` (``model_type: gpt2``,
``architectures: [GPT2LMHeadModel]``), ``model.safetensors`` and, given one,
the tokenizer (``save_pretrained``) into a directory that
``transformers.GPT2LMHeadModel.from_pretrained(DIR)`` (and
:func:`dograph_jax.models.load_hf_gpt2`) loads. Tensors carry HF's names
with the ``transformer.`` prefix; the output layer is tied to ``wte``, so
``lm_head.weight`` is not stored (``tie_word_embeddings: true``); the layout
of every matrix is already HF's ``Conv1D`` ``(in, out)``, so nothing is
transposed (see :mod:`hf`).

From a training run's directory (``experiments/pretrain.py --out_dir R``)::

    python -m dograph_jax.models.export --run_dir R --out DIR [--step N]

reads the parameters of the run's last (or ``--step``) complete checkpoint
and its tokenizer (``R/tokenizer``, which the trainer writes, else the
``--tokenizer`` the run was given or the one it trained and cached in its
data directory). The checkpoint is read with orbax directly, without the
run's optimizer (only the ``params`` of the saved state are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
from typing import Any

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from dograph_jax.models.gpt2 import GPT2, GPT2Config, split_model
from dograph_jax.models.hf import _flatten, _hf_name
from dograph_jax.models.hf_llama import hf_llama_names
from dograph_jax.models.llama import Llama, LlamaConfig


def hf_gpt2_config(config: GPT2Config, *, eos_token_id: int | None = None,
                   bos_token_id: int | None = None) -> dict[str, Any]:
  """The ``config.json`` dict of HF's GPT-2 for our :class:`GPT2Config`
  (GELU with the tanh approximation, scaled attention, tied head, no dropout)."""
  out = {
      "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
      "vocab_size": config.vocab_size, "n_positions": config.n_positions,
      "n_ctx": config.n_positions, "n_embd": config.d_model, "n_layer": config.n_layer,
      "n_head": config.n_head, "n_inner": config.d_ff, "activation_function": "gelu_new",
      "layer_norm_epsilon": config.layer_norm_eps, "tie_word_embeddings": True,
      "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
      "reorder_and_upcast_attn": False, "add_cross_attention": False,
      # training-time noise our model never applies
      "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
      "torch_dtype": "float32",
  }
  if eos_token_id is not None:
    out["eos_token_id"] = int(eos_token_id)
  if bos_token_id is not None:
    out["bos_token_id"] = int(bos_token_id)
  return out


def export_hf_gpt2(config: GPT2Config, params: Any, out_dir: str | os.PathLike, *,
                   tokenizer: Any = None) -> pathlib.Path:
  """Write ``params`` (``split_model``'s pytree for ``config``) as an HF GPT-2.

  Args:
    config: the model's config.
    params: its parameters (int or string block keys; float32 is written).
    out_dir: directory to write (created; files of the same names replaced).
    tokenizer: optional ``transformers`` tokenizer, saved beside the weights
      with ``model_max_length`` set to the model's context (``n_positions``),
      so that ``truncation=True`` stops there; its eos/bos ids go into
      ``config.json``.

  Returns:
    ``out_dir`` as a Path.

  Raises:
    ValueError: ``params`` do not have the names or shapes of ``config``'s model.
  """
  expected = _abstract_params(GPT2, config)
  names = {path: ("transformer." + _hf_name(path), False) for path in expected}
  return _write_hf("export_hf_gpt2", expected, params, names,
                   lambda ids: hf_gpt2_config(config, **ids), out_dir, tokenizer,
                   config.n_positions)


def hf_llama_config(config: LlamaConfig, *, eos_token_id: int | None = None,
                    bos_token_id: int | None = None) -> dict[str, Any]:
  """The ``config.json`` dict of HF's LLaMA for our :class:`LlamaConfig`."""
  s = config.rope_scaling
  out = {
      "model_type": "llama", "architectures": ["LlamaForCausalLM"],
      "vocab_size": config.vocab_size, "hidden_size": config.d_model,
      "intermediate_size": config.d_ff, "num_hidden_layers": config.n_layer,
      "num_attention_heads": config.n_head, "num_key_value_heads": config.n_kv_head,
      "head_dim": config.head_dim, "max_position_embeddings": config.n_positions,
      "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
      "rope_scaling": None if s is None else {
          "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
          "high_freq_factor": s.high_freq_factor,
          "original_max_position_embeddings": s.original_max_position_embeddings},
      "tie_word_embeddings": config.tie_embeddings, "hidden_act": "silu",
      "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
      "torch_dtype": "float32",
  }
  if eos_token_id is not None:
    out["eos_token_id"] = int(eos_token_id)
  if bos_token_id is not None:
    out["bos_token_id"] = int(bos_token_id)
  return out


def export_hf_llama(config: LlamaConfig, params: Any, out_dir: str | os.PathLike, *,
                    tokenizer: Any = None) -> pathlib.Path:
  """Write ``params`` of :class:`Llama` as an HF ``LlamaForCausalLM`` (see
  :func:`export_hf_gpt2` for the arguments)."""
  return _write_hf("export_hf_llama", _abstract_params(Llama, config), params,
                   hf_llama_names(config), lambda ids: hf_llama_config(config, **ids),
                   out_dir, tokenizer, config.n_positions)


def _abstract_params(model_class, config) -> dict:
  """``split_model``'s params of ``model_class(config)``, shapes only, flattened."""
  return _flatten(split_model(nnx.eval_shape(lambda: model_class(config, rngs=nnx.Rngs(0))))[1])


def _write_hf(who: str, expected: dict, params: Any, names: dict, config_json, out_dir,
              tokenizer, n_positions: int) -> pathlib.Path:
  """Checks ``params`` against the ``expected`` (path -> shape) of the config's
  model, writes them under HF's ``names`` (path -> (name, transposed?)) to
  ``model.safetensors``, the tokenizer if given (limited to the model's
  context, ``n_positions``), and ``config_json(ids)`` (``ids``: the
  tokenizer's eos/bos ids, or none) to ``config.json``."""
  params = nnx.restore_int_paths(params) if _has_str_keys(params) else params
  given = _flatten(params)
  if set(given) != set(expected):
    raise ValueError(f"{who}: parameters do not match the config's model: missing "
                     f"{sorted(map(str, set(expected) - set(given)))[:5]}, unexpected "
                     f"{sorted(map(str, set(given) - set(expected)))[:5]}")
  tensors = {}
  for path, leaf in expected.items():
    array = np.asarray(given[path], np.float32)
    name, transposed = names[path]
    if array.shape != tuple(leaf.shape):
      raise ValueError(f"{who}: {name} has shape {array.shape}, the config's model "
                       f"{tuple(leaf.shape)}")
    tensors[name] = np.ascontiguousarray(array.T if transposed else array)
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
  ids = {}
  if tokenizer is not None:
    # A trained tokenizer has no context length of its own; without this,
    # ``tokenizer(text, truncation=True)`` returns more ids than the model
    # has positions. A copy: the caller's tokenizer is left as it was.
    from dograph_jax.data.tokenizer import with_context
    with_context(tokenizer, n_positions).save_pretrained(str(out))
    ids = dict(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
  (out / "config.json").write_text(json.dumps(config_json(ids), indent=2) + "\n")
  return out


def export_hf(config, params: Any, out_dir: str | os.PathLike, *,
              tokenizer: Any = None) -> pathlib.Path:
  """:func:`export_hf_gpt2` or :func:`export_hf_llama`, by the config's family."""
  if isinstance(config, LlamaConfig):
    return export_hf_llama(config, params, out_dir, tokenizer=tokenizer)
  return export_hf_gpt2(config, params, out_dir, tokenizer=tokenizer)


def _has_str_keys(tree) -> bool:
  return isinstance(tree, dict) and any(
      isinstance(k, str) and k.isdigit() or _has_str_keys(v) for k, v in tree.items())


def read_run_params(run_dir: str | os.PathLike, step: int | None = None):
  """``(params, meta, run_config_dict)`` of a run's checkpoint (last complete
  one unless ``step``), read with orbax without the run's optimizer."""
  import orbax.checkpoint as ocp

  run_dir = pathlib.Path(run_dir)
  config_file = run_dir / "config.json"
  if not config_file.is_file():
    raise FileNotFoundError(f"{run_dir} holds no run (no config.json)")
  manager = ocp.CheckpointManager((run_dir / "checkpoints").absolute(),
                                  item_names=("state", "data", "meta"))
  try:
    steps = manager.all_steps()
    if not steps:
      raise FileNotFoundError(f"{run_dir} has no complete checkpoint")
    step = max(steps) if step is None else step
    if step not in steps:
      raise FileNotFoundError(f"{run_dir} has no checkpoint of step {step} (it has "
                              f"{sorted(steps)})")
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  finally:
    manager.close()
  params = nnx.restore_int_paths(restored.state["params"])
  return params, restored.meta, flat_run_config(json.loads(config_file.read_text()))


def flat_run_config(data: dict) -> dict:
  """A run's ``config.json`` as flat options by flag name (``model``,
  ``dtype``, ``vocab_size``, ...): the nested sections of
  ``dograph_jax.train.config`` or the flat file written before them. Read
  here without the trainer, so that export needs only the core package."""
  sections = ("data", "model", "optim", "dograph", "offline", "run")
  flat = {}
  for key, value in data.items():
    if key in sections and isinstance(value, dict):
      for name, v in value.items():
        flat["model" if (key, name) == ("model", "name") else name] = v
    else:
      flat[key] = value
  return flat


def run_tokenizer(run_dir: str | os.PathLike, run_config: dict, vocab_size: int):
  """The tokenizer a run trained with: ``R/tokenizer``, else its
  ``--tokenizer``, else the one cached in its data directory."""
  from dograph_jax.data import load_tokenizer

  run_dir = pathlib.Path(run_dir)
  candidates = [run_dir / "tokenizer"]
  if run_config.get("tokenizer"):
    candidates.append(pathlib.Path(run_config["tokenizer"]))
  cache_root = run_config.get("cache_dir") or run_config["data_dir"]
  candidates.append(pathlib.Path(cache_root) / f"tokenizer-bpe-{run_config['vocab_size']}")
  for path in candidates:
    if (path / "tokenizer.json").is_file() or (path / "vocab.json").is_file():
      tokenizer = load_tokenizer(path)
      if len(tokenizer) != vocab_size:
        raise ValueError(f"the tokenizer in {path} has {len(tokenizer)} tokens, the run's "
                         f"model {vocab_size}")
      return tokenizer
  raise FileNotFoundError(f"no tokenizer for the run in {run_dir}: looked in "
                          + ", ".join(map(str, candidates)))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--run_dir", required=True, help="a run directory of experiments/pretrain.py")
  parser.add_argument("--out", required=True, help="directory to write the HF model into")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: last)")
  args = parser.parse_args(argv)
  params, meta, run_config = read_run_params(args.run_dir, args.step)
  from dograph_jax.models import get_config  # the registry of both families
  config = get_config(run_config["model"], vocab_size=meta["vocab_size"])
  tokenizer = run_tokenizer(args.run_dir, run_config, meta["vocab_size"])
  out = export_hf(config, params, args.out, tokenizer=tokenizer)
  print(f"wrote {out} (step {meta['step']} of {args.run_dir}: {run_config['model']}, "
        f"vocab {meta['vocab_size']})")


if __name__ == "__main__":
  main()
