"""Persistent model-centric domains: streaming K-means against scikit-learn's
MiniBatchKMeans, running statistics against NumPy sums, frequency-relative
coefficients, and the transform in its default mode (update identity, the
plain mean at w = p, traced hyperparameters, degenerate input)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.cluster import MiniBatchKMeans
from sklearn.datasets import make_blobs

import dograph_jax as dg
from dograph_jax.clustering import StreamingKMeans, assign, streaming_kmeans_update
from dograph_jax.domains import update_running_sums, zero_running_sums


def _stream(seed=0, batches=12, b=40, m=4, k=6):
  x, _ = make_blobs(n_samples=batches * b, n_features=k, centers=m, cluster_std=2.0,
                    center_box=(-6, 6), random_state=seed)
  return x.astype(np.float32).reshape(batches, b, k)


@pytest.mark.parametrize("seed", [0, 1])
def test_streaming_kmeans_equals_sklearn_partial_fit(seed):
  """decay = 1, no re-seeding: exactly MiniBatchKMeans.partial_fit on the same batches."""
  stream = _stream(seed)
  init = stream[0][:4].copy()
  ref = MiniBatchKMeans(4, init=init, n_init=1, reassignment_ratio=0.0, batch_size=40)
  state = StreamingKMeans(jnp.asarray(init), jnp.zeros(4), jnp.zeros(4, bool))
  step = jax.jit(lambda s, x: streaming_kmeans_update(s, x, *assign(x, s.centroids)))
  for x in stream:
    ref.partial_fit(x)
    state = step(state, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(state.centroids), ref.cluster_centers_,
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(state.mass), ref._counts, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(assign(jnp.asarray(stream[-1]), state.centroids)[0]),
                                ref.predict(stream[-1]))


def test_streaming_kmeans_with_decay_is_the_weighted_mean():
  """With decay < 1 each centroid is the exponentially weighted mean of the rows it absorbed."""
  stream = _stream(2, batches=6)
  decay = 0.7
  state = StreamingKMeans(jnp.asarray(stream[0][:4]), jnp.zeros(4), jnp.zeros(4, bool))
  absorbed = [[] for _ in range(4)]  # (batch index, row)
  for t, x in enumerate(stream):
    labels = np.asarray(assign(jnp.asarray(x), state.centroids)[0])
    for i, j in enumerate(labels):
      absorbed[j].append((t, x[i]))
    state = streaming_kmeans_update(state, jnp.asarray(x), *assign(jnp.asarray(x),
                                                                   state.centroids),
                                    decay=decay)
  last = len(stream) - 1
  for j in range(4):
    w = np.asarray([decay ** (last - t) for t, _ in absorbed[j]], np.float64)
    rows = np.asarray([r for _, r in absorbed[j]], np.float64)
    np.testing.assert_allclose(float(state.mass[j]), w.sum(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(state.centroids[j]), (w[:, None] * rows).sum(0) / w.sum(),
                               rtol=1e-4, atol=1e-4)


def test_dead_cluster_is_reseeded_at_a_far_row():
  x = jnp.asarray([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [9.0, 9.0]])
  centroids = jnp.asarray([[0.0, 0.0], [50.0, 50.0], [9.0, 9.0]])
  state = StreamingKMeans(centroids, jnp.asarray([10.0, 0.01, 5.0]), jnp.zeros(3, bool))
  labels, nearest = assign(x, centroids)
  new = streaming_kmeans_update(state, x, labels, nearest, decay=1.0, reseed_fraction=0.1)
  assert np.asarray(new.reseeded).tolist() == [False, True, False]
  # the farthest row from its own centroid is (0.1, 0) or (0, 0.1)
  assert float(jnp.min(jnp.sum((x[:3] - new.centroids[1]) ** 2, 1))) == 0.0
  live = np.asarray(new.mass)[[0, 2]]
  assert float(new.mass[1]) == live.min()
  # no re-seeding with reseed_fraction = 0
  kept = streaming_kmeans_update(state, x, labels, nearest, decay=1.0, reseed_fraction=0.0)
  assert not np.asarray(kept.reseeded).any()


def test_running_sums_against_numpy():
  rng = np.random.default_rng(0)
  m, k, decay = 3, 5, 0.8
  sums = zero_running_sums(m, k)
  history = []
  for _ in range(5):
    z = rng.normal(size=(10, k)).astype(np.float32)
    a = rng.integers(0, m, size=10)
    l = rng.random(10).astype(np.float32)
    mask = rng.random(10) > 0.2
    sums = update_running_sums(sums, jnp.asarray(z), jnp.asarray(a), jnp.asarray(l),
                               decay=decay, sample_mask=jnp.asarray(mask))
    history.append((z, a, l, mask))
  t_last = len(history) - 1
  stats = dg.running_domain_stats(sums)
  for j in range(m):
    wz = [(decay ** (t_last - t), z[i], l[i]) for t, (z, a, l, mask) in enumerate(history)
          for i in range(10) if a[i] == j and mask[i]]
    w = np.asarray([c for c, _, _ in wz])
    rows = np.asarray([r for _, r, _ in wz], np.float64)
    losses = np.asarray([x for _, _, x in wz])
    np.testing.assert_allclose(float(stats.counts[j]), w.sum(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(stats.means[j]), (w[:, None] * rows).sum(0) / w.sum(),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(stats.losses[j]), (w * losses).sum() / w.sum(), rtol=1e-4)
  means = np.asarray(stats.means, np.float64)
  np.testing.assert_allclose(np.asarray(stats.gram), means @ means.T, rtol=1e-4, atol=1e-5)
  lap = np.asarray(stats.laplacian)
  np.testing.assert_allclose(lap.sum(1), 0.0, atol=1e-5)


def test_frequency_coefficients():
  p = jnp.asarray([0.5, 0.3, 0.2])
  assign_B = jnp.asarray([0, 0, 1, 2, 0, 1])
  a = dg.frequency_coefficients(p, p, assign_B)
  np.testing.assert_allclose(np.asarray(a), np.full(6, 1 / 6), rtol=1e-6)
  w = jnp.asarray([0.2, 0.3, 0.5])
  a = np.asarray(dg.frequency_coefficients(w, p, assign_B))
  r = np.asarray([0.4, 1.0, 2.5])[np.asarray(assign_B)]
  np.testing.assert_allclose(a, r / r.sum(), rtol=1e-6)
  capped = np.asarray(dg.frequency_coefficients(w, p, assign_B, max_ratio=1.5))
  r = np.minimum(np.asarray([0.4, 1.0, 2.5]), 1.5)[np.asarray(assign_B)]
  np.testing.assert_allclose(capped, r / r.sum(), rtol=1e-6)
  masked = np.asarray(dg.frequency_coefficients(w, p, assign_B,
                                                sample_mask=jnp.asarray([1, 1, 1, 1, 1, 0], bool)))
  assert masked[-1] == 0 and abs(masked.sum() - 1) < 1e-6
  # in-batch frequencies, no cap: the literal w_j / n_j (normalised)
  counts = jnp.asarray([3, 2, 1])
  np.testing.assert_allclose(
      np.asarray(dg.frequency_coefficients(w, counts / 6, assign_B)),
      np.asarray(dg.sample_coefficients(w, assign_B, counts)), rtol=1e-6)


def test_anchored_weights():
  p = jnp.asarray([0.6, 0.3, 0.1, 0.0])
  w = jnp.asarray([0.1, 0.2, 0.7, 0.0])
  np.testing.assert_allclose(np.asarray(dg.anchored_weights(w, p, 0.0)), p, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(dg.anchored_weights(w, p, 1.0)), w, rtol=1e-6)
  half = np.sqrt(np.asarray(p) * np.asarray(w))
  np.testing.assert_allclose(np.asarray(dg.anchored_weights(w, p, 0.5)), half / half.sum(),
                             rtol=1e-5)


# --- the transform in its default (persistent) mode --------------------------

B, M = 24, 4


def _params():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  return {"l1": {"w": jax.random.normal(k1, (5, 8)) * 0.5, "b": jnp.zeros(8)},
          "l2": {"w": jax.random.normal(k2, (8, 3)) * 0.5, "b": jnp.zeros(3)}}


def _loss(params, example):
  x, y = example
  h = jnp.tanh(x @ params["l1"]["w"] + params["l1"]["b"])
  return -jax.nn.log_softmax(h @ params["l2"]["w"] + params["l2"]["b"])[y]


def _batch(seed):
  kx, ky = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.normal(kx, (B, 5)) + jnp.where(jnp.arange(B)[:, None] % 3 == 0, 3.0, -3.0)
  return x, jax.random.randint(ky, (B,), 0, 3)


@pytest.mark.parametrize("objective", dg.OBJECTIVES)
def test_persistent_update_is_the_weighted_loss_gradient(objective):
  params = _params()
  tx = dg.dograph_transform(M, 32, objective, batch_size=B, lambda_graph=0.1)
  state = tx.init(params)
  update = jax.jit(lambda g, s, l: tx.update(g, s, params, losses=l))
  for t in range(4):
    batch = _batch(t)
    losses, grads = dg.per_sample_loss_and_grads(_loss, params, batch)
    out, state = update(grads, state, losses)
  a = state.coefficients
  assert abs(float(a.sum()) - 1) < 1e-5 and np.all(np.asarray(a) >= 0)
  weighted = jax.grad(lambda p: jnp.sum(jax.lax.stop_gradient(a) * jax.vmap(
      _loss, in_axes=(None, 0))(p, batch)))(params)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7), out, weighted)
  # a_i follows min(w / p, cap) of its domain, normalised over the batch
  w, p = np.asarray(state.applied_weights), np.asarray(state.frequencies)
  assign_B = np.asarray(state.assignments)
  r = np.minimum(w / np.where(p > 0, p, 1), 4.0)[assign_B]
  np.testing.assert_allclose(np.asarray(a), r / r.sum(), rtol=1e-5)
  np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-5)
  assert int(state.count) == 4 and np.isfinite(np.asarray(state.sums.sum_z)).all()


def test_post_stratified_update_is_the_weighted_loss_gradient():
  """coefficients="post_stratified": the update is grad sum_i a_i l_i with
  a_i = s_j / n_j, s_j = p_j min(w_j / p_j, cap) over the domains present
  (numpy, from the state's own assignments, frequencies and weights); at
  anchor 0 the domains' shares are their frequencies."""
  params = _params()
  for anchor in (0.5, 0.0):
    tx = dg.dograph_transform(M, 32, "uncertainty", batch_size=B, anchor=anchor,
                              coefficients="post_stratified")
    state = tx.init(params)
    for t in range(3):
      batch = _batch(t)
      losses, grads = dg.per_sample_loss_and_grads(_loss, params, batch)
      out, state = tx.update(grads, state, params, losses=losses)
    w, p = np.asarray(state.applied_weights), np.asarray(state.frequencies)
    assign_B = np.asarray(state.assignments)
    n = np.bincount(assign_B, minlength=M)
    share = np.where(n > 0, p * np.minimum(w / np.where(p > 0, p, 1), 4.0), 0)
    want = share[assign_B] / n[assign_B] / share.sum()
    np.testing.assert_allclose(np.asarray(state.coefficients), want, rtol=1e-5)
    if anchor == 0.0:
      np.testing.assert_allclose(share / share.sum(), np.where(n > 0, p, 0) / p[n > 0].sum(),
                                 rtol=1e-5)
    weighted = jax.grad(lambda q: jnp.sum(jnp.asarray(want, jnp.float32) * jax.vmap(
        _loss, in_axes=(None, 0))(q, batch)))(params)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7),
                 out, weighted)


def test_post_stratified_needs_persistent_domains():
  with pytest.raises(ValueError, match="post_stratified.*persistent"):
    dg.dograph_transform(domains="batch", coefficients="post_stratified")
  with pytest.raises(ValueError, match="coefficients must be"):
    dg.dograph_transform(coefficients="stratified")


def test_anchor_zero_is_the_plain_mean():
  """w = p (anchor 0): the update is the plain batch-mean gradient."""
  params = _params()
  tx = dg.dograph_transform(M, 32, "uncertainty", batch_size=B, anchor=0.0)
  state = tx.init(params)
  for t in range(3):
    batch = _batch(t)
    losses, grads = dg.per_sample_loss_and_grads(_loss, params, batch)
    out, state = tx.update(grads, state, params, losses=losses)
    mean = jax.grad(lambda p: jnp.mean(jax.vmap(_loss, in_axes=(None, 0))(p, batch)))(params)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7), out, mean)


def test_traced_hyperparameters_do_not_recompile():
  params = _params()
  tx = optax.inject_hyperparams(dg.dograph_transform, static_args=dg.STATIC_ARGS)(
      num_domains=M, sketch_dim=32, objective="robust", batch_size=B, decay=0.9, anchor=1.0,
      max_ratio=4.0, reseed_fraction=0.05)
  traces = []

  @jax.jit
  def step(state, grads, losses):
    traces.append(1)
    return tx.update(grads, state, params, losses=losses)

  state = tx.init(params)
  batch = _batch(0)
  losses, grads = dg.per_sample_loss_and_grads(_loss, params, batch)
  out1, s1 = step(state, grads, losses)
  for name, value in (("decay", 0.5), ("anchor", 0.25), ("max_ratio", 1.5),
                      ("reseed_fraction", 0.2)):
    s1.hyperparams[name] = jnp.asarray(value, jnp.float32)
  out2, _ = step(s1, grads, losses)
  assert len(traces) == 1
  # anchor 0.25 and a cap of 1.5 moved the update
  assert any(not np.allclose(u, v) for u, v in zip(jax.tree.leaves(out1), jax.tree.leaves(out2)))


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e15, 1e30])
@pytest.mark.parametrize("objective", dg.OBJECTIVES)
def test_degenerate_scales_and_nonfinite_samples_never_give_nan(objective, scale):
  params = _params()
  tx = dg.dograph_transform(M, 16, objective, batch_size=B, lambda_graph=0.1)
  state = tx.init(params)
  batch = _batch(0)
  losses, grads = dg.per_sample_loss_and_grads(_loss, params, batch)
  grads = jax.tree.map(lambda g: g * scale, grads)
  grads = jax.tree.map(lambda g: g.at[3].set(jnp.nan), grads)
  for _ in range(3):
    out, state = tx.update(grads, state, params, losses=losses)
  assert np.isfinite(np.asarray(state.applied_weights)).all()
  a = np.asarray(state.coefficients)
  if scale > dg.MAX_SKETCH_ENTRY:  # every sketch beyond the bound: all dropped, zero update
    assert int(state.nonfinite) == B and not a.any()
    assert all(not np.asarray(u).any() for u in jax.tree.leaves(out))
    return
  assert int(state.nonfinite) == 1
  assert np.isfinite(a).all() and a[3] == 0 and abs(a.sum() - 1) < 1e-5
  # the update is a convex combination of the kept per-sample gradients
  assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree.leaves(out))


def test_robust_with_frequency_prior_tilts_by_the_running_loss():
  """prior="frequency", anchor 1: w = p exp(L / tau), so a_i ∝ exp(L_{c(i)} / tau)
  (no cap)."""
  params = _params()
  tau = 2.0
  # no re-seeding: the stored sums are then the ones this step's weights read
  tx = dg.dograph_transform(M, 32, "robust", batch_size=B, temperature=tau, max_ratio=1e6,
                            reseed_fraction=0.0, anchor=1.0)
  state = tx.init(params)
  for t in range(3):
    batch = _batch(t)
    losses, grads = dg.per_sample_loss_and_grads(_loss, params, batch)
    _, state = tx.update(grads, state, params, losses=losses)
  sums = state.sums
  mean_loss = np.asarray(sums.sum_loss) / np.maximum(np.asarray(sums.mass), 1e-30)
  p = np.asarray(state.frequencies)
  e = np.where(p > 0, p * np.exp(mean_loss / tau), 0.0)
  present = np.asarray(sums.mass) > 0
  np.testing.assert_allclose(np.asarray(state.applied_weights)[present],
                             (e / e.sum())[present], rtol=1e-4)
  a = np.asarray(state.coefficients)
  r = np.exp(mean_loss / tau)[np.asarray(state.assignments)]
  np.testing.assert_allclose(a, r / r.sum(), rtol=1e-4)


def test_validation_of_new_options():
  with pytest.raises(ValueError, match="prior"):
    dg.dograph_transform(4, 8, prior="flat")
  with pytest.raises(ValueError, match="domains"):
    dg.dograph_transform(4, 8, domains="epoch")
  with pytest.raises(ValueError, match="decay"):
    dg.dograph_transform(4, 8, decay=0.0)
  with pytest.raises(ValueError, match="anchor"):
    dg.dograph_transform(4, 8, anchor=1.5)
  with pytest.raises(ValueError, match="max_ratio"):
    dg.dograph_transform(4, 8, max_ratio=0.5)
  with pytest.raises(ValueError, match="buffer_size"):
    dg.dograph_transform(4, 8, buffer_size=8)
