"""dograph_transform against its parts and independent oracles: its raw
weights are ``solve_weights`` of the statistics of its own clusters; cosine
clusters are invariant to each sample's scale; without warm starts each
step's partition is scikit-learn's; no traced hyperparameter recompiles
(counted in JAX's compilation log); k-means++ draws follow D^2 (chi-square)."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats as scipy_stats
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

import dograph_jax as dg
from dograph_jax.clustering import kmeans_plusplus
from dograph_jax.domains import zero_running_sums, update_running_sums, running_domain_stats

B, K, M, P = 32, 12, 4, 3


def _sketches(step, spread=0.3):
  rng = np.random.default_rng(step)
  centres = np.random.default_rng(7).normal(size=(M, K)) * 3
  z = centres[rng.permutation(np.arange(B) % M)] + rng.normal(size=(B, K)) * spread
  return z.astype(np.float32), rng.uniform(1, 3, size=B).astype(np.float32)


def _fake(z, losses):
  """FactoredGrads with update map ``a -> sum_i a_i`` (the transform's output is not
  under test here)."""
  return dg.FactoredGrads(jnp.asarray(losses), jnp.asarray(z),
                          lambda a, keep=None: {"w": jnp.zeros((P,)) + jnp.sum(a)}, False, None)


def _drive(tx, steps):
  params = {"w": jnp.zeros((P,))}
  state = tx.init(params)
  update = jax.jit(lambda z, l, s: tx.update(_fake(z, l), s, params))
  out = []
  for t in range(steps):
    z, losses = _sketches(t)
    _, state = update(z, losses, state)
    out.append((z, losses, state))
  return out


@pytest.mark.parametrize("lambda_graph", [0.0, 0.3])
@pytest.mark.parametrize("objective", dg.OBJECTIVES)
def test_batch_mode_raw_weights_are_solve_weights_of_its_clusters(objective, lambda_graph):
  tx = dg.dograph_transform(M, K, objective, domains="batch", batch_size=B,
                            lambda_graph=lambda_graph, temperature=0.7)
  for z, losses, state in _drive(tx, 3):
    stats = dg.domain_stats(jnp.asarray(z), state.assignments, M, jnp.asarray(losses))
    want = dg.solve_weights(stats, objective, lambda_graph=lambda_graph, temperature=0.7)
    np.testing.assert_allclose(state.raw_weights, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(state.counts, np.bincount(state.assignments, minlength=M))


@pytest.mark.parametrize("objective", dg.OBJECTIVES)
def test_persistent_raw_weights_are_solve_weights_of_the_running_statistics(objective):
  decay = 0.8
  tx = dg.dograph_transform(M, K, objective, batch_size=B, decay=decay, reseed_fraction=0.0)
  sums = zero_running_sums(M, K)
  for z, losses, state in _drive(tx, 4):
    sums = update_running_sums(sums, jnp.asarray(z), state.assignments, jnp.asarray(losses),
                               decay=decay)
    stats = running_domain_stats(sums)
    p = stats.counts / jnp.sum(stats.counts)
    np.testing.assert_allclose(state.frequencies, p, rtol=1e-5)
    want = dg.solve_weights(stats, objective, prior=p)
    np.testing.assert_allclose(state.raw_weights, want, rtol=1e-5, atol=1e-7)
    # applied = the anchor's geometric path between p and the optimum (anchor 0.5)
    np.testing.assert_allclose(state.applied_weights, dg.anchored_weights(want, p, 0.5),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("domains", ["batch", "persistent"])
def test_cosine_clusters_ignore_each_samples_scale(domains):
  """Spherical K-means sees directions only: rescaling every sketch by its own
  positive factor leaves every step's assignments unchanged."""
  tx = dg.dograph_transform(M, K, domains=domains, distance="cosine", batch_size=B)
  params = {"w": jnp.zeros((P,))}
  update = jax.jit(lambda z, l, s: tx.update(_fake(z, l), s, params))
  s1 = s2 = tx.init(params)
  factors = np.random.default_rng(3).uniform(0.01, 100.0, size=(B, 1)).astype(np.float32)
  for t in range(3):
    z, losses = _sketches(t, spread=1.0)
    _, s1 = update(z, losses, s1)
    _, s2 = update(z * factors, losses, s2)
    np.testing.assert_array_equal(s1.assignments, s2.assignments)
  # ... which Euclidean K-means does not.
  tx_e = dg.dograph_transform(M, K, domains=domains, distance="euclidean", batch_size=B)
  z, losses = _sketches(0, spread=1.0)
  a = tx_e.update(_fake(z, losses), tx_e.init(params), params)[1].assignments
  b = tx_e.update(_fake(z * factors, losses), tx_e.init(params), params)[1].assignments
  assert adjusted_rand_score(np.asarray(a), np.asarray(b)) < 0.99


def test_without_warm_start_each_step_is_scikit_learns_partition():
  tx = dg.dograph_transform(M, K, domains="batch", warm_start=False, batch_size=B)
  for z, _, state in _drive(tx, 4):
    ref = KMeans(M, n_init=10, random_state=0).fit_predict(z)
    assert adjusted_rand_score(ref, np.asarray(state.assignments)) == 1.0


TRACED = {"lambda_graph": (0.0, 0.7), "lambda_dir": (1.0, 0.1), "lambda_align": (1.0, 5.0),
          "ema": (0.0, 0.6), "weight_floor": (0.0, 0.05), "eps": (1e-6, 0.5),
          "temperature": (1.0, 0.2), "decay": (0.9, 0.5), "anchor": (0.5, 1.0),
          "max_ratio": (4.0, 1.5), "reseed_fraction": (0.05, 0.5)}
# The objective (and mode) under which each one changes the weights.
READER = {"lambda_dir": "variance", "lambda_align": "alignment", "temperature": "robust",
          "eps": "uncertainty"}
# Where the default weights stay within the cap, a sharp robust optimum at
# anchor 1 makes it bind.
EXTRA = {"max_ratio": {"objective": "robust", "anchor": 1.0, "temperature": 0.05}}


class _CompileLog(logging.Handler):
  def __init__(self):
    super().__init__()
    self.lines = []

  def emit(self, record):
    if "Compiling" in record.getMessage():
      self.lines.append(record.getMessage())


@pytest.mark.parametrize("name", sorted(TRACED))
def test_traced_hyperparameter_does_not_recompile(name):
  """Counted in JAX's own compilation log (``jax_log_compiles``), not by a
  Python-side trace counter."""
  first, second = TRACED[name]
  options = {"objective": READER.get(name, "uncertainty"), **EXTRA.get(name, {}), name: first}
  make = optax.inject_hyperparams(dg.dograph_transform, static_args=dg.STATIC_ARGS)
  tx = make(num_domains=M, sketch_dim=K, batch_size=B, **options)
  params = {"w": jnp.zeros((P,))}
  step = jax.jit(lambda z, l, s: tx.update(_fake(z, l), s, params))
  z, losses = _sketches(0)
  z1, l1 = _sketches(1)
  state = tx.init(params)
  log = _CompileLog()
  logger = logging.getLogger("jax")
  logger.addHandler(log)
  try:
    with jax.log_compiles(True):
      _, state = step(z, losses, state)
      jax.block_until_ready(state)
      first_compiles = list(log.lines)
      log.lines.clear()
      _, a = step(z1, l1, state)
      changed = jax.tree.map(lambda x: x, state)
      changed.hyperparams[name] = jnp.asarray(second, jnp.float32)
      _, b = step(z1, l1, changed)
      jax.block_until_ready(b)
  finally:
    logger.removeHandler(log)
  assert any("<lambda>" in line for line in first_compiles), first_compiles  # the log works
  assert log.lines == [], log.lines
  if name != "reseed_fraction":  # re-seeding needs a starved cluster to show
    before = (a.inner_state.applied_weights, a.inner_state.coefficients)
    after = (b.inner_state.applied_weights, b.inner_state.coefficients)
    assert not all(np.allclose(x, y) for x, y in zip(before, after)), name


def test_kmeans_plusplus_second_seed_follows_d2_sampling():
  """Chi-square over 20,000 seedings of 12 points into 2 clusters: given the
  first seed ``f``, the second is ``j`` with probability
  ``||x_j - x_f||^2 / sum_l ||x_l - x_f||^2`` (Arthur & Vassilvitskii, 2007)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(12, 3)).astype(np.float32) * np.array([1.0, 2.0, 0.5], np.float32)
  n = 20_000
  keys = jax.random.split(jax.random.PRNGKey(1), n)
  seeds = jax.jit(jax.vmap(lambda k: kmeans_plusplus(jnp.asarray(x), 2, k)))(keys)
  seeds = np.asarray(seeds)
  idx = np.argmin(((seeds[:, :, None, :] - x[None, None]) ** 2).sum(-1), axis=2)  # (n, 2)
  first, second = idx[:, 0], idx[:, 1]
  d2 = ((x[:, None] - x[None]) ** 2).sum(-1).astype(np.float64)  # (12, 12)
  cond = d2 / d2.sum(1, keepdims=True)
  # First seed: uniform.
  assert scipy_stats.chisquare(np.bincount(first, minlength=12)).pvalue > 1e-3
  # Second given first: observed (first, second) pair counts against n_f * P(j | f).
  observed = np.zeros((12, 12))
  np.add.at(observed, (first, second), 1)
  expected = np.bincount(first, minlength=12)[:, None] * cond
  mask = expected > 0  # P(f | f) = 0: never drawn, left out
  assert observed[~mask].sum() == 0
  dof_groups = 12  # each row's counts are fixed by n_f
  chi2 = float(((observed[mask] - expected[mask]) ** 2 / expected[mask]).sum())
  p = scipy_stats.chi2.sf(chi2, mask.sum() - dof_groups)
  assert p > 1e-3, (chi2, p)
