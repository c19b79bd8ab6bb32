"""dograph_transform in the literal per-batch mode (``domains="batch"``,
Euclidean K-means: the behaviour of the project's first versions): the update
identity, optax contracts, misuse, degenerate input. The persistent mode has
its own tests in ``test_persistent.py``."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dograph_jax as dg

B = 16


def _literal(*args, **kwargs):
  return dg.dograph_transform(*args, **{"domains": "batch", "distance": "euclidean", **kwargs})


def _params():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  return {"l1": {"w": jax.random.normal(k1, (5, 8)) * 0.5, "b": jnp.zeros(8)},
          "l2": {"w": jax.random.normal(k2, (8, 3)) * 0.5, "b": jnp.zeros(3)}}


def _loss(params, example):
  x, y = example
  h = jnp.tanh(x @ params["l1"]["w"] + params["l1"]["b"])
  logits = h @ params["l2"]["w"] + params["l2"]["b"]
  return -jax.nn.log_softmax(logits)[y]


def _batch(seed=1, b=B):
  kx, ky = jax.random.split(jax.random.PRNGKey(seed))
  # Two input regimes so that there is cluster structure.
  x = jax.random.normal(kx, (b, 5)) + jnp.where(jnp.arange(b)[:, None] % 2, 3.0, -3.0)
  return x, jax.random.randint(ky, (b,), 0, 3)


def _per_sample(params, batch):
  return dg.per_sample_loss_and_grads(_loss, params, batch)


@pytest.mark.parametrize("objective", dg.OBJECTIVES)
def test_update_is_weighted_loss_gradient(objective):
  """sum_j w_j mu_j == grad(sum_i a_i l_i) and == the NumPy domain sum."""
  params, batch = _params(), _batch()
  losses, grads = _per_sample(params, batch)
  tx = _literal(4, 64, objective, batch_size=B, lambda_graph=0.1)
  update, state = jax.jit(lambda g, s, l: tx.update(g, s, params, losses=l))(
      grads, tx.init(params), losses)
  a = state.coefficients
  weighted = jax.grad(lambda p: jnp.sum(jax.lax.stop_gradient(a) * jax.vmap(
      _loss, in_axes=(None, 0))(p, batch)))(params)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7),
               update, weighted)
  w, assign = np.asarray(state.applied_weights), np.asarray(state.assignments)
  np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-6)
  for leaf_u, leaf_g in zip(jax.tree.leaves(update), jax.tree.leaves(grads)):
    g = np.asarray(leaf_g, np.float64)
    expected = sum(w[j] * g[assign == j].mean(0) for j in range(4) if (assign == j).any())
    np.testing.assert_allclose(leaf_u, expected, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(state.counts, np.bincount(assign, minlength=4))


def test_in_a_chain_with_clip_and_adamw():
  params, batch = _params(), _batch()
  losses, grads = _per_sample(params, batch)
  tx = optax.chain(_literal(4, 32, "robust"),
                   optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.01))
  state = tx.init(params)
  updates, state = jax.jit(lambda g, s: tx.update(g, s, params, losses=losses))(grads, state)
  new = optax.apply_updates(params, updates)
  assert jax.tree.structure(new) == jax.tree.structure(params)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(new))
  assert int(state[0].count) == 1


def test_init_on_shape_dtype_structs():
  params = _params()
  tx = _literal(4, 32, batch_size=B, buffer_size=8)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  s1, s2 = tx.init(abstract), tx.init(params)
  assert jax.tree.structure(s1) == jax.tree.structure(s2)
  for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
    assert a.shape == b.shape and a.dtype == b.dtype
  shapes = jax.eval_shape(tx.init, abstract)
  assert shapes.centroids.shape == (4, 32) and shapes.buffer.shape == (8, 32)
  assert shapes.assignments.shape == (B,)


def test_no_recompilation_and_stable_state_under_cond():
  params = _params()
  tx = _literal(4, 32, batch_size=B, ema=0.5)
  traces = []

  @jax.jit
  def step(grads, state):
    traces.append(1)
    return tx.update(grads, state, params)

  state = tx.init(params)
  for seed in range(3):
    _, grads = _per_sample(params, _batch(seed))
    _, state = step(grads, state)
  assert len(traces) == 1
  assert int(state.count) == 3

  _, grads = _per_sample(params, _batch(7))
  for pred in (True, False):
    out = jax.lax.cond(pred, lambda s: tx.update(grads, s, params)[1], lambda s: s, state)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(state)):
      assert a.shape == b.shape and a.dtype == b.dtype


def test_inject_hyperparams_changes_value_without_recompiling():
  params, batch = _params(), _batch()
  losses, grads = _per_sample(params, batch)
  make = optax.inject_hyperparams(dg.dograph_transform, static_args=dg.STATIC_ARGS)
  tx = make(num_domains=4, sketch_dim=32, objective="robust", temperature=1.0,
            lambda_graph=0.0, batch_size=B, domains="batch", distance="euclidean")
  traces = []

  @jax.jit
  def step(state):
    traces.append(1)
    return tx.update(grads, state, params, losses=losses)

  state = tx.init(params)
  u1, s1 = step(state)
  # Same dtype, not weakly typed, as inject_hyperparams stores it.
  state.hyperparams["temperature"] = jnp.asarray(0.05, jnp.float32)
  u2, s2 = step(state)
  assert len(traces) == 1
  w1, w2 = s1.inner_state.raw_weights, s2.inner_state.raw_weights
  assert not np.allclose(w1, w2)  # the new temperature took effect
  # ... and it is the robust closed form at that temperature, computed in
  # NumPy from the step's own clusters: w_j ∝ exp(L_j / tau) over the present
  # domains (L_j the cluster's mean loss), a_i = w_j / n_j, update sum_i a_i g_i.
  assign = np.asarray(s2.inner_state.assignments)
  l64 = np.asarray(losses, np.float64)
  present = np.bincount(assign, minlength=4) > 0
  mean_loss = np.array([l64[assign == j].mean() if present[j] else -np.inf for j in range(4)])
  e = np.exp((mean_loss - mean_loss[present].max()) / 0.05) * present
  np.testing.assert_allclose(w2, e / e.sum(), rtol=1e-4, atol=1e-7)
  a = (e / e.sum())[assign] / np.bincount(assign, minlength=4)[assign]
  for u, g in zip(jax.tree.leaves(u2), jax.tree.leaves(grads)):
    np.testing.assert_allclose(u, np.tensordot(a, np.asarray(g, np.float64), 1),
                               rtol=1e-4, atol=1e-7)


def test_misuse_raises_clear_errors():
  params, batch = _params(), _batch()
  losses, grads = _per_sample(params, batch)
  tx = _literal(4, 32, "robust", batch_size=B)
  state = tx.init(params)
  mean_grads = jax.tree.map(lambda g: g.mean(0), grads)
  with pytest.raises(ValueError, match="per-sample gradients"):
    tx.update(mean_grads, state, params, losses=losses)
  with pytest.raises(ValueError, match="losses"):
    tx.update(grads, state, params)
  with pytest.raises(ValueError, match="losses must have shape"):
    tx.update(grads, state, params, losses=losses[:3])
  with pytest.raises(ValueError, match="batch_size"):
    tx.update(jax.tree.map(lambda g: g[:8], grads), state, params, losses=losses[:8])
  with pytest.raises(ValueError, match="num_domains"):
    _literal(0)
  with pytest.raises(ValueError, match="sketch_dim"):
    _literal(4, 0)
  with pytest.raises(ValueError, match="objective"):
    _literal(4, 8, "median")
  with pytest.raises(ValueError, match="weight_floor"):
    _literal(4, 8, weight_floor=0.5)


def _run(tx, grads, params, losses=None):
  return jax.jit(lambda g, s: tx.update(g, s, params, losses=losses))(grads, tx.init(params))


def _finite(tree):
  return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("objective", dg.OBJECTIVES)
def test_fewer_samples_than_domains(objective):
  params = _params()
  losses, grads = _per_sample(params, _batch(b=3))
  update, state = _run(_literal(11, 32, objective), grads, params, losses)
  assert _finite(update) and _finite(state)
  np.testing.assert_allclose(np.asarray(state.applied_weights).sum(), 1, rtol=1e-6)
  assert int((state.counts > 0).sum()) <= 3


@pytest.mark.parametrize("objective", dg.OBJECTIVES)
def test_duplicate_samples_give_their_gradient(objective):
  params = _params()
  x, y = _batch()
  dup = (jnp.repeat(x[:1], B, 0), jnp.repeat(y[:1], B, 0))
  losses, grads = _per_sample(params, dup)
  update, state = _run(_literal(4, 32, objective), grads, params, losses)
  jax.tree.map(lambda u, g: np.testing.assert_allclose(u, g[0], rtol=1e-5, atol=1e-7),
               update, grads)


@pytest.mark.parametrize("objective", dg.OBJECTIVES)
def test_all_zero_gradients(objective):
  params = _params()
  grads = jax.tree.map(lambda p: jnp.zeros((B,) + p.shape), params)
  update, state = _run(_literal(4, 32, objective), grads, params,
                       jnp.ones(B))
  assert _finite(state)
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(update))


def test_singletons_fall_back_to_the_mean_gradient():
  """B == M distinct samples: every domain is a singleton with no variance of
  its own and no pooled variance either, so uncertainty weights are uniform
  and the update is the plain mean gradient."""
  params = _params()
  _, grads = _per_sample(params, _batch(b=4))
  update, state = _run(_literal(4, 32), grads, params)
  np.testing.assert_array_equal(state.counts, [1, 1, 1, 1])
  jax.tree.map(lambda u, g: np.testing.assert_allclose(u, g.mean(0), rtol=1e-5, atol=1e-7),
               update, grads)


@pytest.mark.parametrize("objective", dg.OBJECTIVES)
def test_nonfinite_sample_is_dropped_and_counted(objective):
  params = _params()
  losses, grads = _per_sample(params, _batch())
  bad = jax.tree.map(lambda g: g.at[3].set(jnp.nan), grads)
  bad_losses = losses.at[5].set(jnp.inf)
  tx = _literal(4, 32, objective, batch_size=B)
  update, state = _run(tx, bad, params, bad_losses)
  assert _finite(update) and _finite(state)
  assert int(state.nonfinite) == 2 and int(state.nonfinite_total) == 2
  a = np.asarray(state.coefficients)
  assert a[3] == 0 and a[5] == 0
  np.testing.assert_allclose(a.sum(), 1.0, rtol=1e-5)  # weights sum to 1 over domains
  assert int(state.counts.sum()) == B - 2
  # Everything non-finite: zero update, nothing NaN.
  nan = jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), grads)
  update, state = _run(tx, nan, params, losses)
  assert _finite(state) and int(state.nonfinite) == B
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(update))


def test_ema_and_floor():
  params = _params()
  tx = _literal(4, 32, batch_size=B, ema=0.5, weight_floor=0.1)
  state = tx.init(params)
  step = jax.jit(lambda g, s: tx.update(g, s, params))
  _, g0 = _per_sample(params, _batch(1))
  _, g1 = _per_sample(params, _batch(2))
  _, s1 = step(g0, state)
  np.testing.assert_allclose(s1.weights, s1.raw_weights, rtol=1e-6)  # first step: no history
  _, s2 = step(g1, s1)
  np.testing.assert_allclose(s2.weights, 0.5 * s1.weights + 0.5 * s2.raw_weights, rtol=1e-5)
  present = np.asarray(s2.counts) > 0
  w = np.asarray(s2.applied_weights)
  assert np.all(w[present] >= 0.1 - 1e-6) and np.all(w[~present] == 0)
  np.testing.assert_allclose(w.sum(), 1, rtol=1e-6)


def test_rolling_buffer():
  params = _params()
  tx = _literal(3, 16, batch_size=B, buffer_size=24)
  step = jax.jit(lambda g, s: tx.update(g, s, params))
  _, g1 = _per_sample(params, _batch(1))
  _, g2 = _per_sample(params, _batch(2))
  _, s1 = step(g1, tx.init(params))
  assert int(s1.buffer_valid.sum()) == B
  _, s2 = step(g2, s1)
  assert int(s2.buffer_valid.sum()) == 24
  _, s3 = step(g1, s2)
  assert int(s3.buffer_valid.sum()) == 24
  # Rolling: the newest B rows are the latest batch's sketches, before them
  # the tail of the previous batch.
  np.testing.assert_allclose(s3.buffer[-B:], s1.buffer[-B:], rtol=1e-6)
  np.testing.assert_allclose(s3.buffer[:8], s2.buffer[-8:], rtol=1e-6)


def test_warm_start_keeps_cluster_identity():
  """The same batch twice: Lloyd restarts from its own fixed point, so the
  domains keep their indices and centroids."""
  params = _params()
  tx = _literal(3, 16, batch_size=B)
  step = jax.jit(lambda g, s: tx.update(g, s, params))
  _, grads = _per_sample(params, _batch(1))
  _, s1 = step(grads, tx.init(params))
  _, s2 = step(grads, s1)
  np.testing.assert_array_equal(s1.assignments, s2.assignments)
  np.testing.assert_allclose(s1.centroids, s2.centroids, rtol=1e-5, atol=1e-6)


def test_sample_coefficients():
  a = dg.sample_coefficients(jnp.asarray([0.5, 0.3, 0.2]), jnp.asarray([0, 0, 1, 2, 2]),
                             jnp.asarray([2, 1, 2]), jnp.asarray([True] * 4 + [False]))
  np.testing.assert_allclose(a, [0.25, 0.25, 0.3, 0.1, 0.0], rtol=1e-6)


def test_update_dtype_follows_gradients():
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), _params())
  _, grads = _per_sample(_params(), _batch())
  grads = jax.tree.map(lambda g: g.astype(jnp.bfloat16), grads)
  update, state = _run(_literal(4, 32), grads, params)
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(update))
  assert state.centroids.dtype == jnp.float32 and state.weights.dtype == jnp.float32


def test_in_batch_false_steps_on_the_mean_and_keeps_the_weights():
  """in_batch=False (a trainer that samples with the weights): the update is
  the plain mean gradient (jax.grad oracle); state and a_i are unchanged."""
  params, batch = _params(), _batch()
  losses, grads = _per_sample(params, batch)
  results = {}
  for in_batch in (True, False):
    tx = dg.dograph_transform(4, 64, batch_size=B, in_batch=in_batch)
    results[in_batch] = jax.jit(lambda g, s, l: tx.update(g, s, params, losses=l))(
        grads, tx.init(params), losses)
  mean = jax.grad(lambda p: jnp.mean(jax.vmap(_loss, in_axes=(None, 0))(p, batch)))(params)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7),
               results[False][0], mean)
  jax.tree.map(lambda u, v: np.testing.assert_array_equal(np.asarray(u), np.asarray(v)),
               results[False][1], results[True][1])
  a = np.asarray(results[True][1].coefficients)
  assert np.ptp(a) > 0  # the in-batch update differs from the mean
