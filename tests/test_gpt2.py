"""GPT-2: HuggingFace as the oracle, causality, parameter counts, per-sample
gradients against a jax.grad loop, bfloat16 compute, and loader errors."""

import dataclasses
import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

import dograph_jax as dg
from dograph_jax.models import (CONFIGS, GPT2, apply, count_params, get_config,
                                load_hf_gpt2, param_count, sequence_loss,
                                split_model, token_losses)

# A mini model with a small vocabulary: tests are dominated by compilation.
_VOCAB = 97


def _mini(**overrides):
  cfg = get_config("mini", vocab_size=_VOCAB, **overrides)
  return cfg, GPT2(cfg, rngs=nnx.Rngs(0))


def _tokens(seed, shape, vocab=_VOCAB):
  # numpy, not jax.random: every new shape would compile a sampler.
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


@jax.jit
def _randomise(params):
  """Give every parameter (LN scales and biases too) a distinct random value,
  so that a swapped or dropped tensor cannot go unnoticed."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, leaves)


@pytest.fixture(scope="module")
def mini():
  """``(config, graphdef, params, forward)`` of a mini model with randomised
  params and a jitted ``forward(params, tokens)``, built once: eager NNX
  initialisation and every fresh jit cost seconds of compilation on a CPU."""
  cfg, model = _mini()
  graphdef, params = split_model(model)
  return cfg, graphdef, _randomise(params), jax.jit(functools.partial(apply, graphdef))


# ---------------------------------------------------------------- HF oracle --

def test_matches_huggingface_gpt2(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  hf_cfg = transformers.GPT2Config(
      vocab_size=101, n_positions=32, n_embd=64, n_layer=2, n_head=4,
      activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
      attn_pdrop=0.0)
  torch.manual_seed(0)
  hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
  with torch.no_grad():
    # HF initialises LN scales to 1 and biases to 0; perturb every tensor so
    # that the test sees each one in its place.
    for p in hf.parameters():
      p.add_(0.1 * torch.randn_like(p))
  hf.save_pretrained(tmp_path)

  cfg, model = load_hf_gpt2(tmp_path)
  assert (cfg.vocab_size, cfg.n_positions, cfg.d_model, cfg.n_layer,
          cfg.n_head, cfg.d_ff) == (101, 32, 64, 2, 4, 256)
  # Tied embeddings counted once, like torch's deduplicated parameters().
  assert param_count(cfg) == sum(p.numel() for p in hf.parameters())

  ids = np.random.default_rng(0).integers(0, 101, (3, 32))
  ids_t = torch.from_numpy(ids)
  with torch.no_grad():
    out = hf(ids_t, labels=ids_t)
    ref_logits = out.logits.numpy()
    ref_ce = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, 101), ids_t[:, 1:].reshape(-1),
        reduction="none").reshape(3, 31).numpy()
  graphdef, params = split_model(model)
  logits = np.asarray(jax.jit(functools.partial(apply, graphdef))(
      params, jnp.asarray(ids, jnp.int32)))
  assert logits.dtype == np.float32
  print("max |logits - HF|:", np.abs(logits - ref_logits).max())
  assert np.abs(logits - ref_logits).max() <= 1e-4
  # The same weights through jax.nn.dot_product_attention, blocks rematerialised.
  fused, _ = split_model(nnx.eval_shape(lambda: GPT2(dataclasses.replace(
      cfg, attention="dot_product", remat="block"), rngs=nnx.Rngs(0))))
  fused_logits = np.asarray(jax.jit(functools.partial(apply, fused))(
      params, jnp.asarray(ids, jnp.int32)))
  assert np.abs(fused_logits - ref_logits).max() <= 1e-4

  ce = np.asarray(token_losses(jnp.asarray(logits[:, :-1]), jnp.asarray(ids[:, 1:])))
  np.testing.assert_allclose(ce, ref_ce, rtol=0, atol=1e-5)
  # The per-sample loss: equal-length sequences, so the mean of the means is
  # HF's mean loss.
  seq = jax.jit(jax.vmap(functools.partial(sequence_loss, graphdef),
                         in_axes=(None, 0)))(params, jnp.asarray(ids, jnp.int32))
  np.testing.assert_allclose(seq, ref_ce.mean(axis=1), rtol=0, atol=1e-5)
  np.testing.assert_allclose(seq.mean(), out.loss.item(), rtol=0, atol=1e-5)


# ----------------------------------------------------------- model contract --

def test_causal(mini):
  _, _, params, forward = mini
  tokens = _tokens(0, (2, 16))
  t = 7
  changed = tokens.at[:, t].set((tokens[:, t] + 1) % _VOCAB)
  before, after = forward(params, tokens), forward(params, changed)
  np.testing.assert_allclose(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
  assert np.abs(after[:, t:] - before[:, t:]).min(axis=-1).max() > 1e-4


def test_split_apply_roundtrip_is_pure(mini):
  _, graphdef, params, forward = mini
  model = nnx.merge(graphdef, params)
  assert split_model(model)[0] == graphdef
  assert isinstance(params, dict)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(params))
  assert params["h"][1]["attn"]["c_attn"]["kernel"].shape == (64, 192)
  assert params["h"][1]["mlp"]["c_proj"]["kernel"].shape == (256, 64)
  tokens = _tokens(1, (2, 16))
  logits = forward(params, tokens)
  assert logits.shape == (2, 16, _VOCAB) and logits.dtype == jnp.float32
  # The stateful call (jitted as a closure: eager dispatch compiles op by op,
  # slowly); the two programs fuse differently, so float32 round-off only.
  np.testing.assert_allclose(logits, jax.jit(lambda t: model(t))(tokens),
                             rtol=1e-5, atol=1e-5)
  # The pure params round-trip through the module unchanged.
  jax.tree.map(np.testing.assert_array_equal, split_model(model)[1], params)


def test_init_statistics():
  cfg = get_config("mini", n_layer=8)
  _, params = split_model(GPT2(cfg, rngs=nnx.Rngs(0)))
  block = params["h"][3]
  np.testing.assert_allclose(jnp.std(params["wte"]["embedding"]), 0.02, rtol=0.05)
  np.testing.assert_allclose(jnp.std(block["attn"]["c_attn"]["kernel"]), 0.02, rtol=0.05)
  # Residual projections: 0.02 / sqrt(2 n_layer) = 0.005.
  np.testing.assert_allclose(jnp.std(block["attn"]["c_proj"]["kernel"]), 0.005, rtol=0.1)
  np.testing.assert_allclose(jnp.std(block["mlp"]["c_proj"]["kernel"]), 0.005, rtol=0.1)
  assert not jnp.any(block["mlp"]["c_fc"]["bias"])
  assert jnp.all(block["ln_1"]["scale"] == 1) and not jnp.any(block["ln_1"]["bias"])


def test_too_long_sequence_raises(mini):
  cfg, graphdef, params, forward = mini
  n = cfg.n_positions
  # Exactly the context is fine (checked by tracing only, as the errors are
  # raised at trace time).
  assert jax.eval_shape(forward, params, _tokens(0, (1, n))).shape == (1, n, _VOCAB)
  with pytest.raises(ValueError, match=f"T={n + 1} exceeds .* n_positions={n}"):
    forward(params, _tokens(0, (1, n + 1)))
  with pytest.raises(ValueError, match=f"n_positions={n}"):
    sequence_loss(graphdef, params, _tokens(0, (n + 2,)))
  with pytest.raises(ValueError, match=r"\(B, T\)"):
    forward(params, _tokens(0, (n,)))


# ----------------------------------------------------------------- configs --

def test_configs():
  assert set(CONFIGS) >= {"mini", "gpt2", "gpt2-medium", "paper-small", "paper-medium"}
  assert get_config("mini", vocab_size=1000).vocab_size == 1000
  with pytest.raises(ValueError, match="paper-medium"):
    get_config("gpt5")
  with pytest.raises(ValueError, match="divisible"):
    get_config("mini", n_head=3)
  with pytest.raises(ValueError, match="field"):
    get_config("mini", width=3)


def _abstract_count(cfg):
  # eval_shape traces the initialisers without running them: no memory for
  # the 124M-parameter config.
  model = nnx.eval_shape(lambda: GPT2(cfg, rngs=nnx.Rngs(0)))
  return count_params(split_model(model)[1])


def test_param_counts():
  cfg, model = _mini()
  assert count_params(split_model(model)[1]) == param_count(cfg)
  two_layer = get_config("gpt2", n_layer=2)
  assert _abstract_count(two_layer) == param_count(two_layer)
  # HF GPT-2 small with tied embeddings.
  assert param_count(get_config("gpt2")) == 124_439_808
  assert _abstract_count(get_config("gpt2")) == 124_439_808
  # HF GPT-2 medium, and the paper's sizes (docs/method.md §6: "210M" and "300M").
  assert param_count(get_config("gpt2-medium")) == 354_823_168
  small, medium = param_count(get_config("paper-small")), param_count(get_config("paper-medium"))
  assert abs(small / 210e6 - 1) < 0.01 and abs(medium / 300e6 - 1) < 0.025
  assert _abstract_count(get_config("paper-medium")) == medium


# ---------------------------------------------------- per-sample gradients --

def test_per_sample_grads_match_grad_loop(mini):
  _, graphdef, params, forward = mini
  tokens = _tokens(3, (4, 9))  # B = 4 sequences of T + 1 = 9 tokens
  loss_fn = functools.partial(sequence_loss, graphdef)
  # Jitted (once each) only for speed: eager NNX dispatch is slow on CPU.
  losses, grads = jax.jit(
      lambda p, t: dg.per_sample_loss_and_grads(loss_fn, p, t))(params, tokens)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  # The per-sample losses are the rows of the batched forward pass.
  batch_ce = token_losses(forward(params, tokens[:, :-1]), tokens[:, 1:])
  np.testing.assert_allclose(losses, batch_ce.mean(axis=1), rtol=1e-6)
  grad_fn = jax.jit(jax.grad(loss_fn))
  for i in range(tokens.shape[0]):
    g_i = grad_fn(params, tokens[i])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[i], b, rtol=1e-4,
                                                         atol=1e-7), grads, g_i)


# ---------------------------------------------------------------- bfloat16 --

def test_bfloat16_compute_gives_float32_logits(mini):
  _, _, params, forward32 = mini
  cfg16 = get_config("mini", vocab_size=_VOCAB, dtype=jnp.bfloat16)
  graphdef16, params16 = split_model(
      nnx.eval_shape(lambda: GPT2(cfg16, rngs=nnx.Rngs(0))))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params16))
  tokens = _tokens(4, (2, 16))
  ref = forward32(params, tokens)
  # The same float32 params, bfloat16 compute.
  out = jax.jit(functools.partial(apply, graphdef16))(params, tokens)
  assert out.dtype == jnp.float32
  diff = jnp.abs(out - ref)
  err, err_rms = float(diff.max()), float(jnp.sqrt(jnp.mean(diff ** 2)))
  rms = float(jnp.sqrt(jnp.mean(ref ** 2)))
  # bfloat16 keeps 8 significant bits: each rounding is a relative error of
  # up to 2^-8 (RMS about 2^-9.8). A logit collects ~15 of them (embedding
  # sum, per block LN -> c_attn -> attention -> c_proj -> residual add, the
  # same for the MLP, then ln_f and the output matmul inputs), adding up like
  # a random walk: sqrt(15) * 2^-9.8 ~ 2^-7.8 of the logits' RMS; measured
  # over 5 seeds, 2^-7 to 2^-6.6 (LayerNorms and softmax amplify some). We
  # allow 2^-5 for the RMS error and 2^-3 for the worst of the 3k logits, a
  # tail ~4 RMS out (measured up to 2^-4.6): margins of 3-4x. `0 <` checks
  # that the compute dtype took effect at all.
  print(f"bf16 vs f32 / logits RMS {rms:.3g}: max {err / rms:.3g}, "
        f"RMS {err_rms / rms:.3g}")
  assert 0 < err_rms <= 2 ** -5 * rms, (err_rms, rms)
  assert err <= 2 ** -3 * rms, (err, rms)
  # Cross-entropy is 2-Lipschitz in the max-norm of the logits.
  ce32 = token_losses(ref[:, :-1], tokens[:, 1:])
  ce16 = token_losses(out[:, :-1], tokens[:, 1:])
  assert float(jnp.abs(ce16 - ce32).max()) <= 2 * err + 1e-6


# ------------------------------------------------------------------ loader --

def _export_hf(model, directory, *, prefix="transformer.", **config_overrides):
  """Write a GPT2 in HF's layout (what save_pretrained writes), without torch."""
  cfg = model.config
  _, params = split_model(model)
  leaf_to_hf = {"kernel": "weight", "scale": "weight", "embedding": "weight",
                "bias": "bias"}
  tensors = {}

  def visit(tree, path):
    for key, value in tree.items():
      if isinstance(value, dict):
        visit(value, path + [str(key)])
      else:
        name = prefix + ".".join(path) + "." + leaf_to_hf[key]
        tensors[name] = np.asarray(value)

  visit(params, [])
  save_file(tensors, str(directory / "model.safetensors"))
  hf_config = {"model_type": "gpt2", "vocab_size": cfg.vocab_size,
               "n_positions": cfg.n_positions, "n_embd": cfg.d_model,
               "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
               "layer_norm_epsilon": cfg.layer_norm_eps,
               "activation_function": "gelu_new", **config_overrides}
  (directory / "config.json").write_text(json.dumps(hf_config))
  return tensors


@pytest.mark.parametrize("prefix", ["transformer.", ""])
def test_loader_roundtrip_without_torch(tmp_path, prefix, mini):
  cfg, graphdef, params, _ = mini
  model = nnx.merge(graphdef, params)
  _export_hf(model, tmp_path, prefix=prefix)
  loaded_cfg, loaded = load_hf_gpt2(tmp_path)
  assert loaded_cfg == cfg
  jax.tree.map(np.testing.assert_array_equal, split_model(loaded)[1], params)


def test_loader_reads_shards(tmp_path, mini):
  model = nnx.merge(*mini[1:3])
  tensors = _export_hf(model, tmp_path)
  (tmp_path / "model.safetensors").unlink()
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
  for file, keys in shards.items():
    save_file({k: tensors[k] for k in keys}, str(tmp_path / file))
  weight_map = {k: file for file, keys in shards.items() for k in keys}
  (tmp_path / "model.safetensors.index.json").write_text(
      json.dumps({"metadata": {}, "weight_map": weight_map}))
  _, loaded = load_hf_gpt2(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, split_model(loaded)[1], mini[2])


def test_loader_errors(tmp_path, mini):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    load_hf_gpt2(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_hf_gpt2(tmp_path)
  model = nnx.merge(*mini[1:3])
  tensors = _export_hf(model, tmp_path)

  (tmp_path / "model.safetensors").rename(tmp_path / "moved.safetensors")
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
    load_hf_gpt2(tmp_path)

  _export_hf(model, tmp_path, activation_function="gelu")
  with pytest.raises(ValueError, match="activation_function"):
    load_hf_gpt2(tmp_path)

  _export_hf(model, tmp_path, n_positions=64)  # tensors still hold 128
  with pytest.raises(ValueError, match=r"wpe\.weight has shape \(128, 64\)"):
    load_hf_gpt2(tmp_path)

  _export_hf(model, tmp_path)
  tensors["lm_head.weight"] = tensors["transformer.wte.weight"] + 1
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match="lm_head"):
    load_hf_gpt2(tmp_path)

  tensors["lm_head.weight"] = tensors["transformer.wte.weight"]  # tied: fine
  tensors["transformer.h.9.mlp.c_fc.weight"] = np.zeros((2, 2), np.float32)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match="unexpected"):
    load_hf_gpt2(tmp_path)
