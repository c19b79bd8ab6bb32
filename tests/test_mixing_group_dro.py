"""Group DRO (Sagawa et al., ICLR 2020, Algorithm 1) as an online mixer.

Oracles: the exponentiated-gradient update worked out by hand, and the
paper's plain update ``q <- q exp(eta L) / sum(q exp(eta L))`` in float64
numpy when every domain is present.
"""

import jax
import jax.numpy as jnp
import numpy as np

from dograph_jax.mixing.base import MixingInputs
from dograph_jax.mixing.group_dro import group_dro
from dograph_jax.mixing.simulate import train_toy


def _inputs(losses, domain_id, step=0):
  return MixingInputs(losses=jnp.asarray(losses, jnp.float32),
                      domain_id=jnp.asarray(domain_id, jnp.int32),
                      step=jnp.asarray(step, jnp.int32))


def test_two_steps_by_hand():
  e = np.e
  mixer = group_dro(3, step_size=0.5)
  state = mixer.init()
  np.testing.assert_allclose(np.asarray(state.weights), np.full(3, 1 / 3), rtol=1e-6)

  # Step 1, all present: L = [mean(1, 3), 2, 4] = [2, 2, 4];
  # q ∝ (1/3) exp(0.5 L) ∝ [e, e, e^2], i.e. q = [1, 1, e] / (2 + e).
  w, state = mixer.update(state, _inputs([1.0, 3.0, 2.0, 4.0], [0, 0, 1, 2]))
  q1 = np.array([1.0, 1.0, e]) / (2 + e)
  np.testing.assert_allclose(np.asarray(state.weights), q1, rtol=1e-5)
  # The new q weights this batch: w_i = q_d / n_d.
  np.testing.assert_allclose(np.asarray(w), [q1[0] / 2, q1[0] / 2, q1[1], q1[2]], rtol=1e-5)

  # Step 2, domain 2 absent: L0 = 2, L1 = mean(0, 2) = 1. Domains 0 and 1
  # share the mass 2 / (2 + e) they held, in proportion q1 exp(0.5 L) ∝
  # [e, e^0.5]; q_2 stays e / (2 + e).
  w, state = mixer.update(state, _inputs([2.0, 0.0, 2.0], [0, 1, 1], step=1))
  mass = 2 / (2 + e)
  q2 = np.array([mass * e / (e + e**0.5), mass * e**0.5 / (e + e**0.5), e / (2 + e)])
  np.testing.assert_allclose(np.asarray(state.weights), q2, rtol=1e-5)
  # Per-sample weights renormalise over the present domains (sum to 1).
  alpha = np.array([e, e**0.5]) / (e + e**0.5)
  np.testing.assert_allclose(np.asarray(w), [alpha[0], alpha[1] / 2, alpha[1] / 2], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(state.weights_sum), q1 + q2, rtol=1e-5)
  assert int(state.count) == 2


def test_matches_the_paper_update_when_all_domains_present():
  rng = np.random.default_rng(0)
  eta, num_domains = 0.3, 4
  mixer = group_dro(num_domains, step_size=eta)
  state = mixer.init()
  q = np.full(num_domains, 1 / num_domains)
  for step in range(25):
    domain_id = np.concatenate([np.arange(num_domains), rng.integers(0, num_domains, 12)])
    losses = rng.gamma(2.0, 1.0 + domain_id, size=domain_id.size)
    group_loss = np.array([losses[domain_id == d].mean() for d in range(num_domains)])
    q = q * np.exp(eta * group_loss)
    q = q / q.sum()
    w, state = mixer.update(state, _inputs(losses, domain_id, step))
    np.testing.assert_allclose(np.asarray(state.weights), q, rtol=1e-4)
    counts = np.bincount(domain_id, minlength=num_domains)
    np.testing.assert_allclose(np.asarray(w), (q / counts)[domain_id], rtol=1e-4)
  # The model's loss is sum_g q_g L_g, exactly (every domain present).
  np.testing.assert_allclose(float(jnp.dot(w, jnp.asarray(losses, jnp.float32))),
                             float(q @ group_loss), rtol=1e-4)


def test_absent_domain_keeps_its_weight():
  rng = np.random.default_rng(1)
  mixer = group_dro(3, step_size=0.2)
  state = mixer.init()
  _, state = mixer.update(state, _inputs([1.0, 5.0, 3.0], [0, 1, 2]))
  q2_before = float(state.weights[2])
  for step in range(1, 30):
    domain_id = rng.integers(0, 2, 10)            # domain 2 never sampled
    losses = rng.uniform(0.0, 4.0, 10) + 2.0 * domain_id
    w, state = mixer.update(state, _inputs(losses, domain_id, step))
    np.testing.assert_allclose(float(state.weights[2]), q2_before, rtol=1e-5)
    np.testing.assert_allclose(float(jnp.sum(w)), 1.0, rtol=1e-6)
  # Meanwhile the present domains did move: domain 1 (higher losses) gained.
  assert float(state.weights[1]) > 0.9 * (1.0 - q2_before)


def test_huge_losses_stay_on_the_simplex():
  mixer = group_dro(4, step_size=1.0)
  state = mixer.init()
  batches = [([1e30, 1e35, 3e38, 1.0], [0, 1, 2, 3]),
             ([3e38, 3e38], [0, 2]),
             ([1e20, 0.0, 1e38, 2e38, 5.0], [0, 1, 1, 3, 3]),
             ([3e38, 1.0, 1e38, 7.0], [1, 2, 3, 0])]
  for step, (losses, domain_id) in enumerate(batches * 5):
    w, state = mixer.update(state, _inputs(losses, domain_id, step))
    for x in (w, state.weights, state.log_weights, state.weights_sum):
      assert np.all(np.isfinite(np.asarray(x))), (step, x)
    assert np.all(np.asarray(state.weights) >= 0)
    np.testing.assert_allclose(float(jnp.sum(state.weights)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(jnp.sum(w)), 1.0, rtol=1e-6)


def test_equal_huge_losses_leave_q_unchanged():
  mixer = group_dro(3, step_size=0.5)
  _, state = mixer.update(mixer.init(), _inputs([0.0, 2.0, 4.0], [0, 1, 2]))
  q = np.asarray(state.weights)
  _, state = mixer.update(state, _inputs([1e30, 1e30, 1e30], [0, 1, 2], step=1))
  np.testing.assert_allclose(np.asarray(state.weights), q, rtol=1e-6)


def test_traced_step_size_compiles_once():
  traces = []

  @jax.jit
  def step(step_size, inputs):
    traces.append(1)
    mixer = group_dro(2, step_size=step_size)
    return mixer.update(mixer.init(), inputs)[1].weights

  inputs = _inputs([1.0, 3.0], [0, 1])
  for eta in (0.1, 0.5, 2.0):
    q = step(jnp.float32(eta), inputs)
    # q ∝ [e^eta, e^(3 eta)]: q_1 = 1 / (1 + e^(-2 eta)).
    np.testing.assert_allclose(np.asarray(q), [1 / (1 + np.exp(2 * eta)),
                                               1 / (1 + np.exp(-2 * eta))], rtol=1e-5)
  assert len(traces) == 1


def test_noise_domain_gets_the_largest_weight_on_the_toy():
  """Group DRO moves q toward the domain with the largest loss.

  On the toy, the informative and easy domains are learnt to near-zero loss
  while the noise domain's squared error stays near its irreducible
  0.5 * 1.5^2 = 1.125, so it has the worst loss almost every step and q
  must concentrate on it. With the paper's eta = 0.01 over 300 steps the
  log-odds grow by about 0.01 * 1.1 per step: q_noise should pass 0.8.
  With the default eta = 1e-3 the same drift is ten times slower, but the
  ordering is the same.
  """
  for step_size, floor in ((0.01, 0.8), (1e-3, 0.38)):
    run = train_toy(group_dro(3, step_size=step_size), steps=300, seed=0)
    q = np.asarray(run.weights)
    assert np.all(np.isfinite(q))
    np.testing.assert_allclose(q.sum(1), 1.0, rtol=1e-5)
    assert int(np.argmax(q[-1])) == 1, q[-1]
    assert q[-1, 1] > floor, q[-1]
    # It keeps rising in the second half (the gap does not close).
    assert q[-1, 1] > q[150, 1] > q[50, 1], q[[50, 150, -1], 1]
