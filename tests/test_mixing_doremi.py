"""DoReMi's proxy-run mixer against hand-computed steps and levanter's toy.

Oracles: the update of Xie et al. (2023), Algorithm 1, worked out by hand /
numpy below (never by calling the module under test), and the synthetic
three-domain logistic regression of levanter's ``tests/test_doremi.py``
(commit 83f3f346), where DoReMi must starve the pure-noise domain.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dograph_jax.mixing.base import MixingInputs, domain_counts
from dograph_jax.mixing.doremi import DoReMiState, doremi
from dograph_jax.mixing.simulate import train_toy
from dograph_jax.mixing.uniform import uniform

C = 1e-3  # the default smoothing


def _inputs(token_losses, ref_token_losses, domain_id, step=0, num_domains=3):
  domain_id = jnp.asarray(domain_id, jnp.int32)
  token_losses = jnp.asarray(token_losses, jnp.float32)
  return MixingInputs(losses=token_losses.mean(-1), domain_id=domain_id,
                      step=jnp.asarray(step, jnp.int32),
                      token_losses=token_losses,
                      ref_token_losses=jnp.asarray(ref_token_losses, jnp.float32),
                      domain_counts=domain_counts(domain_id, num_domains))


# Batch 1: rows of domains 0, 1, 0, 2 with two tokens each.
TOK1 = [[2.0, 1.0], [3.0, 0.5], [1.5, 2.5], [0.2, 0.4]]
REF1 = [[1.0, 1.5], [1.0, 1.0], [1.0, 2.0], [0.3, 0.1]]
DOM1 = [0, 1, 0, 2]
# Clipped excess: [[1, 0], [2, 0], [.5, .5], [0, .3]]. Token means per domain:
# domain 0: (1 + 0 + .5 + .5) / 4 = 0.5 (levanter, dividing by the 3 non-zero
# tokens, would say 2/3); domain 1: 2 / 2 = 1.0; domain 2: .3 / 2 = 0.15.
LAMBDA1 = np.array([0.5, 1.0, 0.15])
# Batch 2: domains 2, 2, 1, 0.
TOK2 = [[1.0, 1.0], [2.0, 0.0], [0.5, 0.5], [4.0, 1.0]]
REF2 = [[0.0, 2.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
DOM2 = [2, 2, 1, 0]
# Clipped: [[1, 0], [2, 0], [0, 0], [3, 0]] -> domain 0: 3/2, 1: 0, 2: 3/4.
LAMBDA2 = np.array([1.5, 0.0, 0.75])


def _np_step(alpha, lam, eta=1.0, c=C):
  """The paper's step, written out: (1-c) softmax(log a + eta lam) + c/D."""
  z = alpha * np.exp(eta * lam)
  return (1 - c) * z / z.sum() + c / len(alpha)


def test_two_steps_match_hand_computation():
  mixer = doremi(3)
  assert mixer.needs == frozenset({"token_losses", "ref_token_losses"})
  state = mixer.init()
  np.testing.assert_allclose(state.weights, [1 / 3] * 3)

  w1, state = mixer.update(state, _inputs(TOK1, REF1, DOM1))
  a1 = _np_step(np.full(3, 1 / 3), LAMBDA1)
  np.testing.assert_allclose(state.excess, LAMBDA1, rtol=1e-6)
  np.testing.assert_allclose(state.weights, a1, rtol=1e-6)
  # The model step uses the NEW alpha: w_i = alpha_d / n_d (domain 0 has 2 rows).
  np.testing.assert_allclose(w1, [a1[0] / 2, a1[1], a1[0] / 2, a1[2]], rtol=1e-6)
  # Domain 1 (largest excess) gains: e^1 / (e^.5 + e^1 + e^.15).
  assert float(state.weights[1]) == pytest.approx(
      0.999 * np.e / (np.exp(0.5) + np.e + np.exp(0.15)) + C / 3, rel=1e-6)

  w2, state = mixer.update(state, _inputs(TOK2, REF2, DOM2, step=1))
  a2 = _np_step(a1, LAMBDA2)
  np.testing.assert_allclose(state.weights, a2, rtol=1e-6)
  np.testing.assert_allclose(w2, [a2[2] / 2, a2[2] / 2, a2[1], a2[0]], rtol=1e-6)
  assert int(state.count) == 2
  np.testing.assert_allclose(state.weights_sum / state.count, (a1 + a2) / 2, rtol=1e-6)


def test_hyperparameters_may_be_traced_without_recompiling():
  traces = []

  @jax.jit
  def two_steps(eta, c):
    traces.append(None)
    mixer = doremi(3, step_size=eta, smoothing=c)
    _, state = mixer.update(mixer.init(), _inputs(TOK1, REF1, DOM1))
    _, state = mixer.update(state, _inputs(TOK2, REF2, DOM2, step=1))
    return state.weights

  for eta, c in [(0.5, 0.1), (2.0, 0.0)]:
    want = _np_step(_np_step(np.full(3, 1 / 3), LAMBDA1, eta, c), LAMBDA2, eta, c)
    np.testing.assert_allclose(two_steps(jnp.float32(eta), jnp.float32(c)), want, rtol=1e-5)
  assert len(traces) == 1


def test_absent_domain_reuses_its_last_excess():
  mixer = doremi(3)
  _, state = mixer.update(mixer.init(), _inputs(TOK1, REF1, DOM1))
  a1 = _np_step(np.full(3, 1 / 3), LAMBDA1)
  # Domain 1 absent from batch 2: the official code reuses its last score (1.0).
  tok = [[1.0, 1.0], [2.0, 0.0], [4.0, 1.0], [4.0, 1.0]]
  ref = [[0.0, 2.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
  w, state = mixer.update(state, _inputs(tok, ref, [2, 2, 0, 0], step=1))
  lam = np.array([1.5, 1.0, 0.75])
  a2 = _np_step(a1, lam)
  np.testing.assert_allclose(state.excess, lam, rtol=1e-6)
  np.testing.assert_allclose(state.weights, a2, rtol=1e-6)
  # Absent domains take no sample weight; the present ones share all of it.
  np.testing.assert_allclose(w, np.array([a2[2], a2[2], a2[0], a2[0]]) / (2 * (a2[0] + a2[2])),
                             rtol=1e-6)
  assert float(jnp.sum(w)) == pytest.approx(1.0, abs=1e-6)


def test_never_seen_domain_uses_initial_excess():
  mixer = doremi(3, initial_excess=0.7)
  _, state = mixer.update(mixer.init(), _inputs(TOK1[:3], REF1[:3], DOM1[:3]))
  lam = np.array([0.5, 1.0, 0.7])   # domain 2 absent: the prior 0.7
  np.testing.assert_allclose(state.weights, _np_step(np.full(3, 1 / 3), lam), rtol=1e-6)


def test_smoothing_floor():
  # One domain's excess is enormous: the others fall to exactly c / D.
  mixer = doremi(3)
  tok = [[1e4, 1e4], [1.0, 1.0], [1.0, 1.0]]
  ref = [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
  _, state = mixer.update(mixer.init(), _inputs(tok, ref, [0, 1, 2]))
  np.testing.assert_allclose(state.weights, [1 - C + C / 3, C / 3, C / 3], rtol=1e-5)
  # Many random steps never go below the floor.
  rng = np.random.default_rng(0)
  for t in range(20):
    tok = rng.exponential(5.0, (6, 4))
    _, state = mixer.update(state, _inputs(tok, np.zeros_like(tok), rng.integers(0, 3, 6), t))
    assert float(jnp.min(state.weights)) >= C / 3 * (1 - 1e-5)
    assert float(jnp.sum(state.weights)) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("huge", [1e30, 3e38])
def test_finite_under_huge_excess(huge):
  # 3e38 overflows the per-domain sums to inf; eta = 10 overflows eta * lambda.
  for eta in (1.0, 10.0):
    mixer = doremi(3, step_size=eta)
    tok = [[huge, huge], [huge, huge], [1.0, 1.0], [huge, 0.0]]
    ref = [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    w, state = mixer.update(mixer.init(), _inputs(tok, ref, [0, 1, 2, 0]))
    assert np.all(np.isfinite(state.weights)) and np.all(np.isfinite(w))
    assert float(jnp.sum(w)) == pytest.approx(1.0, abs=1e-6)
    assert float(jnp.sum(state.weights)) == pytest.approx(1.0, abs=1e-6)
    # The normal domain gets the floor, the two huge ones share the rest.
    assert float(state.weights[2]) == pytest.approx(C / 3, rel=1e-4)
    assert float(state.weights[0] + state.weights[1]) == pytest.approx(1 - C / 3, rel=1e-5)
  # A reference far worse than the proxy: all excess clipped to 0, no move.
  w, state = doremi(3).update(doremi(3).init(), _inputs(np.zeros((3, 2)), np.full((3, 2), huge),
                                                        [0, 1, 2]))
  np.testing.assert_allclose(state.weights, [1 / 3] * 3, rtol=1e-6)


def test_missing_inputs_raise():
  mixer = doremi(3)
  inputs = _inputs(TOK1, REF1, DOM1)._replace(ref_token_losses=None)
  with pytest.raises(ValueError, match="ref_token_losses"):
    mixer.update(mixer.init(), inputs)


def test_state_shapes_and_jit_stable():
  mixer = doremi(4)
  state = mixer.init()
  assert isinstance(state, DoReMiState)
  assert [x.shape for x in state] == [(4,), (4,), (4,), ()]
  update = jax.jit(mixer.update)
  w, s1 = update(state, _inputs(TOK1, REF1, DOM1, num_domains=4))
  w, s2 = update(s1, _inputs(TOK2, REF2, DOM2, step=1, num_domains=4))
  assert update._cache_size() == 1
  assert jax.tree.map(lambda x: (x.shape, x.dtype), s1) == \
      jax.tree.map(lambda x: (x.shape, x.dtype), state)
  # Domain 3 never appears: it keeps lambda = 0 and only loses relative mass.
  assert float(s2.excess[3]) == 0.0


def test_runs_on_project_toy_and_averages():
  # The trainer-shaped loop of simulate.py (inputs filled as in training).
  # NOTE: the project's squared-error toy is NOT a sanity test for DoReMi:
  # its noise domain has targets level + 1.5 * N(0, 1), so the per-sample
  # excess 0.5 (p - r)(p + r - 2y) is linear in the noise with slope |p - r|
  # (the proxy-reference prediction gap), and its clipped mean is first order
  # in that gap times the noise scale; DoReMi then gives that domain most of
  # the weight (about 0.7-0.9 over 300 steps), although its unclipped excess
  # is <= 0. Levanter's logistic toy (below) bounds the per-token slope.
  ref = train_toy(uniform(3), steps=60, seed=1).params
  run = train_toy(doremi(3), steps=60, seed=0, ref_params=ref)
  weights = np.asarray(run.weights)
  assert np.all(np.isfinite(weights))
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
  assert weights.min() >= C / 3 * (1 - 1e-5)
  np.testing.assert_allclose(run.state.weights_sum / run.state.count, weights.mean(0), rtol=1e-5)


# --- levanter's synthetic domains (tests/test_doremi.py, commit 83f3f346) ---
# Three logistic-regression domains on 5 features, y = [W.x + noise > 0]:
# 0 informative (features 1, 2, W = (.5, .5), noise .1), 1 pure noise
# (features 3, 4, W = 0, noise 2: labels are coin flips), 2 easy (feature 0
# around 1, W = 1, noise .05). Batches mix the domains uniformly.
W_D = jnp.array([[0.0, 0.5, 0.5, 0.0, 0.0], [0.0] * 5, [1.0, 0.0, 0.0, 0.0, 0.0]])
MASK_D = jnp.array([[0.0, 1, 1, 0, 0], [0.0, 0, 0, 1, 1], [1.0, 0, 0, 0, 0]])
BIAS_D = jnp.array([[0.0] * 5, [0.0] * 5, [1.0, 0, 0, 0, 0]])
NOISE_D = jnp.array([0.1, 2.0, 0.05])


def _logit_batch(key, n):
  k_dom, k_x, k_eps = jax.random.split(key, 3)
  dom = jax.random.randint(k_dom, (n,), 0, 3)
  x = jax.random.normal(k_x, (n, 5)) * MASK_D[dom] + BIAS_D[dom]
  logit = jnp.sum(x * W_D[dom], -1) + NOISE_D[dom] * jax.random.normal(k_eps, (n,))
  return x, (logit > 0).astype(jnp.float32), dom


def _bce(params, x, y):
  return optax.sigmoid_binary_cross_entropy(x @ params["w"] + params["b"], y)


def _make_logit_trainer(mixer, optimizer, steps=300, batch_size=32):
  """A jitted ``(ref_params, key) -> (params, mixer_state)`` training loop
  that fills MixingInputs like simulate.train_toy (T = 1 token per row)."""

  def run(ref_params, key):
    params = {"w": jnp.zeros((5,)), "b": jnp.zeros(())}

    def step(carry, key):
      params, opt_state, mstate, t = carry
      x, y, dom = _logit_batch(key, batch_size)
      losses, vjp = jax.vjp(lambda p: _bce(p, x, y), params)
      fields = dict(losses=losses, domain_id=dom, step=t, domain_counts=domain_counts(dom, 3))
      if "token_losses" in mixer.needs:
        fields.update(token_losses=losses[:, None],
                      ref_token_losses=_bce(ref_params, x, y)[:, None])
      w, mstate = mixer.update(mstate, MixingInputs(**fields))
      updates, opt_state = optimizer.update(vjp(w)[0], opt_state, params)
      return (optax.apply_updates(params, updates), opt_state, mstate, t + 1), None

    init = (params, optimizer.init(params), mixer.init(), jnp.zeros((), jnp.int32))
    (params, _, mstate, _), _ = jax.lax.scan(step, init, jax.random.split(key, steps))
    return params, mstate

  return jax.jit(run)


def test_synthetic_domains_noise_starved_informative_first():
  # As in levanter, the reference is trained well (on the uniform mixture)
  # and the proxy with a slower optimizer (levanter: Adam 1e-2 vs AdamW 1e-3;
  # here SGD 0.5 vs 0.1), so the reference stays ahead: the excess is the
  # loss the proxy can still learn. Plain SGD rather than Adam, because with
  # the domains on disjoint features Adam's per-coordinate normalisation would
  # cancel the domain weights on each domain's own coordinates. From a zero
  # initialisation (every domain starts at logit 0), DoReMi should starve the
  # coin-flip domain (nothing to learn: excess ~ 0) and favour the
  # informative domain, whose excess lasts longest, over the easy one.
  train_ref = _make_logit_trainer(uniform(3), optax.sgd(0.5))
  train_proxy = _make_logit_trainer(doremi(3), optax.sgd(0.1))
  x, y, dom = _logit_batch(jax.random.PRNGKey(123), 3000)
  for seed in range(2):
    ref, _ = train_ref(None, jax.random.PRNGKey(100 + seed))
    ref_loss = [float(jnp.mean(_bce(ref, x[dom == d], y[dom == d]))) for d in range(3)]
    assert ref_loss[2] < ref_loss[0] < ref_loss[1], ref_loss   # easy < informative < noise
    _, state = train_proxy(ref, jax.random.PRNGKey(seed))
    avg = np.asarray(state.weights_sum / state.count)
    assert avg.sum() == pytest.approx(1.0, abs=1e-5)
    assert avg[1] < 0.05, avg
    assert avg[0] > avg[2] > avg[1], avg
