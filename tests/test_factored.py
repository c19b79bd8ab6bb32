"""The factored engine against its oracles: the "kronecker" sketch of
vmap(grad) per-sample gradients, jax.grad of the weighted loss, and the
reference-path DoGraph step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dograph_jax as dg
from dograph_jax import factored, projection
from dograph_jax.models import GPT2, get_config, sequence_loss, split_model, token_losses

B, T, V, K = 6, 16, 97, 64


def _model_fn(model, tokens):
  return token_losses(model(tokens[:, :-1]), tokens[:, 1:]).mean(1)


def _setup(dtype=jnp.float32, seed=0):
  cfg = get_config("mini", vocab_size=V, n_positions=32, dtype=dtype)
  graphdef, params = split_model(GPT2(cfg, rngs=nnx.Rngs(seed)))
  # Move every parameter off its init (LayerNorm 1/0, zero biases) so that
  # every block's gradient and sketch is generic.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  params = jax.tree.unflatten(treedef, [p + 0.05 * jax.random.normal(k, p.shape)
                                        for p, k in zip(leaves, keys)])
  tokens = jax.random.randint(jax.random.PRNGKey(seed + 2), (B, T + 1), 0, V)
  return graphdef, params, tokens


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _tree_rel(a, b):
  num = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  return (num / sum(float(jnp.sum(y ** 2)) for y in jax.tree.leaves(b))) ** 0.5


@pytest.fixture(scope="module")
def setup():
  graphdef, params, tokens = _setup()
  losses, grads = dg.per_sample_loss_and_grads(
      lambda p, t: sequence_loss(graphdef, p, t), params, tokens)
  return graphdef, params, tokens, losses, grads


def _block_of(path):
  """Block name of a parameter path, as factored_grads names them."""
  names = [str(getattr(k, "key", k)) for k in path]
  if names[-1] in ("kernel", "bias") and names[-2] not in ("ln_1", "ln_2", "ln_f"):
    return "/".join(names[:-1])  # a linear layer: kernel and bias together
  return "/".join(names)


def test_sketch_equals_kronecker_sketch_of_per_sample_grads_per_block(setup):
  graphdef, params, tokens, losses, grads = setup
  key = jax.random.PRNGKey(5)
  fast_losses, fast_sketches, fast_blocks = jax.jit(lambda p, t: (lambda f: (
      f.losses, f.sketches, f.blocks))(factored.factored_grads(
          _model_fn, graphdef, p, t, key, K, per_block=True)))(params, tokens)
  np.testing.assert_allclose(fast_losses, losses, rtol=1e-5)
  assert _rel(fast_sketches, dg.sketch(grads, key, K, kind="kronecker")) <= 1e-5
  flat, treedef = jax.tree_util.tree_flatten_with_path(grads)
  blocks = {}
  for i, (path, _) in enumerate(flat):
    blocks.setdefault(_block_of(path), []).append(i)
  assert set(blocks) == set(fast_blocks)
  for name, members in blocks.items():
    only = jax.tree.unflatten(treedef, [g if i in members else jnp.zeros_like(g)
                                        for i, (_, g) in enumerate(flat)])
    ref = dg.sketch(only, key, K, kind="kronecker")
    assert _rel(fast_blocks[name], ref) <= 1e-5, name


def test_normalize_blocks_sums_unit_norm_block_sketches(setup):
  """Both engines with ``normalize_blocks``: the sum over blocks of each
  block's reference sketch scaled (in numpy) to unit norm per sample."""
  graphdef, params, tokens, _, grads = setup
  key = jax.random.PRNGKey(5)
  flat, treedef = jax.tree_util.tree_flatten_with_path(grads)
  blocks = {}
  for i, (path, _) in enumerate(flat):
    blocks.setdefault(_block_of(path), []).append(i)
  want = np.zeros((B, K))
  for members in blocks.values():
    only = jax.tree.unflatten(treedef, [g if i in members else jnp.zeros_like(g)
                                        for i, (_, g) in enumerate(flat)])
    z = np.asarray(dg.sketch(only, key, K, kind="kronecker"), np.float64)
    want += z / np.linalg.norm(z, axis=1, keepdims=True)
  fast = jax.jit(lambda p, t: factored.factored_grads(
      _model_fn, graphdef, p, t, key, K, normalize_blocks=True).sketches)(params, tokens)
  ref = dg.sketch(grads, key, K, kind="kronecker", normalize_blocks=True)
  assert _rel(ref, want) <= 1e-5
  assert _rel(fast, want) <= 1e-5
  assert _rel(fast, dg.sketch(grads, key, K, kind="kronecker")) > 0.1  # it does change them


def test_unit_rows_keeps_zero_and_nonfinite_rows():
  z = jnp.array([[3.0, 4.0], [0.0, 0.0], [jnp.nan, 1.0], [3e-30, 4e-30], [3e30, -4e30],
                 [jnp.inf, 1.0]])
  got = np.asarray(projection.unit_rows(z))
  np.testing.assert_allclose(got[[0, 3]], [[0.6, 0.8]] * 2, rtol=1e-6)  # no underflow
  np.testing.assert_allclose(got[4], [0.6, -0.8], rtol=1e-6)  # no overflow
  np.testing.assert_array_equal(got[1], [0.0, 0.0])
  assert not np.isfinite(got[2]).all() and not np.isfinite(got[5]).all()


@pytest.mark.parametrize("keep", [None, "all"])
@pytest.mark.parametrize("update", ["bookkeeping", "second_backward"])
def test_weighted_grad_equals_grad_of_weighted_loss(setup, update, keep):
  """keep=None: sample 2 (a = 0) is left out (the sample-by-sample branch);
  keep="all": every sample kept (the one-product-per-layer branch)."""
  graphdef, params, tokens, _, _ = setup
  a = jax.random.uniform(jax.random.PRNGKey(3), (B,)).at[2].set(0.0)
  keep_B = None if keep is None else jnp.ones((B,), bool)
  got = jax.jit(lambda p, t, a: factored.factored_grads(
      _model_fn, graphdef, p, t, jax.random.PRNGKey(0), K, update=update).weighted_grad(
          a, keep_B))(params, tokens, a)
  want = jax.grad(lambda p: jnp.sum(a * jax.vmap(sequence_loss, in_axes=(None, None, 0))(
      graphdef, p, tokens)))(params)
  assert _tree_rel(got, want) <= 1e-5
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert _rel(x, y) <= 1e-5


def test_kronecker_kind_folds_linear_bias():
  g = {"lin": {"kernel": jax.random.normal(jax.random.PRNGKey(0), (3, 9, 7)),
               "bias": jax.random.normal(jax.random.PRNGKey(1), (3, 7))}}
  key = jax.random.PRNGKey(2)
  z = dg.sketch(g, key, 12, kind="kronecker")
  # Leaves flatten as [bias, kernel]: the block is keyed by the kernel (1).
  p_in, p_out = projection.kronecker_factors(projection.leaf_key(key, 1), 10, 7, 12)
  stacked = np.concatenate([np.asarray(g["lin"]["kernel"]), np.asarray(g["lin"]["bias"])[:, None]], 1)
  want = np.einsum("bio,ia,oc->bac", stacked, p_in, p_out).reshape(3, 12)
  np.testing.assert_allclose(z, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("objective", ["uncertainty", "robust"])
@pytest.mark.parametrize("update", ["bookkeeping", "second_backward"])
def test_fast_transform_step_equals_reference_step(setup, objective, update):
  graphdef, params, tokens, losses, grads = setup
  seed = 3
  # The DoGraph update itself (an optimizer after it, e.g. Adam's first
  # step g / |g|, would magnify float32 round-off in near-zero coordinates).
  tx = dg.dograph_transform(3, K, objective, seed=seed, sketch_kind="kronecker", batch_size=B)
  state = tx.init(params)
  ref_u, ref_s = jax.jit(lambda g, l: tx.update(g, state, params, losses=l))(grads, losses)

  def fast_step(p, t):
    fg = factored.factored_grads(_model_fn, graphdef, p, t, dg.projection_key(seed), K,
                                 update=update)
    return tx.update(fg, state, p)

  fast_u, fast_s = jax.jit(fast_step)(params, tokens)
  np.testing.assert_array_equal(fast_s.assignments, ref_s.assignments)
  np.testing.assert_allclose(fast_s.applied_weights, ref_s.applied_weights, rtol=1e-5)
  assert _tree_rel(fast_u, ref_u) <= 1e-5


def test_bfloat16_compute():
  """bfloat16 activations, float32 sketch accumulation.

  Tolerance: every bfloat16 rounding has relative error <= 2^-9; the sketch
  and update are built from activations X and output-gradients D that went
  through ~2 roundings per layer forward and backward (2 blocks here, a
  dozen roundings in all), so a relative error below 2^-5 (3%) is expected
  (measured 0.6-0.9%); the sketches' directions, which K-means uses, agree
  to a cosine above 0.999. An error of exactly 0 would mean bfloat16 was not
  used."""
  graphdef32, params, tokens = _setup(jnp.float32, seed=4)
  graphdef16, _, _ = _setup(jnp.bfloat16, seed=4)
  a = jax.random.uniform(jax.random.PRNGKey(3), (B,))
  run = lambda g: factored.factored_grads(_model_fn, g, params, tokens,
                                          jax.random.PRNGKey(5), 256)
  f32, f16 = run(graphdef32), run(graphdef16)
  rel = jnp.linalg.norm(f16.sketches - f32.sketches, axis=1) / jnp.linalg.norm(f32.sketches, axis=1)
  assert 0 < float(rel.max()) < 2 ** -5
  cos = jnp.sum(f16.sketches * f32.sketches, 1) / (
      jnp.linalg.norm(f16.sketches, axis=1) * jnp.linalg.norm(f32.sketches, axis=1))
  assert float(cos.min()) > 0.999
  assert 0 < _tree_rel(f16.weighted_grad(a), f32.weighted_grad(a)) < 2 ** -5
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(f16.weighted_grad(a)))


@pytest.mark.parametrize("update", ["bookkeeping", "second_backward"])
def test_nonfinite_sample_in_fast_path(setup, update):
  """A token id outside the vocabulary gives that sequence NaN logits."""
  graphdef, params, tokens, _, _ = setup
  bad = tokens.at[1, 4].set(V + 5)
  tx = dg.dograph_transform(3, K, batch_size=B, sketch_kind="kronecker")
  fg_fn = lambda p, t: factored.factored_grads(_model_fn, graphdef, p, t,
                                               dg.projection_key(0), K, update=update)
  u, s = jax.jit(lambda p, t: tx.update(fg_fn(p, t), tx.init(p), p))(params, bad)
  assert int(s.nonfinite) == 1 and float(s.coefficients[1]) == 0.0
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(u))
  if update == "bookkeeping":  # the other samples' update, exactly
    a = s.coefficients
    want = jax.grad(lambda p: jnp.sum(jnp.where(a > 0, a, 0) * jax.vmap(
        sequence_loss, in_axes=(None, None, 0))(graphdef, p, jnp.where(
            (jnp.arange(B) == 1)[:, None], tokens, bad))))(params)
    assert _tree_rel(u, want) <= 1e-5
  else:  # a second backward cannot leave the sample out: the step is skipped
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))


def test_bookkeeping_leaves_out_samples_not_kept(setup):
  """A non-finite sample with a nonzero coefficient: keep_B alone leaves it
  out; without it the update is NaN (so the mask is what is tested)."""
  graphdef, params, tokens, _, _ = setup
  bad = tokens.at[1, 4].set(V + 5)  # NaN logits for sample 1
  a = jax.random.uniform(jax.random.PRNGKey(7), (B,)) + 0.1
  keep = jnp.arange(B) != 1
  fg = jax.jit(lambda p, t, a, k: factored.factored_grads(
      _model_fn, graphdef, p, t, jax.random.PRNGKey(0), K).weighted_grad(a, k))
  got = fg(params, bad, a, keep)
  want = jax.grad(lambda p: jnp.sum(jnp.where(keep, a, 0.0) * jax.vmap(
      sequence_loss, in_axes=(None, None, 0))(graphdef, p, jnp.where(
          keep[:, None], bad, tokens))))(params)
  assert _tree_rel(got, want) <= 1e-5
  unmasked = fg(params, bad, a, jnp.ones((B,), bool))
  assert not all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(unmasked))


def _dot_generals(jaxpr):
  """Every dot_general of a jaxpr, its sub-jaxprs (cond, loops, pjit) included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
          yield from _dot_generals(getattr(sub, "jaxpr", sub))


def test_bfloat16_products_keep_bfloat16_operands():
  """With bfloat16 compute, every linear layer's sketch products and its
  book-keeping product multiply bfloat16 operands into float32 (so that a GPU
  uses its bfloat16 tensor cores); none asks for HIGHEST precision."""
  graphdef16, params, tokens = _setup(jnp.bfloat16, seed=4)
  n_linear = 4 * get_config("mini").n_layer  # c_attn, c_proj, c_fc, mlp c_proj
  fg = factored.factored_grads(_model_fn, graphdef16, params, tokens, jax.random.PRNGKey(5), K)
  kept = jax.make_jaxpr(lambda a: fg.weighted_grad(a, jnp.ones((B,), bool)))(
      jnp.ones((B,), jnp.float32))
  # Only the all-kept branch: the book-keeping's first cond branch is the
  # sample-by-sample one (lax.cond lists the false branch first).
  cond = [e for e in kept.jaxpr.eqns if e.primitive.name == "cond"]
  assert len(cond) == 1
  dots = list(_dot_generals(cond[0].params["branches"][1].jaxpr))
  bf16 = [e for e in dots if all(v.aval.dtype == jnp.bfloat16 for v in e.invars)]
  assert len(bf16) == n_linear
  assert all(e.params["preferred_element_type"] == jnp.float32 for e in bf16)
  sketch = jax.make_jaxpr(lambda p, t: factored.factored_grads(
      _model_fn, graphdef16, p, t, jax.random.PRNGKey(5), K).sketches)(params, tokens)
  dots = list(_dot_generals(sketch.jaxpr))
  # x P_in and D P_out of every linear layer (and of the embeddings' D).
  assert sum(all(v.aval.dtype == jnp.bfloat16 for v in e.invars)
             and e.params["preferred_element_type"] == jnp.float32 for e in dots) >= 2 * n_linear
  # The large products (an operand of at least B x T x width) at default
  # precision; HIGHEST is left to the small products of projected factors.
  big = [e for e in dots if max(v.aval.size for v in e.invars) >= B * T * 64]
  assert big and all(e.params["precision"] is None for e in big)


def test_sketch_dimension_mismatch_raises(setup):
  graphdef, params, tokens, _, _ = setup
  tx = dg.dograph_transform(3, 32)
  fg = factored.factored_grads(_model_fn, graphdef, params, tokens, jax.random.PRNGKey(0), K)
  with pytest.raises(ValueError, match="sketch_dim"):
    tx.update(fg, tx.init(params), params)
