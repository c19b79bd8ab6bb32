"""Data Mixing Law: fit (Huber, restarts), predict, optimise on the simplex.

Oracles: laws with known parameters, the reference's own objective written in
torch (``law.py``: ``exp(log_c) + exp(log_k + x @ t)``, ``huber_loss`` summed),
a closed-form KKT optimum, a brute-force grid over the 3-simplex, and the KKT
conditions of the simplex problem.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the reference objective is torch code

from dograph_jax.mixing import mixing_law as ml


def _law(rng, d, m=None):
  m = d if m is None else m
  t = rng.uniform(0.0, 0.3, size=(m, d))
  if m == d:
    np.fill_diagonal(t, -rng.uniform(1.0, 3.0, size=d))
  else:
    t[:, :m] -= np.diag(rng.uniform(1.0, 3.0, size=m))
  return ml.MixingLawParams(rng.uniform(1.5, 2.5, size=m), rng.uniform(0.5, 1.5, size=m), t)


def test_predict_losses_matches_the_formula():
  rng = np.random.default_rng(0)
  p = _law(rng, 3)
  r = rng.dirichlet(np.ones(3), size=5)
  expected = np.array([[p.c[i] + p.k[i] * np.exp(sum(p.t[i, j] * r[n, j] for j in range(3)))
                        for i in range(3)] for n in range(5)])
  np.testing.assert_allclose(ml.predict_losses(p, r), expected, rtol=1e-13)


@pytest.mark.parametrize("num_linearised,restarts", [(4, 4), (0, 16)])
def test_fit_recovers_a_noiseless_law(num_linearised, restarts):
  # (0, 16): the reference's random starts alone also find the law.
  rng = np.random.default_rng(1)
  p = _law(rng, 4)
  r = rng.dirichlet(np.ones(4), size=24)
  fit = ml.fit_mixing_law(r, ml.predict_losses(p, r), restarts=restarts,
                          num_linearised=num_linearised, seed=0)
  assert fit.c.shape == (4,) and fit.k.shape == (4,) and fit.t.shape == (4, 4)
  assert np.all(fit.c > 0) and np.all(fit.k > 0)
  r_new = rng.dirichlet(np.ones(4), size=200)
  truth = ml.predict_losses(p, r_new)
  rel = np.abs(ml.predict_losses(fit, r_new) / truth - 1)
  assert rel.max() < 1e-3, rel.max()


def test_fit_with_fewer_validation_than_training_domains():
  rng = np.random.default_rng(2)
  p = _law(rng, 3, m=2)
  r = rng.dirichlet(np.ones(3), size=12)
  fit = ml.fit_mixing_law(r, ml.predict_losses(p, r), restarts=4)
  assert fit.t.shape == (2, 3)
  r_new = rng.dirichlet(np.ones(3), size=50)
  np.testing.assert_allclose(ml.predict_losses(fit, r_new), ml.predict_losses(p, r_new),
                             rtol=1e-3)


def test_huber_resists_one_outlier_where_least_squares_does_not():
  rng = np.random.default_rng(1)
  p = _law(rng, 4)
  r = rng.dirichlet(np.ones(4), size=24)
  y = ml.predict_losses(p, r)
  y[3, 1] += 1.0  # one diverged proxy run on domain 1
  r_new = rng.dirichlet(np.ones(4), size=200)
  truth = ml.predict_losses(p, r_new)
  err = {}
  for name, delta in [("huber", 0.05), ("ls", None)]:
    fit = ml.fit_mixing_law(r, y, restarts=4, huber_delta=delta)
    e = np.abs(ml.predict_losses(fit, r_new) - truth)
    err[name] = e[:, 1].max()
    # The clean domains are fitted exactly either way.
    assert np.delete(e, 1, axis=1).max() < 1e-6
  # The outlier pulls the least-squares fit with its full residual (~1); it
  # pulls the Huber fit with at most delta = 0.05, i.e. ~20x less.
  assert err["ls"] > 0.1, err
  assert err["huber"] < 0.2 * err["ls"], err


def test_fit_is_a_stationary_point_of_the_reference_objective():
  """The reference minimises sum huber_loss(exp(log_c) + exp(log_k + x @ t), y)
  with torch; at our fit its torch gradient must vanish (outlier data, so the
  linear branch of the Huber loss is active)."""
  rng = np.random.default_rng(3)
  p = _law(rng, 3)
  r = rng.dirichlet(np.ones(3), size=15)
  y = ml.predict_losses(p, r) + 0.01 * rng.normal(size=(15, 3))
  y[0, 0] += 0.5
  fit = ml.fit_mixing_law(r, y, restarts=4, huber_delta=0.05)
  x = torch.tensor(r)
  for i in range(3):
    # The same point in the reference's parameterisation.
    param = torch.tensor(np.concatenate([[np.log(fit.c[i]), np.log(fit.k[i])], fit.t[i]]),
                         requires_grad=True)
    pred = torch.exp(param[0]) + torch.exp(param[1] + x @ param[2:])
    loss = torch.nn.functional.huber_loss(pred, torch.tensor(y[:, i]), delta=0.05,
                                          reduction="sum")
    loss.backward()
    assert param.grad.abs().max().item() < 1e-6, (i, param.grad)
    np.testing.assert_allclose(loss.item(), ml.huber(
        ml.predict_losses(fit, r)[:, i] - y[:, i], 0.05).sum(), rtol=1e-12)


def test_huber_matches_torch():
  e = np.linspace(-0.3, 0.3, 61)
  ref = torch.nn.functional.huber_loss(torch.tensor(e), torch.zeros(61), delta=0.05,
                                       reduction="none").numpy()
  np.testing.assert_allclose(ml.huber(e, 0.05), ref, rtol=1e-12, atol=1e-15)


def test_fit_rejects_bad_input():
  rng = np.random.default_rng(0)
  r = rng.dirichlet(np.ones(3), size=6)
  y = np.full((6, 3), 3.0)
  with pytest.raises(ValueError, match="NaN"):
    ml.fit_mixing_law(r, np.where(np.eye(6, 3) > 0, np.nan, y))
  with pytest.raises(ValueError, match="NaN"):
    ml.fit_mixing_law(np.where(r > 0.5, np.nan, r), y)
  with pytest.raises(ValueError, match="shape"):
    ml.fit_mixing_law(r, y[:5])
  with pytest.raises(ValueError, match="shape"):
    ml.fit_mixing_law(r, y[:, 0])
  with pytest.raises(ValueError, match="D \\+ 1"):
    ml.fit_mixing_law(r[:3], y[:3])
  with pytest.raises(ValueError, match="> 0"):
    ml.fit_mixing_law(r, -y)
  with pytest.raises(ValueError, match="mixture"):
    ml.fit_mixing_law(r * 2, y)
  with pytest.raises(ValueError, match="domains"):
    ml.predict_losses(_law(rng, 4), r)


def test_optimum_of_a_separable_law_matches_the_closed_form():
  """L_i = c_i + k_i exp(-a_i r_i), uniform weights. KKT on the simplex:
  k_i a_i exp(-a_i r_i) = lam, so r_i = (log(k_i a_i) - log lam) / a_i with
  log lam = (sum_i log(k_i a_i) / a_i - 1) / sum_i (1 / a_i)."""
  a, k = np.array([2.0, 3.0, 4.0]), np.array([1.0, 2.0, 1.5])
  p = ml.MixingLawParams(np.array([2.0, 2.5, 3.0]), k, -np.diag(a))
  log_lam = (np.sum(np.log(k * a) / a) - 1) / np.sum(1 / a)
  r_star = (np.log(k * a) - log_lam) / a
  assert np.all(r_star > 0)  # interior: the closed form applies
  r = ml.optimal_mixture(p)
  np.testing.assert_allclose(r, r_star, atol=1e-6)


def test_optimum_beats_a_brute_force_grid_on_the_3_simplex():
  rng = np.random.default_rng(4)
  p = _law(rng, 3)
  w = np.array([0.5, 0.3, 0.2])
  r = ml.optimal_mixture(p, target_weights=w)
  assert r.shape == (3,) and np.all(r >= 0) and abs(r.sum() - 1) < 1e-12
  n = 300
  i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
  keep = i + j <= n
  grid = np.stack([i[keep], j[keep], n - i[keep] - j[keep]], axis=1) / n
  total = ml.predict_losses(p, grid) @ w
  best = grid[np.argmin(total)]
  f_r = ml.predict_losses(p, r[None]) @ w
  assert f_r[0] <= total.min() + 1e-12
  np.testing.assert_allclose(r, best, atol=3.0 / n)


def test_optimum_satisfies_kkt_with_upper_bounds():
  # This law's optimum has every kind of coordinate: two free, two at their
  # cap, one at zero (asserted below, so the test checks all three rules).
  p = _law(np.random.default_rng(8), 5)
  w = np.full(5, 0.2)
  ub = np.array([0.1, 1.0, 1.0, 0.3, 1.0])
  r = ml.optimal_mixture(p, target_weights=w, upper_bounds=ub)
  assert np.all(r >= 0) and np.all(r <= ub + 1e-9) and abs(r.sum() - 1) < 1e-12
  # Gradient of sum_i w_i L_i: g_j = sum_i w_i k_i exp(t_i . r) t_ij.
  g = (w * p.k * np.exp(p.t @ r)) @ p.t
  free = (r > 1e-7) & (r < ub - 1e-7)
  assert free.sum() >= 2 and (r <= 1e-7).any() and (r >= ub - 1e-7).any(), r
  lam = g[free].mean()
  np.testing.assert_allclose(g[free], lam, atol=1e-5)
  assert np.all(g[r <= 1e-7] >= lam - 1e-5)
  assert np.all(g[r >= ub - 1e-7] <= lam + 1e-5)


def test_all_target_weight_on_one_domain_gives_its_vertex():
  # With t_00 < 0 <= t_0j, domain 0's loss is smallest at r = e_0.
  p = _law(np.random.default_rng(6), 3)
  r = ml.optimal_mixture(p, target_weights=np.array([1.0, 0.0, 0.0]))
  np.testing.assert_allclose(r, [1.0, 0.0, 0.0], atol=1e-6)


def test_optimal_mixture_rejects_bad_input():
  p = _law(np.random.default_rng(0), 3)
  with pytest.raises(ValueError, match="target_weights"):
    ml.optimal_mixture(p, target_weights=np.ones(2))
  with pytest.raises(ValueError, match="target_weights"):
    ml.optimal_mixture(p, target_weights=np.array([1.0, -1.0, 1.0]))
  with pytest.raises(ValueError, match="upper_bounds"):
    ml.optimal_mixture(p, upper_bounds=np.array([0.2, 0.2, 0.2]))
  with pytest.raises(ValueError, match="NaN"):
    ml.optimal_mixture(p._replace(c=np.array([1.0, np.nan, 1.0])))
