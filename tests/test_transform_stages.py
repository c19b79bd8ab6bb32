"""The stages of dograph_transform (dograph_jax/transform_stages), each on its
own, against NumPy computations, closed forms and scikit-learn: options and
STATIC_ARGS; preparing per-sample or factored input (non-finite policy, the
update map); persistent and per-batch domains; weights; coefficients; and
the state's pytree layout (key paths, properties, orbax round trip)."""

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

import dograph_jax as dg
from dograph_jax.domains import DomainStats, RunningSums
from dograph_jax.transform_stages import coefficients, domain_modes, options, prepare, weights

B, K, M = 12, 6, 3
SIGNATURE = inspect.signature(dg.dograph_transform).parameters


def _opts(**kw) -> options.DoGraphOptions:
  """Options with dograph_transform's defaults, overridden by ``kw``."""
  return options.DoGraphOptions(**{**{n: p.default for n, p in SIGNATURE.items()},
                                   "num_domains": M, "sketch_dim": K, **kw})


def _blobs(seed=0, b=B, spread=0.05):
  """``(B, K)`` points around M far-apart centres, their labels, losses."""
  rng = np.random.default_rng(seed)
  centres = np.eye(M, K) * 10.0
  labels = np.arange(b) % M
  z = centres[labels] + rng.normal(size=(b, K)) * spread
  return z.astype(np.float32), labels, rng.uniform(1, 2, size=b).astype(np.float32)


# ---------------------------------------------------------------- options


def test_options_are_the_transform_arguments_and_static_args_the_non_floats():
  assert [f.name for f in dataclasses.fields(options.DoGraphOptions)] == list(SIGNATURE)
  # Independent of the options' own markers: static = every argument whose
  # default is not a float (shapes, strings, flags, seeds, budgets).
  want = tuple(n for n, p in SIGNATURE.items() if not isinstance(p.default, float))
  assert dg.STATIC_ARGS == want == options.STATIC_ARGS
  assert set(options.TRACED_ARGS) == set(SIGNATURE) - set(want)
  with pytest.raises(dataclasses.FrozenInstanceError):
    _opts().ema = 0.5


@pytest.mark.parametrize("kw, message", [
    (dict(num_domains=0), "num_domains"), (dict(sketch_dim=0), "sketch_dim"),
    (dict(objective="median"), "objective"), (dict(domains="global"), "domains"),
    (dict(distance="manhattan"), "distance"), (dict(prior="zipf"), "prior"),
    (dict(sketch_kind="sparse"), "sketch_kind"), (dict(buffer_size=-1), "buffer_size"),
    (dict(buffer_size=4), "buffer_size is an option of domains='batch'"),
    (dict(ema=1.0), "ema"), (dict(decay=0.0), "decay"), (dict(anchor=1.5), "anchor"),
    (dict(max_ratio=0.5), "max_ratio"), (dict(reseed_fraction=1.0), "reseed_fraction"),
    (dict(weight_floor=0.5), "weight_floor"),
])
def test_options_reject_bad_values(kw, message):
  with pytest.raises(ValueError, match=message):
    _opts(**kw)


def test_traced_floats_are_not_range_checked():
  # inject_hyperparams passes arrays (tracers under jit): no Python comparison.
  bad = jnp.asarray(2.0)
  opts = _opts(ema=bad, decay=bad, anchor=bad, weight_floor=bad, reseed_fraction=bad)
  assert opts.ema is bad and opts.persistent and not opts.has_buffer


# ---------------------------------------------------------------- prepare


def _grads(b=B, seed=0):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.normal(size=(b, 2, 3)), jnp.float32),
          "b": jnp.asarray(rng.normal(size=(b, 3)), jnp.float32)}


def _flat(grads):
  return np.concatenate([np.asarray(grads["b"], np.float64).reshape(B, -1),
                         np.asarray(grads["w"], np.float64).reshape(B, -1)], 1)


@functools.partial(jax.jit, static_argnums=3)
def _prepare_and_reduce(grads, losses, a_B, opts):
  """``prepare`` of per-sample gradients, and its ``reduce(a_B)``, jitted."""
  x = prepare.prepare(grads, None, losses, opts, dg.projection_key(opts.seed))
  return x._replace(reduce=None), x.reduce(a_B)


def test_prepare_per_sample_drops_nonfinite_and_huge_samples():
  grads = _grads()
  grads["w"] = grads["w"].at[1, 0, 0].set(jnp.nan).at[4].set(1e30)  # NaN; huge sketch
  losses = jnp.linspace(1.0, 2.0, B).at[7].set(jnp.inf)
  opts, key = _opts(batch_size=B), dg.projection_key(0)
  a = np.random.default_rng(1).uniform(size=B).astype(np.float32)
  x, out = _prepare_and_reduce(grads, losses, a, opts)
  want_kept = np.ones(B, bool)
  want_kept[[1, 4, 7]] = False
  np.testing.assert_array_equal(x.kept, want_kept)
  assert not np.asarray(x.z)[~want_kept].any() and not np.asarray(x.losses)[~want_kept].any()
  np.testing.assert_array_equal(x.losses[want_kept], np.asarray(losses)[want_kept])
  # Kept rows: the sketch of those samples alone (the sketch is per-row linear).
  clean = jax.tree.map(lambda g: jnp.where(want_kept.reshape((B,) + (1,) * (g.ndim - 1)), g, 0),
                       grads)
  np.testing.assert_allclose(x.z, jax.jit(dg.sketch, static_argnums=2)(clean, key, K),
                             rtol=1e-6, atol=1e-6)
  # reduce: sum over the kept samples only (NaN rows never reach the sum).
  want = (a * want_kept) @ np.nan_to_num(_flat(grads) * want_kept[:, None])
  np.testing.assert_allclose(np.concatenate([np.ravel(out["b"]), np.ravel(out["w"])]),
                             want, rtol=1e-5)


def test_prepare_per_sample_keeps_the_gradient_dtype():
  grads = jax.tree.map(lambda g: g.astype(jnp.bfloat16), _grads())
  x, out = _prepare_and_reduce(grads, None, jnp.ones(B) / B, _opts())
  assert x.losses is None and x.z.dtype == jnp.float32
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(out))


def test_prepare_per_sample_misuse():
  grads, key = _grads(), dg.projection_key(0)
  params = jax.tree.map(lambda g: g[0], grads)
  mean = jax.tree.map(lambda g: g.mean(0), grads)
  with pytest.raises(ValueError, match="per-sample gradients"):
    prepare.prepare(mean, params, None, _opts(), key)
  with pytest.raises(ValueError, match="needs per-sample"):
    prepare.prepare(grads, params, None, _opts(objective="robust"), key)
  with pytest.raises(ValueError, match="losses must have shape"):
    prepare.prepare(grads, params, jnp.ones(3), _opts(), key)
  with pytest.raises(ValueError, match="batch_size=5"):
    prepare.prepare(grads, params, None, _opts(batch_size=5), key)


@pytest.mark.parametrize("second_backward", [False, True])
def test_prepare_factored(second_backward):
  z = np.random.default_rng(0).normal(size=(B, K)).astype(np.float32)
  z[2, 0], z[5, 1] = np.nan, 2e12
  losses = np.linspace(1, 2, B).astype(np.float32)
  losses[9] = np.nan
  seen = {}

  def weighted_grad(a, keep):
    seen["keep"] = np.asarray(keep)
    return {"g": jnp.sum(a) * jnp.ones(2)}

  fast = dg.FactoredGrads(jnp.asarray(losses), jnp.asarray(z), weighted_grad, second_backward)
  x = prepare.prepare(fast, None, None, _opts(), None)
  want_kept = np.isfinite(z).all(1) & (np.abs(z) <= 1e12).all(1) & np.isfinite(losses)
  np.testing.assert_array_equal(x.kept, want_kept)
  np.testing.assert_array_equal(x.z, np.where(want_kept[:, None], z, 0))
  np.testing.assert_array_equal(x.losses, np.where(want_kept, losses, 0))
  out = x.reduce(jnp.full(B, 0.5))
  np.testing.assert_array_equal(seen["keep"], want_kept)
  # A second backward cannot leave a dropped sample out: the step is zero.
  np.testing.assert_array_equal(out["g"], [0, 0] if second_backward else [6, 6])
  with pytest.raises(ValueError, match="sketch_dim"):
    prepare.prepare(fast, None, None, _opts(sketch_dim=K + 1), None)
  # Losses given to update() override the engine's.
  x = prepare.prepare(fast, None, jnp.ones(B), _opts(), None)
  assert np.asarray(x.losses)[want_kept].tolist() == [1.0] * int(want_kept.sum())


def test_usable_sketches_bound():
  z = jnp.asarray([[1e12, -1e12], [1e12 * 1.01, 0.0], [jnp.inf, 0], [jnp.nan, 0]])
  np.testing.assert_array_equal(dg.usable_sketches(z), [True, False, False, False])


# ---------------------------------------------------------------- domains


def _numpy_stats(z, assign, kept, losses):
  """Per-domain counts, means, within variances and mean losses in NumPy."""
  z, losses = z.astype(np.float64), losses.astype(np.float64)
  out = []
  for j in range(M):
    rows = (assign == j) & kept
    n = rows.sum()
    mu = z[rows].mean(0) if n else np.zeros(K)
    var = ((z[rows] - mu) ** 2).sum(1).mean() if n else 0.0
    out.append((n, mu, var, losses[rows].mean() if n else 0.0))
  return [np.array(c) for c in zip(*out)]


# Jitted (the options are static: hashable, all Python values here): eager
# K-means dispatches every op of its loops one by one.
_batch_step = jax.jit(domain_modes.batch_step, static_argnums=6)
_persistent_step = jax.jit(domain_modes.persistent_step, static_argnums=6)
# One configuration for the persistent-step tests (one compilation); at these
# masses only the reseed test's starved domain falls below half the mean.
_PERSISTENT = _opts(batch_size=B, decay=0.5, reseed_fraction=0.5)


def test_batch_init_shapes():
  s = domain_modes.batch_init(_opts(domains="batch"))
  assert s.centroids.shape == (M, K) and s.buffer is None and s.buffer_valid is None
  s = domain_modes.batch_init(_opts(domains="batch", buffer_size=5))
  assert s.buffer.shape == (5, K) and s.buffer_valid.dtype == bool and not s.buffer_valid.any()


def test_batch_step_clusters_the_batch_and_reports_its_statistics():
  z, labels, losses = _blobs()
  kept = np.ones(B, bool)
  kept[4] = False
  opts = _opts(domains="batch", warm_start=False)
  state, part = _batch_step(domain_modes.batch_init(opts), jnp.asarray(z),
                                        jnp.asarray(kept), jnp.asarray(losses),
                                        jnp.zeros((), jnp.int32), jax.random.PRNGKey(3), opts)
  assign = np.asarray(part.assignments)
  sk = KMeans(M, n_init=5, random_state=0).fit(z[kept]).labels_
  assert adjusted_rand_score(sk, assign[kept]) == 1.0
  counts, means, variances, mean_losses = _numpy_stats(z, assign, kept, losses)
  np.testing.assert_array_equal(part.counts, counts)
  assert part.counts.dtype == jnp.int32
  np.testing.assert_allclose(part.stats.means, means, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(part.stats.variances, variances, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(part.stats.losses, mean_losses, rtol=1e-5)
  # The centroids are the clusters' means (Lloyd's fixed point).
  np.testing.assert_allclose(state.centroids, means, rtol=1e-5, atol=1e-6)


def test_batch_step_rolls_the_buffer_and_clusters_it():
  opts = _opts(domains="batch", buffer_size=8)
  z1, _, l1 = _blobs(1)
  z2, _, l2 = _blobs(2)
  keep = jnp.ones(B, bool)
  s0 = domain_modes.batch_init(opts)
  s1, _ = _batch_step(s0, jnp.asarray(z1), keep, jnp.asarray(l1),
                                  jnp.zeros((), jnp.int32), jax.random.PRNGKey(0), opts)
  np.testing.assert_array_equal(s1.buffer, z1[-8:])
  assert bool(s1.buffer_valid.all())
  s2, part = _batch_step(s1, jnp.asarray(z2), keep.at[11].set(False),
                                     jnp.asarray(l2), jnp.ones((), jnp.int32),
                                     jax.random.PRNGKey(1), opts)
  np.testing.assert_array_equal(s2.buffer, z2[-8:])
  np.testing.assert_array_equal(s2.buffer_valid, [True] * 7 + [False])
  # Clustered together with the buffer, reported on this batch only.
  assert int(part.counts.sum()) == B - 1 and part.assignments.shape == (B,)


def _persistent_state(centroids, mass, sums_mass, sum_z, sum_sq, sum_loss):
  f = lambda x: jnp.asarray(x, jnp.float32)
  return domain_modes.PersistentDomains(
      f(centroids), f(mass), RunningSums(f(sums_mass), f(sum_z), f(sum_sq), f(sum_loss)),
      jnp.zeros((M,), jnp.float32), jnp.zeros((), jnp.int32))


def test_persistent_first_step_founds_the_centroids():
  z, labels, losses = _blobs()
  opts = _PERSISTENT
  state, part = _persistent_step(
      domain_modes.persistent_init(opts), jnp.asarray(z), jnp.ones(B, bool),
      jnp.asarray(losses), jnp.zeros((), jnp.int32), jax.random.PRNGKey(0), opts)
  assert adjusted_rand_score(labels, np.asarray(part.assignments)) == 1.0
  counts, means, _, _ = _numpy_stats(z, np.asarray(part.assignments), np.ones(B, bool), losses)
  np.testing.assert_array_equal(part.counts, counts)
  np.testing.assert_allclose(state.mass, counts, rtol=1e-6)  # no history to decay
  np.testing.assert_allclose(state.centroids, means, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.frequencies, counts / B, rtol=1e-6)


def test_persistent_step_refines_centroids_and_running_sums():
  """A later step: nearest-centroid assignment, Sculley's update with a
  forgetting factor, decayed sums, frequencies = masses / total (NumPy)."""
  decay = _PERSISTENT.decay
  z, _, losses = _blobs(4)
  kept = np.ones(B, bool)
  kept[0] = False
  rng = np.random.default_rng(5)
  c0 = (np.eye(M, K) * 10.0 + rng.normal(size=(M, K))).astype(np.float32)
  mass0 = np.array([4.0, 2.0, 6.0])
  sum_z0 = c0 * mass0[:, None]
  sum_sq0, sum_loss0 = np.array([1.0, 2.0, 3.0]), np.array([4.0, 3.0, 9.0])
  state0 = _persistent_state(c0, mass0, mass0, sum_z0, sum_sq0, sum_loss0)
  opts = _PERSISTENT
  state, part = _persistent_step(
      state0, jnp.asarray(z), jnp.asarray(kept), jnp.asarray(losses), jnp.ones((), jnp.int32),
      jax.random.PRNGKey(0), opts)
  z64 = z.astype(np.float64)
  assign = np.argmin(((z64[:, None] - c0[None]) ** 2).sum(-1), 1)
  np.testing.assert_array_equal(np.asarray(part.assignments)[kept], assign[kept])
  onehot = np.eye(M)[assign] * kept[:, None]
  n = onehot.sum(0)
  np.testing.assert_array_equal(part.counts, n)
  mass = decay * mass0 + n
  np.testing.assert_allclose(state.mass, mass, rtol=1e-6)
  np.testing.assert_allclose(state.centroids, (decay * mass0[:, None] * c0 + onehot.T @ z64)
                             / mass[:, None], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(state.sums.mass, mass, rtol=1e-6)
  np.testing.assert_allclose(state.sums.sum_z, decay * sum_z0 + onehot.T @ z64, rtol=1e-5)
  np.testing.assert_allclose(state.sums.sum_loss, decay * sum_loss0 + onehot.T @ losses,
                             rtol=1e-5)
  np.testing.assert_allclose(state.frequencies, mass / mass.sum(), rtol=1e-6)
  # The partition's statistics are the running ones (means = sum_z / mass).
  np.testing.assert_allclose(part.stats.means, (decay * sum_z0 + onehot.T @ z64)
                             / mass[:, None], rtol=1e-5, atol=1e-5)
  assert int(state.reseeded) == 0


def test_persistent_reseed_restarts_the_domains_sums():
  z, _, losses = _blobs(6)
  # Domain 2's centroid is far from every sample and has almost no mass.
  c0 = np.eye(M, K) * 10.0
  c0[2] = -100.0
  mass0 = np.array([10.0, 10.0, 1e-3])
  state0 = _persistent_state(c0, mass0, mass0, c0 * mass0[:, None], np.ones(M), np.ones(M))
  opts = _PERSISTENT
  state, part = _persistent_step(
      state0, jnp.asarray(z), jnp.ones(B, bool), jnp.asarray(losses), jnp.ones((), jnp.int32),
      jax.random.PRNGKey(0), opts)
  assert int(state.reseeded) == 1
  for leaf in jax.tree.leaves(state.sums):
    assert not np.asarray(leaf)[2].any()  # restarted for the next step ...
  assert float(part.stats.counts[2]) > 0  # ... this step still used them


# ---------------------------------------------------------------- weights


def test_smooth_is_ema_then_floor_on_present_domains():
  target, prev = np.array([0.6, 0.4, 0.0]), np.array([0.2, 0.3, 0.5])
  present = np.array([True, True, False])
  ema, floor = 0.25, 0.3
  smoothed, applied = weights.smooth(jnp.asarray(target), jnp.asarray(prev),
                                     jnp.ones((), jnp.int32), jnp.asarray(present), ema, floor)
  s = ema * prev + (1 - ema) * target
  np.testing.assert_allclose(smoothed, s, rtol=1e-6)
  r = np.where(present, s, 0) / s[present].sum()
  np.testing.assert_allclose(applied, np.where(present, (1 - 2 * floor) * r + floor, 0), rtol=1e-6)
  # First step: no history, the target itself; a floor above 1/n is clipped.
  smoothed, applied = weights.smooth(jnp.asarray(target), jnp.asarray(prev),
                                     jnp.zeros((), jnp.int32), jnp.asarray(present), ema, 0.9)
  np.testing.assert_allclose(smoothed, target, rtol=1e-6)
  np.testing.assert_allclose(applied, [0.5, 0.5, 0.0], rtol=1e-6)


def test_anchored_weights_closed_form():
  w_star, p = np.array([0.7, 0.2, 0.1, 0.0]), np.array([0.2, 0.3, 0.5, 0.0])
  for anchor in (0.0, 0.3, 1.0):
    got = dg.anchored_weights(jnp.asarray(w_star), jnp.asarray(p), anchor)
    want = np.where(p > 0, p ** (1 - anchor) * w_star ** anchor, 0)
    np.testing.assert_allclose(got, want / want.sum(), rtol=1e-5)


def _stats(counts, losses, means=None):
  counts = jnp.asarray(counts, jnp.float32)
  means = jnp.eye(M, K) if means is None else jnp.asarray(means, jnp.float32)
  gram = means @ means.T
  return DomainStats(counts, means, jnp.ones(M), jnp.asarray(losses, jnp.float32), gram,
                     jnp.zeros((M, M)), jnp.zeros((M, M)), means.mean(0), jnp.ones(()))


def test_batch_weights_robust_is_the_softmax_of_losses_over_present_domains():
  tau = 0.5
  losses = np.array([1.0, 2.0, 5.0])
  opts = _opts(domains="batch", objective="robust", temperature=tau)
  w = weights.batch_weights(_stats([3, 2, 0], losses), jnp.zeros(M), jnp.zeros((), jnp.int32),
                            opts)
  e = np.exp(losses / tau) * [1, 1, 0]
  np.testing.assert_allclose(w.raw, e / e.sum(), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(w.applied, w.raw, rtol=1e-6)
  # Statistics that overflowed: uniform over the present domains, never NaN.
  bad = _stats([3, 2, 0], losses)._replace(losses=jnp.asarray([jnp.nan, 1.0, 1.0]))
  w = weights.batch_weights(bad, jnp.zeros(M), jnp.zeros((), jnp.int32), opts)
  np.testing.assert_allclose(w.raw, [0.5, 0.5, 0.0], rtol=1e-6)


def test_running_weights_robust_with_frequency_prior_then_anchor():
  """w* ∝ p exp(L / tau) (docs/method.md §2a), then the geometric path to p."""
  tau, anchor = 0.7, 0.4
  p, losses = np.array([0.5, 0.3, 0.2]), np.array([1.0, 1.5, 0.5])
  opts = _opts(objective="robust", temperature=tau, anchor=anchor)
  w = weights.running_weights(_stats(p * 10, losses), jnp.asarray(p, jnp.float32),
                              jnp.zeros(M), jnp.zeros((), jnp.int32), opts)
  w_star = p * np.exp(losses / tau)
  w_star /= w_star.sum()
  np.testing.assert_allclose(w.raw, w_star, rtol=1e-5)
  anchored = p ** (1 - anchor) * w_star ** anchor
  np.testing.assert_allclose(w.applied, anchored / anchored.sum(), rtol=1e-5)
  # Prior "uniform": w* ∝ exp(L / tau).
  w = weights.running_weights(_stats(p * 10, losses), jnp.asarray(p, jnp.float32),
                              jnp.zeros(M), jnp.zeros((), jnp.int32), _opts(
                                  objective="robust", temperature=tau, prior="uniform"))
  e = np.exp(losses / tau)
  np.testing.assert_allclose(w.raw, e / e.sum(), rtol=1e-5)


def test_weights_take_traced_hyperparameters_without_retracing():
  traces = []

  @jax.jit
  def run(tau, anchor, ema, floor):
    traces.append(1)
    opts = _opts(objective="robust", temperature=tau, anchor=anchor, ema=ema, weight_floor=floor)
    p = jnp.asarray([0.5, 0.3, 0.2])
    return weights.running_weights(_stats(p * 10, [1.0, 1.5, 0.5]), p, jnp.full(M, 1 / M),
                                   jnp.ones((), jnp.int32), opts)

  a = run(0.7, 0.4, 0.1, 0.0)
  b = run(0.2, 0.9, 0.5, 0.2)
  assert len(traces) == 1 and not np.allclose(a.applied, b.applied)


# ---------------------------------------------------------------- coefficients


def test_sample_coefficients_against_numpy():
  w, assign = np.array([0.5, 0.3, 0.2]), np.array([0, 0, 1, 2, 2, 2])
  mask = np.array([True, True, True, True, True, False])
  counts = np.bincount(assign[mask], minlength=M)
  got = coefficients.sample_coefficients(jnp.asarray(w), jnp.asarray(assign),
                                         jnp.asarray(counts), jnp.asarray(mask))
  np.testing.assert_allclose(got, np.where(mask, w[assign] / counts[assign], 0), rtol=1e-6)
  assert got.dtype == jnp.float32


def test_frequency_coefficients_against_numpy():
  w, p = np.array([0.6, 0.3, 0.1]), np.array([0.2, 0.3, 0.5])
  assign = np.array([0, 1, 2, 2, 1, 0])
  mask = np.array([True, True, True, True, False, True])
  for cap in (np.inf, 2.0):
    got = coefficients.frequency_coefficients(jnp.asarray(w), jnp.asarray(p),
                                              jnp.asarray(assign), jnp.asarray(mask), cap)
    r = np.where(mask, np.minimum(w / p, cap)[assign], 0)
    np.testing.assert_allclose(got, r / r.sum(), rtol=1e-6)
  # w = p: the plain mean over the kept samples; no kept sample: all zero.
  got = coefficients.frequency_coefficients(jnp.asarray(p), jnp.asarray(p),
                                            jnp.asarray(assign), jnp.asarray(mask))
  np.testing.assert_allclose(got, mask / mask.sum(), rtol=1e-6)
  got = coefficients.frequency_coefficients(jnp.asarray(w), jnp.asarray(p),
                                            jnp.asarray(assign), jnp.zeros(6, bool))
  assert not np.asarray(got).any()
  # Every ratio 0 (weights only on absent domains): uniform over the kept.
  got = coefficients.frequency_coefficients(jnp.asarray([0, 0, 1.0]), jnp.asarray([0.5, 0.5, 0]),
                                            jnp.asarray([0, 1, 1]))
  np.testing.assert_allclose(got, [1 / 3] * 3, rtol=1e-6)


def test_post_stratified_coefficients_against_numpy():
  # Domain 3 is absent from the batch (its share goes to the present ones);
  # the masked sample is domain 0's, so n_0 = 1.
  w, p = np.array([0.5, 0.2, 0.2, 0.1]), np.array([0.25, 0.25, 0.3, 0.2])
  assign = np.array([0, 0, 1, 2, 2, 1])
  mask = np.array([True, False, True, True, True, True])
  counts = np.bincount(assign[mask], minlength=4)
  for cap in (np.inf, 1.5):
    got = coefficients.post_stratified_coefficients(
        jnp.asarray(w), jnp.asarray(p), jnp.asarray(assign), jnp.asarray(counts),
        jnp.asarray(mask), cap)
    share = p * np.minimum(w / p, cap) * (counts > 0)
    want = np.where(mask, share[assign] / np.maximum(counts[assign], 1), 0) / share.sum()
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got.dtype == jnp.float32
    # Each present domain's share of the update is exactly its (renormalised) share.
    np.testing.assert_allclose(np.bincount(assign, weights=np.asarray(got), minlength=4),
                               share / share.sum(), rtol=1e-6, atol=1e-7)
  # No present domain with a positive share: uniform over the kept; none kept: zero.
  got = coefficients.post_stratified_coefficients(
      jnp.asarray([0, 0, 0, 1.0]), jnp.asarray(p), jnp.asarray(assign), jnp.asarray(counts),
      jnp.asarray(mask))
  np.testing.assert_allclose(got, mask / mask.sum(), rtol=1e-6)
  got = coefficients.post_stratified_coefficients(
      jnp.asarray(w), jnp.asarray(p), jnp.asarray(assign), jnp.zeros(4, jnp.int32),
      jnp.zeros(6, bool))
  assert not np.asarray(got).any()


def test_post_stratified_variance_is_cochrans():
  """With w = p the coefficients give the post-stratified mean; over many
  batches its variance is the within-domain term ``sum_j p_j s_j^2 / B``
  (Cochran, Sampling Techniques, 5A.9, to first order), where the plain
  mean's adds the between-domain term ``sum_j p_j (m_j - m)^2 / B``."""
  rng = np.random.default_rng(0)
  p = np.array([0.5, 0.3, 0.2])
  m_j, s_j = np.array([-2.0, 1.0, 4.0]), np.array([1.0, 0.5, 2.0])
  b, trials = 64, 4000
  labels = rng.choice(3, size=(trials, b), p=p)
  x = m_j[labels] + s_j[labels] * rng.standard_normal((trials, b))
  counts = np.stack([np.bincount(row, minlength=3) for row in labels])
  a = jax.vmap(lambda asg, cnt: coefficients.post_stratified_coefficients(
      jnp.asarray(p, jnp.float32), jnp.asarray(p, jnp.float32), asg, cnt))(
      jnp.asarray(labels), jnp.asarray(counts))
  post = np.sum(np.asarray(a, np.float64) * x, axis=1)
  plain = x.mean(1)
  within = np.sum(p * s_j ** 2) / b
  between = np.sum(p * (m_j - p @ m_j) ** 2) / b
  # Standard error of a variance over 4000 trials: ~2.2 %; the 1/B^2 term of
  # post-stratification adds ~(1 - p_j) s_j^2 / (B p_j)^2 summed: < 1 %.
  np.testing.assert_allclose(post.var(), within, rtol=0.08)
  np.testing.assert_allclose(plain.var(), within + between, rtol=0.08)
  np.testing.assert_allclose(post.mean(), p @ m_j, atol=4 * np.sqrt(within / trials))


# ---------------------------------------------------------------- state layout

_PERSISTENT_PATHS = [".count", ".key", ".centroids", ".weights", ".raw_weights",
                     ".applied_weights", ".counts", ".assignments", ".coefficients", ".kept",
                     ".nonfinite", ".nonfinite_total", ".mass", ".sums.mass", ".sums.sum_z",
                     ".sums.sum_sq", ".sums.sum_loss", ".frequencies", ".reseeded"]
_BATCH_PATHS = [".count", ".key", ".centroids", ".weights", ".buffer", ".buffer_valid",
                ".raw_weights", ".applied_weights", ".counts", ".assignments", ".coefficients",
                ".kept", ".nonfinite", ".nonfinite_total"]


@pytest.mark.parametrize("kw, paths, domains_type", [
    (dict(batch_size=B), _PERSISTENT_PATHS, domain_modes.PersistentDomains),
    (dict(domains="batch", buffer_size=4, batch_size=B), _BATCH_PATHS, domain_modes.BatchDomains),
])
def test_state_layout_key_paths_and_properties(kw, paths, domains_type):
  """Leaves keep the flat names of earlier versions (sharding rules and
  checkpoints read them); the sub-state's fields are readable on the state."""
  state = dg.dograph_transform(M, K, **kw).init(None)
  assert isinstance(state.domains, domains_type)
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  assert [jax.tree_util.keystr(p) for p, _ in flat] == paths
  for name in ("centroids", "frequencies", "mass", "sums", "reseeded", "buffer", "buffer_valid"):
    assert getattr(state, name) is getattr(state.domains, name, None)
  again = jax.tree.map(lambda x: x, state)
  assert type(again) is dg.DoGraphState and type(again.domains) is domains_type
  assert jax.tree.structure(again) == jax.tree.structure(state)


def test_state_without_batch_size_or_buffer_has_no_empty_arrays():
  state = dg.dograph_transform(M, K, domains="batch").init(None)
  assert state.assignments is None and state.buffer is None and state.frequencies is None
  assert all(x.size > 0 for x in jax.tree.leaves(state))  # orbax cannot save size-0 arrays


def test_state_checkpoint_round_trip(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  tx = optax.chain(dg.dograph_transform(M, K, batch_size=B), optax.sgd(0.1))
  state = jax.tree.map(lambda x: x + 1 if x.dtype != jnp.uint32 else x, tx.init({"w": jnp.ones(2)}))
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "s", state)
    ckpt.wait_until_finished()
    back = ckpt.restore(tmp_path / "s", jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
  assert isinstance(back[0], dg.DoGraphState)
  jax.tree.map(np.testing.assert_array_equal, back, state)
