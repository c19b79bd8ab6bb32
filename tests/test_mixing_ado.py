"""ADO (Jiang et al., ICLR 2025) as an online mixer.

Oracles, written here independently of the implementation: scipy's
``savgol_filter`` (the filter the authors apply to the training losses),
``scipy.optimize.curve_fit`` on synthetic power-law curves (the fit must
recover the known ``(eps, beta, alpha)``), the authors' ``loss_fn`` objective
transcribed in numpy, and the authors' ``update``/``curr_dist`` bookkeeping
(``p_history``, imputed losses, ``[ignore::10]`` points, ``clip_min_probability``,
``p``/``p_avg``) transcribed in float64 numpy.

Every mixer-level test drives one jitted function (one static configuration,
traced float hyperparameters), so the file compiles the update once.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import curve_fit
from scipy.signal import savgol_filter

from dograph_jax.mixing.ado import (ado, ado_preference, fit_scaling_law, savgol_matrix,
                                    scaling_law_objective)
from dograph_jax.mixing.base import MixingInputs

# ---- numpy transcriptions of the authors' code (src/data_selectors/ado.py) -------------------


def np_loss_fn(params, n, y):
  """``loss_fn``: Huber(1e-3) on log losses + the soft parameter bounds."""
  a, e, alpha = params
  pred = np.logaddexp(a - alpha * np.log(n), e)
  d = np.abs(np.log(y) - pred)
  huber = np.where(d > 1e-3, 1e-3 * (d - 0.5e-3), 0.5 * d ** 2)
  return (huber.sum() + max(alpha - 0.8, 0) - min(alpha, 0.001) + max(a - 6.5, 0)
          - min(e - 0.5, 0))


def np_clip_min_probability(probs, min_prob):
  total_deficit = max(min_prob * len(probs) - probs.sum(), 0)
  scaled = probs * (1 - total_deficit) / probs.sum()
  clipped = np.maximum(scaled, min_prob)
  return clipped / clipped.sum()


def np_dist(params, n, prior, history, s, delta_min):
  """``curr_dist`` before the time smoothing (slope * prior * p_history^s)."""
  irred = np.exp(params[:, 1])
  expnt = np.maximum(params[:, 2], 0.05)
  curr = irred + np.exp(params[:, 0]) / n ** params[:, 2]
  slope = expnt * (curr - irred) / n
  w = slope * prior * history ** s
  return np_clip_min_probability(w / w.sum(), delta_min)


# ---- filter and objective -------------------------------------------------------------------


def test_savgol_matrix_is_scipys_filter():
  x = np.cumsum(np.random.default_rng(0).normal(size=240))
  for window in (101, 7):
    smooth = savgol_filter(x, window, 3)   # mode="interp", as the authors call it
    e = savgol_matrix(window)
    half = window // 2
    interior = np.array([e[half] @ x[i - half:i + half + 1] for i in range(half, 240 - half)])
    np.testing.assert_allclose(interior, smooth[half:240 - half], atol=1e-9)
    np.testing.assert_allclose(e[:half] @ x[:window], smooth[:half], atol=1e-9)
    np.testing.assert_allclose(e[half + 1:] @ x[-window:], smooth[-half:], atol=1e-9)
  np.testing.assert_array_equal(savgol_matrix(1), [[1.0]])


def test_objective_is_the_authors_loss_fn():
  rng = np.random.default_rng(1)
  n = np.linspace(1e3, 5e4, 30)
  y = 2.0 + 40.0 * n ** -0.4 * (1 + 0.01 * rng.normal(size=30))
  mask = np.ones(30, bool)
  mask[[3, 7]] = False
  objective = jax.jit(scaling_law_objective)
  for params in ([3.7, 0.7, 0.4], [7.0, 0.2, 0.9], [1.0, 1.2, -0.1], [0.0, -1.0, 0.0005]):
    got = objective(jnp.asarray(params, jnp.float32), jnp.log(n), jnp.log(y), jnp.asarray(mask))
    np.testing.assert_allclose(float(got), np_loss_fn(params, n[mask], y[mask]),
                               rtol=1e-4, atol=1e-6)


# ---- the scaling-law fit ---------------------------------------------------------------------

FIT_POINTS = 32


@functools.cache
def _fit():
  """``fit_scaling_law`` with the published grid, vmapped over curves."""
  return jax.jit(jax.vmap(fit_scaling_law))


def _power_law(n, eps, beta, alpha):
  return eps + beta * n ** -alpha


TRUE = [(2.0, 30.0, 0.4), (3.0, 100.0, 0.6), (1.8, 8.0, 0.25)]


def test_fit_recovers_known_power_laws_like_curve_fit():
  n = np.geomspace(2e3, 2e5, FIT_POINTS)
  ys = np.array([_power_law(n, *p) for p in TRUE])
  params, values = _fit()(jnp.asarray(np.tile(n, (3, 1))), jnp.asarray(ys),
                          jnp.ones((3, FIT_POINTS), bool))
  params = np.asarray(params, np.float64)
  for (eps, beta, alpha), p, y in zip(TRUE, params, ys):
    oracle, _ = curve_fit(_power_law, n, y, p0=(1.0, 10.0, 0.3), maxfev=20000)
    got = (np.exp(p[1]), np.exp(p[0]), p[2])
    np.testing.assert_allclose(oracle, (eps, beta, alpha), rtol=1e-4)
    np.testing.assert_allclose(got, oracle, rtol=2e-3)
  # A perfect fit: no Huber loss left, only the constant -min(alpha, 1e-3).
  np.testing.assert_allclose(values, -1e-3, atol=1e-6)


def test_noisy_fit_is_at_least_as_good_as_least_squares_on_the_published_objective():
  rng = np.random.default_rng(2)
  n = np.geomspace(2e3, 2e5, FIT_POINTS)
  ys = np.array([_power_law(n, *p) * (1 + 0.003 * rng.normal(size=n.size)) for p in TRUE])
  mask = np.ones((3, FIT_POINTS), bool)
  mask[:, ::7] = False                     # masked points must not count
  ys_masked = np.where(mask, ys, 1e3)      # garbage where masked
  params, values = _fit()(jnp.asarray(np.tile(n, (3, 1))), jnp.asarray(ys_masked),
                          jnp.asarray(mask))
  for p, v, y, m in zip(np.asarray(params, np.float64), np.asarray(values), ys, mask):
    oracle, _ = curve_fit(_power_law, n[m], y[m], p0=(1.0, 10.0, 0.3), maxfev=20000)
    oracle_params = (np.log(oracle[1]), np.log(oracle[0]), oracle[2])
    ours = np_loss_fn(p, n[m], y[m])
    np.testing.assert_allclose(v, ours, rtol=1e-3, atol=1e-6)
    assert ours <= np_loss_fn(oracle_params, n[m], y[m]) + 1e-6
    # The two fitted curves agree to the noise level over the data.
    np.testing.assert_allclose(_power_law(n, np.exp(p[1]), np.exp(p[0]), p[2]),
                               _power_law(n, *oracle), rtol=3e-3)


def test_preference_is_the_authors_formula():
  rng = np.random.default_rng(3)
  preference = jax.jit(ado_preference)
  for _ in range(5):
    params = np.stack([rng.uniform(0, 5, 4), rng.uniform(0.5, 1.5, 4),
                       rng.uniform(0.0, 0.8, 4)], 1)
    n = np.full(4, rng.uniform(1e3, 1e6))
    prior = rng.dirichlet(np.ones(4))
    history = rng.dirichlet(np.ones(4))
    for s, delta in ((0.5, 0.01), (1.0, 0.2)):
      got = preference(jnp.asarray(params, jnp.float32), jnp.asarray(n, jnp.float32),
                       jnp.asarray(prior, jnp.float32), jnp.asarray(history, jnp.float32),
                       s, delta)
      np.testing.assert_allclose(got, np_dist(params, n, prior, history, s, delta), rtol=1e-4)
  # A domain never seen (n = 0, x_axis="domain") has no learning speed: rho = delta_min share.
  got = preference(jnp.asarray([[1.0, 1.0, 0.3]] * 3), jnp.asarray([100.0, 0.0, 100.0]),
                   jnp.full(3, 1 / 3), jnp.full(3, 1 / 3), 0.5, 0.01)
  np.testing.assert_allclose(got, np.array([0.5, 0.01, 0.5]) / 1.01, rtol=1e-5)


# ---- the mixer, driven by one compiled function --------------------------------------------

D, B, STEPS = 3, 8, 40
CONFIG = dict(update_interval=10, start_step=10, ignore_steps=3, subsample=2, savgol_window=7,
              max_points=6, max_iter=60, prior=(2.0, 1.0, 1.0),
              init_grid=((2.0, 0.6, 0.2), (4.0, 1.0, 0.5), (0.0, 0.5, 0.1)))
HPARAMS = dict(gamma1=0.1, gamma2=0.1, s=0.5, delta_min=0.01)
TRACES = []


@jax.jit
def _step(hparams, state, losses_B, ids_B, step):
  TRACES.append(None)
  return ado(D, **hparams, **CONFIG).update(state, MixingInputs(losses_B, ids_B, step))


def _drive(losses, ids, **hparams):
  """``(w (S, B), states stacked (S, ...))`` of :data:`STEPS` jitted updates."""
  hp = {k: jnp.float32(v) for k, v in {**HPARAMS, **hparams}.items()}
  state = ado(D, **CONFIG).init()
  ws, states = [], []
  for t in range(STEPS):
    w, state = _step(hp, state, jnp.asarray(losses[t], jnp.float32),
                     jnp.asarray(ids[t], jnp.int32), jnp.asarray(t, jnp.int32))
    ws.append(w)
    states.append(state)
  return np.asarray(ws), jax.tree.map(lambda *xs: np.stack(xs), *states)


def _synthetic(seed=0):
  """Per-row losses from a power law in total samples (domain 2 learns
  fastest), with noise; domain 1 is absent from some batches."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, D, (STEPS, B))
  ids[5] = 0
  ids[17] = [0, 2] * 4
  n = (np.arange(STEPS)[:, None] + 1.0) * B
  eps, beta, alpha = np.array([2.0, 2.5, 1.8]), np.array([8.0, 12.0, 30.0]), np.array(
      [0.2, 0.3, 0.5])
  losses = (eps[ids] + beta[ids] * n ** -alpha[ids]) * (1 + 0.01 * rng.normal(size=ids.shape))
  return losses, ids


def _np_series(losses, ids):
  """The authors' ``update``: per-step domain means, an absent domain
  repeating its last value (the batch mean at the first step), and the
  ``p_history`` EMA of the batch shares (gamma = 0.9 on the old value)."""
  series, history = [], [np.array([0.5, 0.25, 0.25])]
  last = None
  for row_losses, row_ids in zip(losses, ids):
    counts = np.bincount(row_ids, minlength=D)
    avg = row_losses.mean()
    cur = np.array([row_losses[row_ids == k].mean() if counts[k] else
                    (last[k] if last is not None else avg) for k in range(D)])
    series.append(cur)
    last = cur
    history.append(0.9 * history[-1] + 0.1 * counts / counts.sum())
  return np.array(series), np.array(history[1:])


def test_imputation_smoothing_and_fit_points():
  losses, ids = _synthetic()
  _, states = _drive(losses, ids)
  series, history = _np_series(losses, ids)
  np.testing.assert_allclose(states.last_loss, series, rtol=1e-5)
  np.testing.assert_allclose(states.history, history, rtol=1e-5)
  np.testing.assert_allclose(states.seen[:, 0], (np.arange(STEPS) + 1) * B)   # total samples
  # The stored points: rows final for the 7-row filter (row <= t - 3), on the
  # grid 3 + k * stride, the filter's values on the whole series; 6 slots, so
  # the stride doubles 2 -> 4 (row 15, step 18) -> 8 (row 27, step 30).
  expected_stride = np.where(np.arange(STEPS) < 18, 2, np.where(np.arange(STEPS) < 30, 4, 8))
  np.testing.assert_array_equal(states.stride, expected_stride)
  last = STEPS - 1
  rows = np.arange(3, last - 3 + 1, 8)
  np.testing.assert_array_equal(rows, [3, 11, 19, 27, 35])
  assert states.num_points[last] == len(rows)
  smooth = savgol_filter(series, 7, 3, axis=0)
  np.testing.assert_allclose(states.points_loss[last, :len(rows)], smooth[rows], rtol=1e-5)
  np.testing.assert_allclose(states.points_n[last, :len(rows)],
                             np.tile((rows[:, None] + 1.0) * B, (1, D)))


def test_refits_use_the_authors_data():
  losses, ids = _synthetic()
  _, states = _drive(losses, ids)
  series, _ = _np_series(losses, ids)
  assert np.all(states.fitted[:10] == 0) and np.all(states.fitted[10:] == 1)
  for step in (10, 20, 30):
    # The code at a refit: savgol over the series so far (interp at its end),
    # [ignore::stride] (our stride: 2 before the buffer filled, then 4, then 8).
    smooth = savgol_filter(series[:step + 1], 7, 3, axis=0)
    stride = {10: 2, 20: 4, 30: 8}[step]
    rows = np.arange(3, step + 1, stride)
    n = (rows + 1.0) * B
    params = states.params[step]
    np.testing.assert_array_equal(states.params[step + 9], params)  # until the next refit
    if step > 10:
      assert not np.allclose(params, states.params[step - 1])       # refitted
    for k in range(D):
      # The objective the fit reached is the authors' loss_fn on their data.
      np.testing.assert_allclose(states.fit_loss[step, k],
                                 np_loss_fn(params[k].astype(np.float64), n, smooth[rows, k]),
                                 rtol=1e-4, atol=1e-8)
      # ... and no start of the grid is better.
      for start in CONFIG["init_grid"]:
        assert states.fit_loss[step, k] <= np_loss_fn(start, n, smooth[rows, k]) + 1e-8


def test_policy_is_the_papers_formula_given_the_fit():
  losses, ids = _synthetic()
  gamma2, s, delta = 0.3, 0.7, 0.05
  w, states = _drive(losses, ids, gamma2=gamma2, s=s, delta_min=delta)
  prior = np.array([0.5, 0.25, 0.25])
  np.testing.assert_allclose(states.weights[:10], np.tile(prior, (10, 1)), rtol=1e-6)
  p_avg = prior.copy()
  for t in range(10, STEPS):
    n = np.full(D, (t + 1.0) * B)
    dist = np_dist(states.params[t].astype(np.float64), n, prior, states.history[t], s, delta)
    p = (1 - gamma2) * p_avg + gamma2 * dist
    p_avg = (1 - 1 / (t + 1)) * p_avg + dist / (t + 1)
    np.testing.assert_allclose(states.weights[t], p, rtol=1e-4)
    np.testing.assert_allclose(states.average[t], p_avg, rtol=1e-4)
  # Sample weights (reweight form) use the policy that drew the batch.
  t = 25
  counts = np.bincount(ids[t], minlength=D)
  alpha = np.where(counts > 0, states.weights[t - 1], 0)
  np.testing.assert_allclose(w[t], (alpha / alpha.sum() / np.maximum(counts, 1))[ids[t]],
                             rtol=1e-5)
  # The fastest-learning domain (2) ends up above its prior share.
  assert states.weights[-1, 2] > 0.25
  np.testing.assert_allclose(states.weights_sum[-1], states.weights.sum(0), rtol=1e-5)


def test_non_finite_losses_and_absent_domains():
  losses, ids = _synthetic(1)
  losses[0, :] = np.nan                    # no finite loss at all at the first step
  losses[12, ::2] = np.inf
  losses[13, :] = np.nan
  losses[21, 3] = -np.inf
  ids[22:27] = 0                           # domains 1 and 2 absent for 5 steps
  w, states = _drive(losses, ids)
  for leaf in jax.tree.leaves(states):
    assert np.all(np.isfinite(leaf.astype(np.float64)))
  assert np.all(states.weights > 0)
  np.testing.assert_allclose(states.weights.sum(1), 1.0, atol=1e-5)
  np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-5)
  assert states.fitted[-1] == 1            # the fits went ahead on the finite points
  # An absent domain repeats its last loss.
  np.testing.assert_array_equal(states.last_loss[26, 1:], states.last_loss[21, 1:])


def test_float_hyperparameters_are_traced():
  losses, ids = _synthetic()
  reference = _drive(losses, ids)[1].weights
  before = len(TRACES)
  for name, value in (("gamma1", 0.5), ("gamma2", 0.5), ("s", 1.0), ("delta_min", 0.3)):
    weights = _drive(losses, ids, **{name: value})[1].weights
    assert np.all(np.isfinite(weights)) and np.allclose(weights.sum(1), 1.0, atol=1e-5)
    assert not np.allclose(weights, reference, rtol=1e-5, atol=1e-7), name
  assert len(TRACES) == before             # no new trace


def test_rejects_bad_options():
  for kwargs in (dict(savgol_window=4), dict(x_axis="steps"), dict(prior=(1.0, 0.0, 1.0)),
                 dict(max_points=1), dict(update_interval=0), dict(init_grid=())):
    with pytest.raises(ValueError):
      ado(3, **kwargs)
  with pytest.raises(ValueError):
    ado(1)
  mixer = ado(3, prior=(3.0, 1.0, 1.0))
  assert mixer.form == "sample" and mixer.needs == frozenset()
  np.testing.assert_allclose(mixer.init().weights, [0.6, 0.2, 0.2])
