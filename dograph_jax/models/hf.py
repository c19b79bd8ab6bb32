"""Load a local HuggingFace GPT-2 checkpoint into :class:`GPT2`, without torch.

A checkpoint directory (as written by ``GPT2LMHeadModel.save_pretrained`` or
downloaded from the Hub beforehand) holds ``config.json`` and
``model.safetensors`` (or shards listed in ``model.safetensors.index.json``).
Tensors are read with ``safetensors.safe_open(..., framework="np")``, so
neither torch nor network access is needed.

Our modules carry HF's names, so the mapping is a renaming of the leaf only:
``kernel``/``scale``/``embedding`` <-> ``weight``, ``bias`` <-> ``bias``.
HF GPT-2 stores its projections as ``Conv1D`` with weights of shape
``(in, out)``, the layout of ``nnx.Linear``'s kernel, so nothing is
transposed. ``lm_head.weight`` is tied to ``wte.weight``: when present it must
equal it.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from dograph_jax.models.gpt2 import GPT2, GPT2Config, split_model

# HF activation names that are GELU with the tanh approximation (the one GPT-2
# was trained with); "gelu" (exact erf) would differ by up to ~1e-3.
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
# Our leaf name -> HF's.
_LEAF_TO_HF = {"kernel": "weight", "scale": "weight", "embedding": "weight",
               "bias": "bias"}
# Non-parameter buffers older GPT-2 checkpoints carry (the causal mask).
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def gpt2_config_from_hf(hf_config: dict[str, Any], *,
                        dtype: Any = jnp.float32) -> GPT2Config:
  """Our :class:`GPT2Config` from the dict of an HF GPT-2 ``config.json``.

  Args:
    hf_config: the parsed ``config.json``.
    dtype: compute dtype of the model (parameters stay float32).

  Returns:
    The config.

  Raises:
    ValueError: a missing shape field, or a variant our model does not
      compute (another ``model_type``, a non-tanh GELU, unscaled or
      layer-scaled attention, cross-attention).
  """
  model_type = hf_config.get("model_type", "gpt2")
  if model_type != "gpt2":
    raise ValueError(f"load_hf_gpt2: model_type is {model_type!r}, not 'gpt2'.")
  missing = [k for k in ("vocab_size", "n_positions", "n_embd", "n_layer",
                         "n_head") if k not in hf_config]
  if missing:
    raise ValueError(f"load_hf_gpt2: config.json lacks {missing}.")
  activation = hf_config.get("activation_function", "gelu_new")
  if activation not in _TANH_GELUS:
    raise ValueError(
        f"load_hf_gpt2: activation_function {activation!r} is not supported; "
        f"the model computes GELU with the tanh approximation {_TANH_GELUS}.")
  # Variants that change the attention math rather than its numerics.
  required = {"scale_attn_weights": True,
              "scale_attn_by_inverse_layer_idx": False,
              "add_cross_attention": False}
  for key, want in required.items():
    got = hf_config.get(key, want)  # absent means HF's default, which is ours
    if bool(got) != want:
      raise ValueError(f"load_hf_gpt2: {key}={got!r} is not supported (need {want}).")
  d_model = hf_config["n_embd"]
  n_inner = hf_config.get("n_inner")
  return GPT2Config(
      vocab_size=hf_config["vocab_size"], n_positions=hf_config["n_positions"],
      n_layer=hf_config["n_layer"], n_head=hf_config["n_head"],
      d_model=d_model, d_ff=4 * d_model if n_inner is None else n_inner,
      layer_norm_eps=float(hf_config.get("layer_norm_epsilon", 1e-5)),
      dtype=dtype)


def _safetensors_files(directory: pathlib.Path) -> list[pathlib.Path]:
  single = directory / "model.safetensors"
  if single.is_file():
    return [single]
  index = directory / "model.safetensors.index.json"
  if index.is_file():
    weight_map = json.loads(index.read_text())["weight_map"]
    files = [directory / name for name in sorted(set(weight_map.values()))]
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
      raise FileNotFoundError(
          f"load_hf_gpt2: shards listed in {index} are missing: {absent}.")
    return files
  raise FileNotFoundError(
      f"load_hf_gpt2: no model.safetensors (nor model.safetensors.index.json) "
      f"in {directory}.")


def _read_tensors(files: list[pathlib.Path]) -> dict[str, np.ndarray]:
  """All tensors, names without the ``transformer.`` prefix, buffers skipped."""
  tensors = {}
  for file in files:
    with safe_open(str(file), framework="np") as f:
      for key in f.keys():
        name = key.removeprefix("transformer.")
        if name.endswith(_BUFFER_SUFFIXES):
          continue
        try:
          tensors[name] = f.get_tensor(key)
        except TypeError as e:  # numpy has no bfloat16
          raise ValueError(
              f"load_hf_gpt2: cannot read {key!r} of {file} as numpy ({e}); "
              "save the checkpoint in float32 or float16.") from e
  return tensors


def _flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, prefix + (key,)))
    else:
      flat[prefix + (key,)] = value
  return flat


def _unflatten(flat: dict[tuple, Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def _hf_name(path: tuple) -> str:
  return ".".join(str(k) for k in path[:-1]) + "." + _LEAF_TO_HF[path[-1]]


def load_hf_gpt2(path: str | os.PathLike, *,
                 dtype: Any = jnp.float32) -> tuple[GPT2Config, GPT2]:
  """Load a HuggingFace GPT-2 checkpoint from a local directory.

  Args:
    path: directory with ``config.json`` and ``model.safetensors`` (or a
      sharded ``model.safetensors.index.json``), from ``GPT2LMHeadModel`` or
      ``GPT2Model`` (names with or without the ``transformer.`` prefix).
    dtype: compute dtype of the returned model; parameters are float32.

  Returns:
    ``(config, model)``; ``model(tokens_BxT)`` gives HF's logits.

  Raises:
    FileNotFoundError: the directory, ``config.json`` or the weights are
      missing (the message names the path).
    ValueError: an unsupported configuration, a missing, unexpected or
      wrongly shaped tensor, or an ``lm_head.weight`` not tied to ``wte``.
  """
  directory = pathlib.Path(path)
  if not directory.is_dir():
    raise FileNotFoundError(f"load_hf_gpt2: no checkpoint directory at {directory}.")
  config_file = directory / "config.json"
  if not config_file.is_file():
    raise FileNotFoundError(f"load_hf_gpt2: no config.json in {directory}.")
  hf_config = json.loads(config_file.read_text())
  config = gpt2_config_from_hf(hf_config, dtype=dtype)
  tensors = _read_tensors(_safetensors_files(directory))

  # The expected names and shapes come from an abstract model: no random
  # initialisation of parameters that are about to be overwritten.
  abstract = nnx.eval_shape(lambda: GPT2(config, rngs=nnx.Rngs(0)))
  graphdef, abstract_params = split_model(abstract)
  expected = {p: (_hf_name(p), leaf) for p, leaf in _flatten(abstract_params).items()}

  wanted = {name for name, _ in expected.values()}
  missing = sorted(wanted - set(tensors))
  if missing:
    raise ValueError(f"load_hf_gpt2: {directory} lacks tensors {missing}.")
  lm_head = tensors.pop("lm_head.weight", None)
  if lm_head is not None:
    if lm_head.shape != tensors["wte.weight"].shape or not np.array_equal(
        lm_head, tensors["wte.weight"]):
      raise ValueError(
          "load_hf_gpt2: lm_head.weight differs from wte.weight; the model "
          "ties its output layer to the token embedding.")
  elif hf_config.get("tie_word_embeddings", True) is False:
    raise ValueError(
        "load_hf_gpt2: tie_word_embeddings is false but there is no "
        "lm_head.weight; an untied output layer is not supported.")
  unexpected = sorted(set(tensors) - wanted)
  if unexpected:
    raise ValueError(
        f"load_hf_gpt2: unexpected tensors {unexpected} in {directory}.")

  flat = {}
  for p, (name, leaf) in expected.items():
    array = tensors[name]
    if tuple(array.shape) != tuple(leaf.shape):
      raise ValueError(
          f"load_hf_gpt2: {name} has shape {tuple(array.shape)}, expected "
          f"{tuple(leaf.shape)} from config.json.")
    flat[p] = jnp.asarray(array, dtype=leaf.dtype)
  return config, nnx.merge(graphdef, _unflatten(flat))
