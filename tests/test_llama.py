"""The LLaMA family: logits against transformers' PyTorch LlamaForCausalLM
(GQA, tied and untied heads, Llama 3 RoPE scaling, the full context), the
factored engine on it against vmap(grad), and the trainer end to end."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dograph_jax as dg
from dograph_jax import factored
from dograph_jax.models import (CONFIGS, Llama, build, count_params, get_config, load_hf_llama,
                                param_count, sequence_loss, split_model, token_losses)
from dograph_jax.models.llama import LLAMA_CONFIGS

CTX = 48


def _hf_model(tmp_path, *, tied, scaling):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CTX,
      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tied,
      rope_scaling=({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
                    if scaling else None))
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():  # norms off their init of 1, so their weights matter
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  out = tmp_path / ("tied" if tied else "untied")
  # the untied model in shards (model.safetensors.index.json), as large checkpoints come
  model.save_pretrained(out, safe_serialization=True,
                        **({} if tied else {"max_shard_size": "40KB"}))
  assert (out / "model.safetensors.index.json").exists() != tied
  return torch, model, out


@pytest.mark.parametrize("tied,scaling", [(False, False), (True, True)])
def test_logits_match_transformers(tmp_path, tied, scaling):
  torch, hf, path = _hf_model(tmp_path, tied=tied, scaling=scaling)
  config, model = load_hf_llama(path)
  assert config.tie_embeddings == tied and config.n_kv_head == 2
  assert (config.rope_scaling is not None) == scaling
  tokens = np.random.default_rng(0).integers(0, 101, (2, CTX))  # the full context
  with torch.no_grad():
    want = hf(torch.tensor(tokens)).logits.numpy()
  got = np.asarray(model(jnp.asarray(tokens)))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  # The same weights through jax.nn.dot_product_attention (K/V heads as they are).
  _, params = split_model(model)
  fused, _ = split_model(nnx.eval_shape(lambda: build(dataclasses.replace(
      config, attention="dot_product"), nnx.Rngs(0))))
  got = np.asarray(jax.jit(lambda p, t: nnx.merge(fused, p)(t))(params, jnp.asarray(tokens)))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  assert count_params(split_model(model)[1]) == param_count(config) == sum(
      p.numel() for p in hf.parameters())


def test_named_configs():
  for name, c in LLAMA_CONFIGS.items():
    assert CONFIGS[name] is c
  tiny = get_config("tinyllama-1.1b")
  assert (tiny.n_layer, tiny.d_model, tiny.d_ff, tiny.n_head, tiny.n_kv_head,
          tiny.vocab_size, tiny.n_positions) == (22, 2048, 5632, 32, 4, 32000, 2048)
  assert abs(param_count(tiny) - 1.1e9) < 0.01e9  # 1,100,048,384
  big = get_config("llama-3.2-3b")
  assert (big.n_layer, big.d_model, big.d_ff, big.n_head, big.n_kv_head, big.vocab_size,
          big.tie_embeddings, big.rope_theta) == (28, 3072, 8192, 24, 8, 128256, True, 5e5)
  assert abs(param_count(big) - 3.21e9) < 0.01e9
  with pytest.raises(ValueError, match="must divide"):
    get_config("llama-mini", n_kv_head=3)


B, T, V, K = 5, 12, 83, 64


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def setup(request):
  cfg = get_config("llama-mini", vocab_size=V, n_positions=32, tie_embeddings=request.param)
  graphdef, params = split_model(build(cfg, nnx.Rngs(0)))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree.unflatten(treedef, [p + 0.05 * jax.random.normal(k, p.shape)
                                        for p, k in zip(leaves, keys)])
  tokens = jax.random.randint(jax.random.PRNGKey(2), (B, T + 1), 0, V)
  losses, grads = dg.per_sample_loss_and_grads(
      lambda p, t: sequence_loss(graphdef, p, t), params, tokens)
  return graphdef, params, tokens, losses, grads


def _model_fn(model, tokens):
  return token_losses(model(tokens[:, :-1]), tokens[:, 1:]).mean(1)


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_factored_sketch_equals_kronecker_sketch_of_vmap_grad(setup):
  graphdef, params, tokens, losses, grads = setup
  key = jax.random.PRNGKey(5)
  fast_losses, fast_sketches, blocks = jax.jit(lambda p, t: (lambda f: (
      f.losses, f.sketches, f.blocks))(factored.factored_grads(
          _model_fn, graphdef, p, t, key, K, per_block=True)))(params, tokens)
  np.testing.assert_allclose(fast_losses, losses, rtol=1e-5)
  assert _rel(fast_sketches, dg.sketch(grads, key, K, kind="kronecker")) <= 1e-5
  names = set(blocks)
  assert "h/0/input_layernorm/scale" in names and "wte/embedding" in names
  assert ("lm_head" in names) == ("lm_head" in params)
  # every parameter is in exactly one block (RMSNorm scales included)
  n_leaves = len(jax.tree.leaves(params))
  assert len(names) == n_leaves


@pytest.mark.parametrize("update", ["bookkeeping", "second_backward"])
def test_factored_update_equals_grad_of_weighted_loss(setup, update):
  graphdef, params, tokens, _, _ = setup
  a = jax.random.uniform(jax.random.PRNGKey(3), (B,)).at[1].set(0.0)
  for keep in (None, jnp.ones((B,), bool)):
    got = jax.jit(lambda p, t, a: factored.factored_grads(
        _model_fn, graphdef, p, t, jax.random.PRNGKey(0), K, update=update).weighted_grad(
            a, keep))(params, tokens, a)
    want = jax.grad(lambda p: jnp.sum(a * jax.vmap(sequence_loss, in_axes=(None, None, 0))(
        graphdef, p, tokens)))(params)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert _rel(x, y) <= 1e-5


@pytest.mark.parametrize("tied", [False, True])
def test_export_round_trip_through_transformers(tmp_path, tied):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from dograph_jax.models.export import export_hf
  cfg = get_config("llama-mini", vocab_size=V, n_positions=32, tie_embeddings=tied,
                   rope_scaling=LLAMA_CONFIGS["llama-3.2-1b"].rope_scaling if tied else None)
  model = build(cfg, nnx.Rngs(3))
  graphdef, params = split_model(model)
  export_hf(cfg, params, tmp_path / "hf")
  hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"),
                                                     local_files_only=True).eval()
  tokens = np.random.default_rng(1).integers(0, V, (2, 32))
  with torch.no_grad():
    want = hf(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), want, atol=1e-4, rtol=1e-4)
  back_cfg, back = load_hf_llama(tmp_path / "hf")
  assert back_cfg.tie_embeddings == tied and back_cfg.rope_scaling == cfg.rope_scaling
  for x, y in zip(jax.tree.leaves(split_model(back)[1]), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_pretrain_llama_with_a_local_llama_style_tokenizer(tmp_path):
  """--tokenizer DIR with a LLaMA-style tokenizer (<s> BOS added by its
  post-processor, </s> EOS): documents are packed without the BOS and end in
  the EOS, and a DoGraph run on llama-mini trains and evaluates."""
  from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast

  from dograph_jax.data import write_synthetic_corpus
  from dograph_jax.train import pretrain, single_run
  from dograph_jax.train import config

  corpus = write_synthetic_corpus(tmp_path / "corpus", seed=2, total_docs=150)
  texts = [json.loads(line)["text"] for f in sorted((corpus / "train").glob("*.jsonl"))
           for line in f.read_text().splitlines()]
  backend = Tokenizer(models.BPE(unk_token="<unk>"))
  backend.pre_tokenizer = pre_tokenizers.Metaspace()
  backend.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
  backend.post_processor = processors.TemplateProcessing(
      single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))])
  tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                unk_token="<unk>")
  assert tok.encode("legal clause")[0] == tok.bos_token_id  # as LLaMA's does by default
  tok.save_pretrained(str(tmp_path / "tok"))
  cfg = config.make_config(data_dir=str(corpus), tokenizer=str(tmp_path / "tok"), model="llama-mini",
                    method="dograph", num_domains=3, sketch_dim=64, steps=3, batch_size=8,
                    seq_len=32, eval_rows=8, plots=False, out_dir=str(tmp_path / "run"))
  data = single_run.load_data(cfg)
  rows = next(data.train_iter)["tokens"]
  assert data.vocab_size == len(tok)
  assert (rows == tok.eos_token_id).any() and not (rows == tok.bos_token_id).any()
  summary = pretrain.train(cfg)
  assert np.isfinite(list(summary["val_loss"].values())).all()
  assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").exists()


def test_bfloat16_compute_is_close_to_float32():
  cfg = get_config("llama-mini", vocab_size=V, n_positions=32)
  model = build(cfg, nnx.Rngs(0))
  _, params = split_model(model)
  low = get_config("llama-mini", vocab_size=V, n_positions=32, dtype=jnp.bfloat16)
  graph_low, _ = split_model(nnx.eval_shape(lambda: build(low, nnx.Rngs(0))))
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 32), 0, V)
  want = model(tokens)
  got = nnx.merge(graph_low, params)(tokens)
  assert got.dtype == jnp.float32
  assert _rel(got, want) < 0.03
