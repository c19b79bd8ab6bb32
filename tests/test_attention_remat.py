"""Attention through jax.nn.dot_product_attention and rematerialised blocks
(config fields ``attention`` and ``remat``, GPT-2 and LLaMA): the same
function as the default path (logits, gradients, the factored engine's
sketches and book-keeping update), and remat actually freeing memory."""

import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dograph_jax import factored
from dograph_jax.models import build, get_config, sequence_loss, split_model, token_losses
from dograph_jax.models.gpt2 import (ATTENTION, REMAT, causal_dot_product_attention,
                                     cudnn_attention_applies)

B, T, V, K = 4, 16, 97, 64
# mini: LayerNorm, biases, position table, tied head; llama-mini: RMSNorm,
# RoPE, grouped-query attention (4 query heads on 2 key/value heads), untied
# lm_head (a tapped Linear).
NAMES = {"gpt2": "mini", "llama": "llama-mini"}


def _config(family, **fields):
  return get_config(NAMES[family], vocab_size=V, n_positions=32, **fields)


def _graphdef(family, **fields):
  return split_model(nnx.eval_shape(lambda: build(_config(family, **fields), nnx.Rngs(0))))[0]


@functools.cache
def _setup(family):
  """Default graphdef, parameters moved off their init, tokens ``(B, T + 1)``."""
  graphdef, params = split_model(build(_config(family), nnx.Rngs(0)))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree.unflatten(treedef, [p + 0.05 * jax.random.normal(k, p.shape)
                                        for p, k in zip(leaves, keys)])
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, V, (B, T + 1)), jnp.int32)
  return graphdef, params, tokens


def _rel(a, b):
  return float(jnp.linalg.norm(jnp.ravel(a - b)) / jnp.linalg.norm(jnp.ravel(b)))


def _assert_trees_close(got, want, tol=1e-5):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for path_x, y in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    path, x = path_x
    assert x.shape == y.shape and x.dtype == y.dtype, path
    assert _rel(x, y) <= tol, (jax.tree_util.keystr(path), _rel(x, y))


def _model_fn(model, tokens):
  return token_losses(model(tokens[:, :-1]), tokens[:, 1:]).mean(1)


def _reference_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK):
  """The models' "xla" path (llama.Attention's, GQA): float32 scores and softmax."""
  b, t, h, k = q_BxTxHxK.shape
  g = k_BxSxGxK.shape[2]
  q = q_BxTxHxK.reshape(b, t, g, h // g, k)
  scores = jnp.einsum("btgrk,bsgk->bgrts", q, k_BxSxGxK,
                      preferred_element_type=jnp.float32) / np.sqrt(k)
  scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1).astype(q_BxTxHxK.dtype)
  return jnp.einsum("bgrts,bsgk->btgrk", probs, v_BxSxGxK).reshape(b, t, h, k)


# ------------------------------------------------------------------ config --

def test_defaults_and_validation():
  assert set(ATTENTION) == {"xla", "dot_product", "cudnn"}
  assert set(REMAT) == {"none", "block", "dots"}
  for name in ("mini", "llama-mini", "gpt2", "tinyllama-1.1b"):
    config = get_config(name)
    assert (config.attention, config.remat) == ("xla", "none")  # today's path
    with pytest.raises(ValueError, match="attention must be one of"):
      get_config(name, attention="flash")
    with pytest.raises(ValueError, match="remat must be one of"):
      get_config(name, remat="full")


# --------------------------------------------------------------- attention --

@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
def test_dot_product_attention_equals_reference_on_random_inputs(heads, kv_heads):
  kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(kq, (3, 11, heads, 8))
  k = jax.random.normal(kk, (3, 11, kv_heads, 8))
  v = jax.random.normal(kv, (3, 11, kv_heads, 8))
  cot = jax.random.normal(kd, q.shape)

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v) * cot)

  fused = jax.jit(functools.partial(causal_dot_product_attention, attention="dot_product"))
  reference = jax.jit(_reference_attention)
  np.testing.assert_allclose(fused(q, k, v), reference(q, k, v), rtol=1e-5, atol=1e-6)
  got = jax.jit(jax.grad(loss(fused), argnums=(0, 1, 2)))(q, k, v)
  want = jax.jit(jax.grad(loss(reference), argnums=(0, 1, 2)))(q, k, v)
  _assert_trees_close(got, want)
  # bfloat16 operands: float32 scores and softmax in both, the probabilities
  # rounded to bfloat16 before the product with v in both.
  q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
  out16 = fused(q16, k16, v16)
  assert out16.dtype == jnp.bfloat16
  ref16 = reference(q16, k16, v16)
  assert float(jnp.max(jnp.abs(out16.astype(jnp.float32) - ref16.astype(jnp.float32)))) <= 2e-2


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_model_with_dot_product_attention_equals_default(family):
  graphdef, params, tokens = _setup(family)
  fused = _graphdef(family, attention="dot_product")

  @functools.partial(jax.jit, static_argnums=0)
  def logits_and_grads(gd, p):
    def loss(q):
      logits = nnx.merge(gd, q)(tokens[:, :-1])
      return token_losses(logits, tokens[:, 1:]).mean(), logits
    return jax.grad(loss, has_aux=True)(p)

  want_grads, want_logits = logits_and_grads(graphdef, params)
  got_grads, got_logits = logits_and_grads(fused, params)
  np.testing.assert_allclose(got_logits, want_logits, rtol=1e-5, atol=1e-5)
  _assert_trees_close(got_grads, want_grads)


def test_bfloat16_model_with_dot_product_attention_is_close_to_default():
  _, params, tokens = _setup("llama")
  forward = jax.jit(lambda gd, p: nnx.merge(gd, p)(tokens[:, :-1]), static_argnums=0)
  want = forward(_graphdef("llama", dtype=jnp.bfloat16), params)
  got = forward(_graphdef("llama", dtype=jnp.bfloat16, attention="dot_product"), params)
  assert got.dtype == want.dtype == jnp.float32
  assert _rel(got, want) <= 2e-2


def test_cudnn_is_chosen_only_where_it_applies():
  assert "float32" in cudnn_attention_applies(jnp.float32, 64)
  if jax.default_backend() == "gpu":
    pytest.skip("the CPU-only errors below")
  assert "backend" in cudnn_attention_applies(jnp.bfloat16, 64)
  graphdef, params, tokens = _setup("gpt2")
  for dtype in (jnp.float32, jnp.bfloat16):
    model = nnx.merge(_graphdef("gpt2", attention="cudnn", dtype=dtype), params)
    with pytest.raises(ValueError, match="cuDNN flash attention does not apply"):
      model(tokens[:, :-1])


# ------------------------------------------------------------------- remat --

def _run(graphdef, params, tokens, update="bookkeeping"):
  """Everything the factored engine gives and the plain gradient, one jit.
  (The update with samples left out reads the same stored tensors as the
  one with all kept; tests/test_factored.py covers it.)"""
  a = jnp.linspace(0.5, 2.0, B).at[1].set(0.0)

  @jax.jit
  def run(p, t):
    f = factored.factored_grads(_model_fn, graphdef, p, t, jax.random.PRNGKey(5), K,
                                update=update, per_block=True)
    plain = jax.grad(lambda q: jnp.mean(jax.vmap(sequence_loss, (None, None, 0))(
        graphdef, q, t)))(p)
    return f.losses, f.sketches, f.blocks, f.weighted_grad(a), plain

  return run(params, tokens)


@functools.cache
def _reference(family, update):
  graphdef, params, tokens = _setup(family)
  return _run(graphdef, params, tokens, update)


@pytest.mark.parametrize("family,remat,attention,update", [
    ("gpt2", "block", "xla", "bookkeeping"),
    ("gpt2", "dots", "xla", "bookkeeping"),
    ("llama", "block", "xla", "bookkeeping"),
    ("llama", "dots", "xla", "bookkeeping"),
    ("llama", "dots", "dot_product", "second_backward"),
])
def test_factored_sketches_and_update_equal_with_and_without_remat(family, remat, attention,
                                                                   update):
  _, params, tokens = _setup(family)
  graphdef = _graphdef(family, remat=remat, attention=attention)
  # the remat is in the program (a checkpoint per block), not silently skipped
  jaxpr = str(jax.make_jaxpr(lambda p: jax.grad(lambda q: jnp.sum(
      _model_fn(nnx.merge(graphdef, q), tokens)))(p))(params))
  assert jaxpr.count("remat") == _config(family).n_layer
  got = _run(graphdef, params, tokens, update)
  want = _reference(family, update)
  losses, sketches, blocks, update, plain = got
  np.testing.assert_allclose(losses, want[0], rtol=1e-6)
  assert _rel(sketches, want[1]) <= 1e-5
  assert set(blocks) == set(want[2])
  for name in blocks:
    assert _rel(blocks[name], want[2][name]) <= 1e-5, name
  _assert_trees_close(update, want[3])
  _assert_trees_close(plain, want[4])


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, jax, jax.numpy as jnp
    from flax import nnx
    from dograph_jax import factored
    from dograph_jax.models import build, get_config, split_model, token_losses
    out = {}
    for remat in ("none", "block"):
      cfg = get_config("mini", vocab_size=97, n_positions=64, n_layer=3, remat=remat)
      gd, params = split_model(nnx.eval_shape(lambda: build(cfg, nnx.Rngs(0))))
      fn = lambda m, t: token_losses(m(t[:, :-1]), t[:, 1:]).mean(1)
      step = jax.jit(lambda p, t: (lambda f: (f.sketches, f.weighted_grad(jnp.ones(8))))(
          factored.factored_grads(fn, gd, p, t, jax.random.PRNGKey(0), 64)))
      compiled = step.lower(params, jax.ShapeDtypeStruct((8, 65), jnp.int32)).compile()
      out[remat] = compiled.memory_analysis().temp_size_in_bytes
    print(json.dumps(out))
""")


def test_remat_frees_memory_in_the_factored_engine():
  """Compiled temporaries of the factored step (sketches and book-keeping
  update), mini at 3 layers, with and without remat. XLA:CPU undoes remat
  (its ``cse_barrier_expander`` pass removes the optimisation barriers that
  keep the recomputation apart, then CSE merges it back into the forward
  pass), so the memory is measured with that pass disabled, as a GPU
  compiler keeps them."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "")
                       + " --xla_disable_hlo_passes=cse_barrier_expander").strip()}
  result = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], env=env, check=True,
                          capture_output=True, text=True, timeout=600)
  temp = json.loads(result.stdout.strip().splitlines()[-1])
  assert temp["block"] < 0.75 * temp["none"], temp
