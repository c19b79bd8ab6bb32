"""Weight objectives against scipy.optimize on the simplex and closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import scipy.special
from hypothesis import given, settings, strategies as st

import dograph_jax as dg
from dograph_jax import objectives, simplex


def _stats(seed, m=6, b=48, k=16, empty=(5,), singleton=(4,), raw=False):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(m, k)) * rng.uniform(0.5, 3, size=(m, 1))
  spread = rng.uniform(0.2, 2.0, size=m)
  assign = rng.integers(0, m, b)
  for j in empty:
    assign[assign == j] = 0
  for j in singleton:
    assign[assign == j] = 1
    assign[1] = j
  z = centers[assign] + spread[assign, None] * rng.normal(size=(b, k))
  losses = rng.uniform(1.0, 4.0, m)[assign] + 0.1 * rng.normal(size=b)
  z = z.astype(np.float32)
  stats = dg.domain_stats(jnp.asarray(z), jnp.asarray(assign), m,
                          jnp.asarray(losses, jnp.float32))
  return (stats, z.astype(np.float64), assign) if raw else stats


def _numpy_variances(z, assign, m, eps=1e-6):
  """``s2_j`` of "uncertainty" from the raw sketches (docs/method.md §3):
  each domain's mean squared distance to its mean; a singleton takes the
  pooled within-domain variance ``sum SS / (n - #domains)``; then the
  relative floor ``eps * mean_j s2_j``."""
  present = np.bincount(assign, minlength=m) > 0
  own, ss = np.zeros(m), 0.0
  for j in np.flatnonzero(present):
    rows = z[assign == j]
    sq = np.sum((rows - rows.mean(0)) ** 2, axis=1)
    own[j], ss = sq.mean(), ss + sq.sum()
  pooled = ss / (len(z) - present.sum())
  counts = np.bincount(assign, minlength=m)
  s2 = np.where(counts >= 2, own, pooled) * present
  return s2 + eps * s2[present].mean(), present


def _scipy_min(fun, present, starts=1, seed=0):
  """Minimise fun over the simplex on the present coordinates with SLSQP."""
  idx = np.flatnonzero(present)
  n = len(idx)
  rng = np.random.default_rng(seed)
  best = None
  for s in range(starts):
    x0 = np.full(n, 1.0 / n) if s == 0 else rng.dirichlet(np.ones(n))
    def f(v):
      w = np.zeros(len(present))
      w[idx] = v
      return fun(w)
    res = scipy.optimize.minimize(
        f, x0, method="SLSQP", bounds=[(0, 1)] * n,
        constraints=[{"type": "eq", "fun": lambda v: np.sum(v) - 1}],
        options={"ftol": 1e-14, "maxiter": 1000})
    if best is None or res.fun < best.fun:
      best = res
  w = np.zeros(len(present))
  w[idx] = best.x
  return w, best.fun


def _np(stats):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), stats)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("lambda_graph", [0.0, 0.5])
def test_uncertainty(seed, lambda_graph):
  stats, z, assign = _stats(seed, raw=True)
  s = _np(stats)
  s2, present = _numpy_variances(z, assign, 6)  # not the code's effective_variances
  np.testing.assert_allclose(np.asarray(objectives.effective_variances(stats))[present],
                             s2[present], rtol=1e-4)
  scale = np.mean(s2[s.counts > 0])
  fun = lambda w: (np.sum(w**2 * s2) + lambda_graph * scale * w @ s.laplacian @ w)
  w_ref, f_ref = _scipy_min(fun, s.counts > 0)
  w = np.asarray(dg.solve_weights(stats, "uncertainty",
                                  lambda_graph=lambda_graph, num_steps=2000))
  assert fun(w) <= f_ref + 1e-6 * abs(f_ref)
  np.testing.assert_allclose(w, w_ref, atol=2e-4)
  assert w[5] == 0.0  # empty domain
  if lambda_graph == 0.0:
    # Closed form: inverse variance.
    inv = np.where(s.counts > 0, 1 / s2, 0)
    np.testing.assert_allclose(w, inv / inv.sum(), rtol=1e-5)
    # The singleton uses the pooled variance, not its own zero.
    np.testing.assert_allclose(s2[4], s.pooled_variance, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lambda_graph", [0.0, 0.3])
def test_variance_objective(seed, lambda_graph):
  stats = _stats(seed)
  s = _np(stats)
  present = s.counts > 0
  a = np.linalg.norm(s.means, axis=1)
  scale = np.mean(a[present] ** 2)

  def fun(w):  # written from docs/method.md §3, independently of variance_qp
    wa = (w * a)[present]
    g = w @ s.means
    return (np.sum((wa - wa.mean()) ** 2) + 1.0 * np.sum((g - s.batch_mean) ** 2)
            + lambda_graph * scale * w @ s.laplacian @ w)

  _, f_ref = _scipy_min(fun, present, starts=4)
  w = np.asarray(dg.solve_weights(stats, "variance", lambda_dir=1.0,
                                  lambda_graph=lambda_graph, num_steps=3000))
  assert fun(w) <= f_ref + 1e-5 * abs(f_ref) + 1e-7
  assert w[5] == 0.0


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_robust_closed_form(temperature):
  stats = _stats(3)
  s = _np(stats)
  w = np.asarray(dg.solve_weights(stats, "robust", temperature=temperature))
  present = s.counts > 0
  ref = np.zeros(6)
  ref[present] = scipy.special.softmax(s.losses[present] / temperature)
  np.testing.assert_allclose(w, ref, rtol=1e-5, atol=1e-7)
  m = present.sum()
  fun = lambda w: -(w @ s.losses) + temperature * np.sum(
      scipy.special.xlogy(w, w * m))
  _, f_ref = _scipy_min(fun, present)
  assert fun(w) <= f_ref + 1e-6


def test_robust_with_graph_matches_scipy():
  stats = _stats(4)
  s = _np(stats)
  present = s.counts > 0
  m, tau, lam = present.sum(), 0.5, 0.4
  fun = lambda w: (-(w @ s.losses) + tau * np.sum(
      scipy.special.xlogy(w, w * m))
                   + lam * w @ s.laplacian @ w)
  w_ref, f_ref = _scipy_min(fun, present, starts=3)
  w = np.asarray(dg.solve_weights(stats, "robust", temperature=tau,
                                  lambda_graph=lam, num_steps=500))
  assert fun(w) <= f_ref + 1e-6
  np.testing.assert_allclose(w, w_ref, atol=1e-3)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lambda_align,lambda_graph", [(1.0, 0.0), (0.2, 0.0), (1.0, 0.5)])
def test_alignment_reaches_scipy_optimum(seed, lambda_align, lambda_graph):
  stats = _stats(seed)
  w = dg.solve_weights(stats, "alignment", lambda_align=lambda_align,
                       lambda_graph=lambda_graph, num_steps=500)
  s = _np(stats)
  present = s.counts > 0
  u = np.where(present, 1.0 / present.sum(), 0.0)

  def neg(w):  # written from docs/method.md §3
    g = w @ s.means
    cos = np.where(present, s.means @ g / (np.linalg.norm(s.means, axis=1) + 1e-30)
                   / (np.linalg.norm(g) + 1e-30), 0)
    return -(w @ cos - lambda_align / 2 * np.sum((w - u) ** 2)
             - lambda_graph * w @ s.laplacian @ w)

  _, f_ref = _scipy_min(neg, present, starts=6)
  assert neg(np.asarray(w, np.float64)) <= f_ref + 1e-4


def test_backends_agree():
  rng = np.random.default_rng(0)
  for _ in range(5):
    a = rng.normal(size=(7, 7))
    q = jnp.asarray(a @ a.T, jnp.float32)
    c = jnp.asarray(rng.normal(size=7), jnp.float32)
    mask = jnp.asarray(rng.uniform(size=7) < 0.8)
    w1 = simplex.minimize_quadratic(q, c, mask, backend="jaxopt", maxiter=3000, tol=1e-9)
    w2 = simplex.minimize_quadratic(q, c, mask, backend="optax", maxiter=3000, tol=1e-9)
    np.testing.assert_allclose(w1, w2, atol=1e-4)
    assert np.all(np.asarray(w1)[~np.asarray(mask)] == 0)


def test_masked_projection_is_subsimplex_projection():
  rng = np.random.default_rng(1)
  for _ in range(20):
    v = rng.normal(size=8) * 3
    mask = rng.uniform(size=8) < 0.6
    if not mask.any():
      continue
    w = np.asarray(simplex.project_simplex(jnp.asarray(v), jnp.asarray(mask), "optax"))
    # Oracle: scipy projection (closest point) on the sub-simplex.
    ref, _ = _scipy_min(lambda x: np.sum((x - v) ** 2), mask)
    np.testing.assert_allclose(w, ref, atol=1e-5)


def test_unknown_objective():
  with pytest.raises(ValueError, match="objective"):
    dg.solve_weights(_stats(0), "entropy")


@st.composite
def degenerate_stats(draw):
  m = draw(st.integers(1, 6))
  # Sketch width: rank one, or wider than most m. Each (m, k) compiles the
  # solver once per objective, so two widths instead of five keep the
  # examples on shapes already compiled.
  k = draw(st.sampled_from([1, 4]))
  scale = draw(st.sampled_from([0.0, 1e-30, 1e-20, 1e-6, 1.0, 1e6, 1e15, 1e20, 1e30]))
  counts = np.array(draw(st.lists(st.sampled_from([0, 0, 1, 2, 5]), min_size=m, max_size=m)),
                    np.float32)
  means = np.array(draw(st.lists(st.floats(-1, 1, width=32), min_size=m * k,
                                 max_size=m * k)), np.float32).reshape(m, k) * scale
  means[counts == 0] = 0
  dup = draw(st.booleans())
  if dup:
    means[:] = means[0]
  var = np.array(draw(st.lists(st.sampled_from([0.0, 1e-30, 1.0, 1e8, 1e30]), min_size=m,
                               max_size=m)), np.float32) * (counts >= 2)
  losses = np.array(draw(st.lists(st.floats(0, 50, width=32), min_size=m, max_size=m)),
                    np.float32) * (counts > 0)
  # In float64, then cast: at scale 1e30 the Gram matrix overflows float32
  # (inf), as it does in domain_stats; the cosine graph does not.
  m64 = means.astype(np.float64)
  gram = m64 @ m64.T
  norms = np.sqrt(np.diag(gram))
  denom = np.outer(norms, norms)
  adj = np.where(denom > 0, gram / np.where(denom > 0, denom, 1), 0)
  adj = np.maximum(adj, 0) * (1 - np.eye(m))
  with np.errstate(over="ignore"):
    gram = gram.astype(np.float32)
  lap = np.diag(adj.sum(1)) - adj
  return dg.DomainStats(jnp.asarray(counts), jnp.asarray(means), jnp.asarray(var),
                        jnp.asarray(losses), jnp.asarray(gram, jnp.float32),
                        jnp.asarray(adj, jnp.float32), jnp.asarray(lap, jnp.float32),
                        jnp.asarray(means.mean(0)), jnp.asarray(var.mean()))


_solve_jit = jax.jit(dg.solve_weights, static_argnames=("objective", "num_steps", "backend"))


@settings(max_examples=200, deadline=None)
@given(stats=degenerate_stats(), objective=st.sampled_from(dg.OBJECTIVES),
       lambda_graph=st.sampled_from([0.0, 0.5]),
       temperature=st.sampled_from([1e-3, 1.0]))
def test_weights_always_on_simplex(stats, objective, lambda_graph, temperature):
  # Jitted, as the transform calls it: one executable per (objective, shape),
  # reused across examples (eagerly, every call recompiled its loops).
  w = np.asarray(_solve_jit(stats, objective, lambda_graph=lambda_graph,
                            temperature=temperature, num_steps=50))
  assert np.all(np.isfinite(w)), w
  assert np.all(w >= 0)
  np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-5)
  present = np.asarray(stats.counts) > 0
  if present.any():
    assert np.all(w[~present] == 0)


def test_falls_back_to_optax_without_jaxopt(monkeypatch):
  """With jaxopt unimportable, 'auto' uses the optax solver and still solves."""
  import importlib
  import sys
  monkeypatch.setitem(sys.modules, "jaxopt", None)
  monkeypatch.setitem(sys.modules, "jaxopt.projection", None)
  fresh = importlib.reload(simplex)
  try:
    assert not fresh.HAS_JAXOPT
    with pytest.raises(ImportError):
      fresh.minimize_quadratic(jnp.eye(3), jnp.zeros(3), jnp.ones(3, bool), backend="jaxopt")
    w = fresh.minimize_quadratic(jnp.diag(jnp.asarray([1.0, 2.0, 4.0])), jnp.zeros(3),
                                 jnp.ones(3, bool), maxiter=2000, tol=1e-9)
    np.testing.assert_allclose(w, np.array([4, 2, 1]) / 7, atol=1e-4)  # inverse variance
  finally:
    monkeypatch.undo()
    importlib.reload(simplex)


# --- priors (persistent domains write the objectives against p) -------------

def _prior(stats, seed):
  present = np.asarray(stats.counts) > 0
  p = np.where(present, np.random.default_rng(seed).dirichlet(np.ones(len(present))), 0.0)
  return p / p.sum(), present


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("lambda_graph", [0.0, 0.5])
def test_robust_with_prior_matches_scipy(seed, lambda_graph):
  stats = _stats(seed)
  s = _np(stats)
  pi, present = _prior(stats, seed)
  tau = 0.7

  def fun(w):  # -(sum w L - tau KL(w || pi) - lambda w^T Lap w), from the docstring
    wp = w[present]
    kl = np.sum(np.where(wp > 0, wp * np.log(np.maximum(wp, 1e-300) / pi[present]), 0.0))
    return -(w @ s.losses - tau * kl - lambda_graph * w @ s.laplacian @ w)

  w_ref, f_ref = _scipy_min(fun, present, starts=3)
  w = np.asarray(dg.solve_weights(stats, "robust", temperature=tau, lambda_graph=lambda_graph,
                                  num_steps=500, prior=jnp.asarray(pi, jnp.float32)), np.float64)
  assert fun(w) <= f_ref + 1e-6
  np.testing.assert_allclose(w, w_ref, atol=1e-3)
  if lambda_graph == 0:  # closed form pi exp(L / tau)
    e = pi * np.exp(s.losses / tau)
    np.testing.assert_allclose(w, e / e.sum(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("lambda_graph", [0.0, 0.5])
def test_uncertainty_with_prior_matches_scipy(seed, lambda_graph):
  stats, z, assign = _stats(seed, raw=True)
  s = _np(stats)
  pi, present = _prior(stats, seed)
  m = present.sum()
  # per-domain variances from the raw sketches (pooled below 2 samples)
  s2, _ = _numpy_variances(z, assign, 6)
  eff = np.where(present, s2 / np.where(present, m * pi, 1.0), 0.0)
  scale = eff[present].mean()

  def fun(w):  # variance of the combined means: sum w^2 s2 / (m pi) + graph term
    return np.sum(w ** 2 * eff) + lambda_graph * scale * w @ s.laplacian @ w

  w_ref, f_ref = _scipy_min(fun, present, starts=3)
  w = np.asarray(dg.solve_weights(stats, "uncertainty", lambda_graph=lambda_graph,
                                  num_steps=2000, prior=jnp.asarray(pi, jnp.float32)),
                 np.float64)
  assert fun(w) <= f_ref * (1 + 1e-4)
  np.testing.assert_allclose(w, w_ref, atol=2e-3)
  if lambda_graph == 0:  # closed form pi / s2
    inv = np.where(present, pi / np.where(present, s2, 1.0), 0.0)
    np.testing.assert_allclose(w, inv / inv.sum(), rtol=1e-4, atol=1e-7)


def test_uniform_prior_is_the_default_and_alignment_stays_near_its_prior():
  stats = _stats(3)
  present = np.asarray(stats.counts) > 0
  u = jnp.asarray(np.where(present, 1.0 / present.sum(), 0.0), jnp.float32)
  for objective in ("uncertainty", "robust", "alignment"):
    np.testing.assert_allclose(dg.solve_weights(stats, objective, prior=u),
                               dg.solve_weights(stats, objective), rtol=1e-4, atol=1e-6)
  pi, _ = _prior(stats, 3)
  # a strong proximity term keeps alignment's weights at the prior
  w = dg.solve_weights(stats, "alignment", lambda_align=1e4, prior=jnp.asarray(pi, jnp.float32))
  np.testing.assert_allclose(np.asarray(w), pi, atol=1e-3)
