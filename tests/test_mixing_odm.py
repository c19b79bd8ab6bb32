"""ODM (Albalak et al. 2023) as an online mixer.

Oracles: the paper's EXP3 update worked out by hand for two domains over three
steps (``eps_t = min(1/K, sqrt(ln K / (K t)))``, ``pi_t = (1 - K eps_t)
softmax(eps_{t-1} R) + eps_t``, ``R_i <- alpha R_i + (1 - alpha) L_i / pi_i``
for the domains in the batch), and the same recursion transcribed in float64
numpy over longer random trajectories.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dograph_jax.mixing.base import MixingInputs
from dograph_jax.mixing.odm import exploration_rate, odm


def _inputs(losses, domain_id, step):
  return MixingInputs(losses=jnp.asarray(losses, jnp.float32),
                      domain_id=jnp.asarray(domain_id, jnp.int32),
                      step=jnp.asarray(step, jnp.int32))


def _eps(t, k):
  return min(1.0 / k, math.sqrt(math.log(k) / (k * t)))


def _softmax(x):
  z = np.exp(np.asarray(x, np.float64) - np.max(x))
  return z / z.sum()


def test_exploration_rate():
  # K = 2: eps_1 = min(1/2, sqrt(ln 2 / 2) = .589) = .5; eps_4 = sqrt(ln 2 / 8) = .2944.
  np.testing.assert_allclose(float(exploration_rate(1, 2)), 0.5, rtol=1e-6)
  np.testing.assert_allclose(float(exploration_rate(4, 2)), math.sqrt(math.log(2) / 8),
                             rtol=1e-6)
  np.testing.assert_allclose(float(exploration_rate(0, 5)), 0.2, rtol=1e-6)   # eps_0 = 1/K
  # K = 7 at t = 20000: sqrt(ln 7 / 140000).
  np.testing.assert_allclose(float(exploration_rate(20000, 7)),
                             math.sqrt(math.log(7) / 140000), rtol=1e-5)


def test_three_steps_by_hand():
  alpha = 0.5
  mixer = odm(2, alpha=alpha)
  update = jax.jit(mixer.update)
  state = mixer.init()
  np.testing.assert_allclose(state.weights, [0.5, 0.5])   # pi_1: R = 0, uniform

  # t = 1: domain 0 rows lose 2 and 4 (mean 3), domain 1 loses 1; pi_1 = (.5, .5).
  # R = .5 * (3 / .5, 1 / .5) = (3, 1). eps_1 = .5, eps_2 = sqrt(ln 2 / 4) = .41628.
  # pi_2 = (1 - 2 eps_2) softmax(.5 * (3, 1)) + eps_2, softmax(1.5, .5) = (e, 1) / (e + 1).
  w, state = update(state, _inputs([2.0, 4.0, 1.0], [0, 0, 1], 0))
  np.testing.assert_allclose(w, [0.25, 0.25, 0.5], rtol=1e-6)   # pi_1 on the batch
  np.testing.assert_allclose(state.reward, [3.0, 1.0], rtol=1e-6)
  eps2 = math.sqrt(math.log(2) / 4)
  e = math.e
  pi2 = (1 - 2 * eps2) * np.array([e, 1.0]) / (e + 1) + eps2
  np.testing.assert_allclose(pi2, [0.538690, 0.461310], atol=1e-6)   # written out
  np.testing.assert_allclose(state.weights, pi2, rtol=1e-5)

  # t = 2: only domain 1 (loss 2): R_1 = .5 * 1 + .5 * 2 / pi2_1; R_0 stays 3.
  # pi_3 = (1 - 2 eps_3) softmax(eps_2 R) + eps_3, eps_3 = sqrt(ln 2 / 6).
  w, state = update(state, _inputs([2.0, 2.0], [1, 1], 1))
  np.testing.assert_allclose(w, [0.5, 0.5], rtol=1e-6)   # one domain present
  r = np.array([3.0, 0.5 * 1.0 + 0.5 * 2.0 / pi2[1]])
  np.testing.assert_allclose(state.reward, r, rtol=1e-5)
  eps3 = math.sqrt(math.log(2) / 6)
  pi3 = (1 - 2 * eps3) * _softmax(eps2 * r) + eps3
  np.testing.assert_allclose(state.weights, pi3, rtol=1e-5)

  # t = 3: domain 0 has a NaN row and a 5 (mean over finite: 5); domain 1's only
  # row is inf: not pulled. R_0 = .5 * 3 + .5 * 5 / pi3_0.
  w, state = update(state, _inputs([np.nan, 5.0, np.inf], [0, 0, 1], 2))
  r = np.array([0.5 * 3.0 + 0.5 * 5.0 / pi3[0], r[1]])
  np.testing.assert_allclose(state.reward, r, rtol=1e-5)
  eps4 = math.sqrt(math.log(2) / 8)
  pi4 = (1 - 2 * eps4) * _softmax(eps3 * r) + eps4
  np.testing.assert_allclose(state.weights, pi4, rtol=1e-5)
  assert np.all(np.isfinite(w)) and abs(float(w.sum()) - 1) < 1e-6
  np.testing.assert_allclose(state.weights_sum, pi2 + pi3 + pi4, rtol=1e-5)
  assert int(state.count) == 3


def test_warmup_samples_at_the_prior_then_weights_by_it():
  alpha = 0.9
  mixer = odm(2, alpha=alpha, warmup_steps=2, prior=(3.0, 1.0))
  state = mixer.init()
  np.testing.assert_allclose(state.weights, [0.75, 0.25])
  for step in range(2):   # t = 1, 2: no rewards, the prior
    _, state = mixer.update(state, _inputs([1.0, 9.0], [0, 1], step))
    np.testing.assert_allclose(state.weights, [0.75, 0.25], rtol=1e-6)
    np.testing.assert_array_equal(state.reward, [0.0, 0.0])
  # t = 3: the first reward, importance-weighted by the prior that drew it;
  # pi_4 uses eps_3 (temperature) and eps_4 (floor): t keeps counting.
  _, state = mixer.update(state, _inputs([2.0, 1.0], [0, 1], 2))
  r = 0.1 * np.array([2.0 / 0.75, 1.0 / 0.25])
  np.testing.assert_allclose(state.reward, r, rtol=1e-5)
  eps3, eps4 = math.sqrt(math.log(2) / 6), math.sqrt(math.log(2) / 8)
  np.testing.assert_allclose(state.weights, (1 - 2 * eps4) * _softmax(eps3 * r) + eps4,
                             rtol=1e-5)


def _numpy_odm(batches, num_domains, alpha):
  """The paper's recursion in float64, pulled arms = domains in the batch."""
  k = num_domains
  r = np.zeros(k)
  pi = np.full(k, 1.0 / k)
  out = []
  for t, (losses, ids) in enumerate(batches, start=1):
    for i in np.unique(ids):
      r[i] = alpha * r[i] + (1 - alpha) * losses[ids == i].mean() / pi[i]
    pi = (1 - k * _eps(t + 1, k)) * _softmax(_eps(t, k) * r) + _eps(t + 1, k)
    out.append(pi)
  return np.array(out)


@pytest.mark.parametrize("alpha", [0.5, 0.9])
def test_matches_the_paper_recursion(alpha):
  rng = np.random.default_rng(0)
  k, steps = 4, 60
  batches = []
  for _ in range(steps):
    ids = rng.integers(0, k - 1 if rng.random() < 0.3 else k, 6)   # domain 3 often absent
    batches.append((rng.gamma(3.0, 0.5 + 0.4 * ids), ids))
  want = _numpy_odm(batches, k, alpha)
  mixer = odm(k, alpha=alpha)

  def body(state, x):
    w, state = mixer.update(state, MixingInputs(x[0], x[1], x[2]))
    return state, (w, state.weights)

  xs = (jnp.asarray(np.array([b[0] for b in batches]), jnp.float32),
        jnp.asarray(np.array([b[1] for b in batches]), jnp.int32),
        jnp.arange(steps, dtype=jnp.int32))
  _, (w, got) = jax.jit(lambda s: jax.lax.scan(body, s, xs))(mixer.init())
  np.testing.assert_allclose(got, want, rtol=2e-4)
  # Every domain keeps at least eps_{t+1} (EXP3's exploration floor).
  floors = np.array([_eps(t + 1, k) for t in range(1, steps + 1)])
  assert np.all(np.asarray(got) >= floors[:, None] * (1 - 1e-5))
  np.testing.assert_allclose(np.asarray(got).sum(1), 1.0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(w).sum(1), 1.0, atol=1e-6)
  # The high-loss domains (larger ids) gained.
  assert got[-1, 2] > got[-1, 0]


def test_absurd_losses_stay_finite_on_the_simplex():
  mixer = odm(3, alpha=0.5)
  state = mixer.init()
  batches = [([3e38, 1e30, 2.0], [0, 1, 2]), ([np.nan, np.inf, -np.inf], [0, 1, 2]),
             ([3e38, 3e38], [2, 2]), ([1.0, 2.0, 3.0], [0, 0, 0])]
  for step, (losses, ids) in enumerate(batches * 3):
    w, state = mixer.update(state, _inputs(losses, ids, step))
    for x in jax.tree.leaves(state) + [w]:
      assert np.all(np.isfinite(np.asarray(x, np.float64))), (step, state)
    assert np.all(np.asarray(state.weights) > 0)
    np.testing.assert_allclose(float(state.weights.sum()), 1.0, atol=1e-6)
    np.testing.assert_allclose(float(w.sum()), 1.0, atol=1e-6)
  # An all-non-finite batch pulls no arm: R is unchanged.
  before = state.reward
  _, state = mixer.update(state, _inputs([np.nan, np.inf], [0, 1], 12))
  np.testing.assert_array_equal(state.reward, before)


def test_absent_domain_keeps_its_reward():
  mixer = odm(3, alpha=0.8)
  _, state = mixer.update(mixer.init(), _inputs([1.0, 2.0, 3.0], [0, 1, 2], 0))
  r2 = float(state.reward[2])
  for step in range(1, 20):
    _, state = mixer.update(state, _inputs([1.0, 2.0, 1.5], [0, 1, 1], step))
    assert float(state.reward[2]) == r2
    assert float(state.weights[2]) > 0


def test_traced_alpha_compiles_once():
  traces = []
  seq = [_inputs([1.0, 3.0, 2.0, 5.0], [0, 1, 1, 2], t) for t in range(5)]

  @jax.jit
  def run(alpha):
    traces.append(1)
    mixer = odm(3, alpha=alpha)
    state = mixer.init()
    for inputs in seq:
      _, state = mixer.update(state, inputs)
    return state.weights

  a = run(jnp.float32(0.5))
  b = run(jnp.float32(0.9))
  assert len(traces) == 1
  assert not np.allclose(a, b)
  # The same as an eager run with a Python float.
  eager = odm(3, alpha=0.5)
  state = eager.init()
  for inputs in seq:
    _, state = eager.update(state, inputs)
  np.testing.assert_allclose(a, state.weights, rtol=1e-6)


def test_rejects_bad_options():
  with pytest.raises(ValueError):
    odm(1)
  with pytest.raises(ValueError):
    odm(3, warmup_steps=-1)
  with pytest.raises(ValueError):
    odm(3, prior=(1.0, 0.0, 1.0))
  with pytest.raises(ValueError):
    odm(3, prior=(1.0, 1.0))
  assert odm(3).form == "sample" and odm(3).needs == frozenset()
