"""RegMix fitting half: proposals, regression, top-k simulation.

Oracles: Dirichlet moments (closed form), numpy least squares, scipy's
Spearman correlation, and synthetic laws whose optimum is known.
"""

import jax
import numpy as np
import pytest
from scipy import stats

from dograph_jax.mixing import regmix

# SlimPajama byte shares (docs/method.md §6): skewed like a real token prior.
SLIMPAJAMA = np.array([0.541, 0.287, 0.042, 0.037, 0.034, 0.031, 0.028])


def test_mixtures_valid_and_follow_the_reference_rules():
  x = regmix.sample_mixtures(0, SLIMPAJAMA, 256)
  assert x.shape == (256, 7)
  assert np.all(x >= 0)
  np.testing.assert_allclose(x.sum(axis=1), 1.0, atol=1e-12)
  # Non-zero weights are at least `minimum` and on its grid.
  assert x[x > 0].min() >= regmix.MINIMUM - 1e-15
  units = x / regmix.MINIMUM
  np.testing.assert_allclose(units, np.rint(units), atol=1e-8)
  # No domain above min(15 * prior, 1): StackExchange at most 0.42.
  assert np.all(x <= np.minimum(15 * SLIMPAJAMA / SLIMPAJAMA.sum(), 1.0) + 1e-12)
  # Deduplicated.
  assert np.unique(np.rint(units).astype(int), axis=0).shape[0] == 256
  # The small scales produce near-vertex mixtures, the large ones near-centre.
  assert (x.max(axis=1) > 0.9).any() and (x.max(axis=1) < 0.6).any()


def test_mixtures_reproducible_from_seed_and_key():
  a = regmix.sample_mixtures(3, SLIMPAJAMA, 32)
  np.testing.assert_array_equal(a, regmix.sample_mixtures(3, SLIMPAJAMA, 32))
  assert not np.array_equal(a, regmix.sample_mixtures(4, SLIMPAJAMA, 32))
  # A raw uint32 key and the typed key with the same bits agree.
  k_raw = jax.random.PRNGKey(7)
  k_typed = jax.random.wrap_key_data(k_raw)
  np.testing.assert_array_equal(regmix.sample_mixtures(k_raw, SLIMPAJAMA, 8),
                                regmix.sample_mixtures(k_typed, SLIMPAJAMA, 8))


def test_proposal_moments_match_the_tempered_dirichlet_scale_mixture():
  """Without the bound and the rounding, every proposal is Dirichlet(s * p),
  p = prior**0.5 / Z, s uniform over 15 log-spaced scales in [0.1, 5]. Its
  mean is p (whatever s) and E[x_j^2] = mean_s p_j (s p_j + 1) / (s + 1)."""
  n = 20_000
  # The sampler before deduplication (tiny concentrations give exact
  # vertices, whose duplicates sample_mixtures would drop).
  x, accept = regmix._proposals(np.random.default_rng(11), SLIMPAJAMA / SLIMPAJAMA.sum(), n,
                                temperature=0.5, min_strength=0.1, max_strength=5.0,
                                num_strengths=15, minimum=0.0, max_usage=None)
  assert accept.all()
  p = np.sqrt(SLIMPAJAMA) / np.sqrt(SLIMPAJAMA).sum()
  se = x.std(axis=0) / np.sqrt(n)
  assert np.all(np.abs(x.mean(axis=0) - p) < 5 * se), (x.mean(axis=0), p)
  # Centred on prior**0.5, not on the raw prior (CommonCrawl 0.541 vs 0.335).
  assert np.abs(x.mean(axis=0)[0] - SLIMPAJAMA[0]) > 50 * se[0]
  s = np.logspace(-1, np.log10(5), 15)[:, None]
  second = np.mean(p * (s * p + 1) / (s + 1), axis=0)
  se2 = (x ** 2).std(axis=0) / np.sqrt(n)
  assert np.all(np.abs((x ** 2).mean(axis=0) - second) < 5 * se2)


def test_bound_shifts_the_mean_toward_the_large_domains():
  # What the reference implies with its defaults: rejecting proposals whose
  # small domains exceed 15x their share cuts near-vertex draws on small
  # domains, so the mean moves off prior**0.5 toward the large domains.
  x = regmix.sample_mixtures(0, SLIMPAJAMA, 2000, sample_multiplier=10)
  p = np.sqrt(SLIMPAJAMA) / np.sqrt(SLIMPAJAMA).sum()
  assert x.mean(axis=0)[0] > p[0] + 0.03
  assert np.all(x.mean(axis=0)[2:] < p[2:])


def test_sample_mixtures_rejects_bad_input():
  with pytest.raises(ValueError, match="prior_D"):
    regmix.sample_mixtures(0, [0.5, np.nan, 0.5], 4)
  with pytest.raises(ValueError, match="prior_D"):
    regmix.sample_mixtures(0, [0.5, 0.0, 0.5], 4)
  with pytest.raises(ValueError, match="prior_D"):
    regmix.sample_mixtures(0, np.ones((2, 2)), 4)
  with pytest.raises(ValueError, match="no feasible"):
    regmix.sample_mixtures(0, [0.25, 0.25, 0.25, 0.25], 4, max_usage=0.5)
  with pytest.raises(ValueError, match="distinct"):
    # A coarse grid (minimum 0.25) on 2 domains has only 5 points.
    regmix.sample_mixtures(0, [0.5, 0.5], 10, minimum=0.25, max_usage=None)
  with pytest.raises(ValueError, match="1/minimum"):
    regmix.sample_mixtures(0, SLIMPAJAMA, 4, minimum=3e-4)


def test_linear_fit_recovers_a_linear_law_exactly():
  rng = np.random.default_rng(0)
  x = regmix.sample_mixtures(1, SLIMPAJAMA, 40)
  a, b = rng.normal(size=7), 3.0
  fit = regmix.fit_regression(x, x @ a + b, model="linear")
  x_new = rng.dirichlet(np.ones(7), size=100)
  np.testing.assert_allclose(fit.predict(x_new), x_new @ a + b, rtol=0, atol=1e-10)
  # Noisy targets: predictions are the least-squares projection. Oracle:
  # numpy lstsq on the mixtures alone (the rows sum to 1, so the columns
  # already span the intercept).
  y = x @ a + b + 0.1 * rng.normal(size=40)
  coef, *_ = np.linalg.lstsq(x, y, rcond=None)
  fit = regmix.fit_regression(x, y, model="linear")
  np.testing.assert_allclose(fit.predict(x_new), x_new @ coef, rtol=0, atol=1e-9)
  np.testing.assert_allclose(fit(x), x @ coef, rtol=0, atol=1e-9)


def test_fit_regression_rejects_bad_input():
  x = regmix.sample_mixtures(0, SLIMPAJAMA, 8)
  y = np.ones(8)
  with pytest.raises(ValueError, match="losses_N"):
    regmix.fit_regression(x, np.ones(7))
  with pytest.raises(ValueError, match="NaN"):
    regmix.fit_regression(x, np.where(np.arange(8) == 2, np.nan, 1.0))
  with pytest.raises(ValueError, match="NaN"):
    regmix.fit_regression(np.where(x > 0.5, np.nan, x), y)
  with pytest.raises(ValueError, match="mixture"):
    regmix.fit_regression(x * 2, y)
  with pytest.raises(ValueError, match="model"):
    regmix.fit_regression(x, y, model="lightgbm")
  fit = regmix.fit_regression(x, y)
  with pytest.raises(ValueError, match="domains"):
    fit.predict(np.full((2, 3), 1 / 3))


def test_top_k_finds_the_optimum_of_a_known_law():
  prior = np.array([0.5, 0.3, 0.2])
  r_star = np.array([0.45, 0.35, 0.2])

  def law(m):
    return np.sum((m - r_star) ** 2, axis=1)

  r = regmix.top_k_mixture(law, 0, prior, num_candidates=20_000, top_k=32)
  assert r.shape == (3,)
  assert abs(r.sum() - 1) < 1e-12 and np.all(r >= 0)
  np.testing.assert_allclose(r, r_star, atol=0.01)
  # Same through the notebook's candidate distribution (raw prior, scale 1).
  r = regmix.top_k_mixture(law, 0, prior, num_candidates=20_000, top_k=32,
                           candidates="notebook")
  np.testing.assert_allclose(r, r_star, atol=0.01)


def test_top_k_of_all_candidates_is_the_candidate_mean():
  # k = C averages every candidate: the proposal mean (prior**0.5 without
  # bound/rounding) or the notebook's Dirichlet(prior) mean (the raw prior).
  prior = np.array([0.7, 0.2, 0.1])
  flat = regmix.top_k_mixture(lambda m: np.zeros(m.shape[0]), 0, prior,
                              num_candidates=20_000, top_k=20_000,
                              max_usage=None, minimum=0.0)
  np.testing.assert_allclose(flat, np.sqrt(prior) / np.sqrt(prior).sum(), atol=0.01)
  raw = regmix.top_k_mixture(lambda m: np.zeros(m.shape[0]), 0, prior,
                             num_candidates=20_000, top_k=20_000, candidates="notebook")
  np.testing.assert_allclose(raw, prior, atol=0.01)


def test_top_k_rejects_bad_predictor_output():
  prior = np.array([0.5, 0.5])
  with pytest.raises(ValueError, match="shape"):
    regmix.top_k_mixture(lambda m: np.zeros(3), 0, prior, num_candidates=100, top_k=4)
  with pytest.raises(ValueError, match="NaN"):
    regmix.top_k_mixture(lambda m: np.full(m.shape[0], np.nan), 0, prior,
                         num_candidates=100, top_k=4)
  with pytest.raises(ValueError, match="top_k"):
    regmix.top_k_mixture(lambda m: m[:, 0], 0, prior, num_candidates=100, top_k=101)


def test_gbm_ranks_a_monotone_law_and_top_k_follows_it():
  prior = np.array([0.4, 0.3, 0.2, 0.1])
  x = regmix.sample_mixtures(0, prior, 200)
  law = lambda m: 3.0 - 1.5 * m[:, 0] + 0.2 * m[:, 1]  # noqa: E731
  fit = regmix.fit_regression(x, law(x), model="gbm")
  assert fit.kind == "gbm"
  x_test = regmix.sample_mixtures(1, prior, 200)
  rho = stats.spearmanr(fit.predict(x_test), law(x_test)).statistic
  assert rho > 0.95, rho
  r = regmix.top_k_mixture(fit, 2, prior, num_candidates=4000, top_k=32)
  # The law is best at r = (1, 0, 0, 0); the bound caps domain 0 at 1.
  assert r[0] > 0.85, r


def test_gbm_early_stops_on_a_held_out_set():
  rng = np.random.default_rng(0)
  prior = np.array([0.4, 0.3, 0.2, 0.1])
  x, x_val = regmix.sample_mixtures(0, prior, 120), regmix.sample_mixtures(1, prior, 40)
  # Pure noise: the held-out loss stops improving almost at once.
  fit = regmix.fit_regression(x, rng.normal(size=120), model="gbm",
                              eval_set=(x_val, rng.normal(size=40)))
  assert fit.model.n_iter_ < 1000
  full = regmix.fit_regression(x, rng.normal(size=120), model="gbm")
  assert full.model.n_iter_ == 1000
