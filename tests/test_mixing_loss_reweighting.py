"""Dynamic Loss-Based sample reweighting (Sow et al., ICLR 2025).

Oracles: the repository's formulas (``src/trainer.py``: ``h_func``,
``f_func_*``, ``g_func``) worked out by hand for small batches; the uniform
mixer on the same toy batches.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dograph_jax.mixing.base import MixingInputs
from dograph_jax.mixing.loss_reweighting import STRATEGIES, loss_reweighting
from dograph_jax.mixing.simulate import train_toy
from dograph_jax.mixing.uniform import uniform


def _inputs(losses, domain_id, step=0):
  return MixingInputs(losses=jnp.asarray(losses, jnp.float32),
                      domain_id=jnp.asarray(domain_id, jnp.int32),
                      step=jnp.asarray(step, jnp.int32))


def _softmax(f, r):
  e = np.exp(np.asarray(f, np.float64) / r)
  return e / e.sum()


# Losses [2, 4, 3, 10, 6]: l_min = 2, l_max = 10, range 8; with delta = 2,
# h = 2 (2 l - 12) / 8 = (l - 6) / 2 = [-2, -1, -1.5, 2, 0].
LOSSES5 = [2.0, 4.0, 3.0, 10.0, 6.0]
DOMAINS5 = [0, 1, 0, 2, 1]
F_BY_HAND = {
    "linupper": [0.0, 1.0, 0.5, 2.0, 2.0],      # min(h + 2, 2)
    "mid": [0.0, 0.75, 0.4375, 0.0, 1.0],       # 1 - h^2 / 4
    "extremes": [2.0, 1.0, 1.5, 2.0, 0.0],      # |h|
    "upper": [0.0, 0.5, 0.25, 2.0, 1.0],        # h / 2 + 1
}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_matches_hand_computed_weights(strategy):
  mixer = loss_reweighting(3, strategy=strategy, delta=2.0, temperature=0.7, burn_in=0)
  w, state = mixer.update(mixer.init(), _inputs(LOSSES5, DOMAINS5, step=5))
  expected = _softmax(F_BY_HAND[strategy], 0.7)
  np.testing.assert_allclose(np.asarray(w), expected, rtol=1e-5, atol=1e-7)
  assert w.dtype == jnp.float32
  # Logged domain weights: total sample weight per human domain.
  np.testing.assert_allclose(
      np.asarray(state.weights),
      [expected[0] + expected[2], expected[1] + expected[4], expected[3]], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(state.weights_sum), np.asarray(state.weights))
  assert int(state.count) == 1


def test_defaults_are_the_repository_defaults():
  # delta = 1, r = 1 (kl_reg), linupper. Losses [1, 2, 3, 5]: range 4,
  # h = (2 l - 6) / 4 = [-1, -0.5, 0, 1], f = min(h + 1, 1) = [0, 0.5, 1, 1].
  mixer = loss_reweighting(2)
  w, _ = mixer.update(mixer.init(), _inputs([1.0, 2.0, 3.0, 5.0], [0, 0, 1, 1], step=1000))
  np.testing.assert_allclose(np.asarray(w), _softmax([0.0, 0.5, 1.0, 1.0], 1.0), rtol=1e-5)
  # burn_in = 1000 (burnout_steps): step 999 is still uniform.
  w, _ = mixer.update(mixer.init(), _inputs([1.0, 2.0, 3.0, 5.0], [0, 0, 1, 1], step=999))
  np.testing.assert_array_equal(np.asarray(w), np.full(4, 0.25, np.float32))


def test_burn_in_is_uniform_then_reweights():
  mixer = loss_reweighting(3, burn_in=7)
  state = mixer.init()
  for step in (0, 3, 6):
    w, state = mixer.update(state, _inputs(LOSSES5, DOMAINS5, step=step))
    np.testing.assert_array_equal(np.asarray(w), np.full(5, 0.2, np.float32))
    np.testing.assert_allclose(np.asarray(state.weights), [0.4, 0.4, 0.2], rtol=1e-6)
  w, state = mixer.update(state, _inputs(LOSSES5, DOMAINS5, step=7))
  assert not np.allclose(np.asarray(w), 0.2)
  np.testing.assert_allclose(np.asarray(state.weights_sum),
                             3 * np.array([0.4, 0.4, 0.2]) + np.asarray(state.weights), rtol=1e-5)
  assert int(state.count) == 4


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("value", [0.0, 3.7, 1e6])
def test_all_equal_losses_give_uniform_weights(strategy, value):
  mixer = loss_reweighting(2, strategy=strategy, burn_in=0)
  w, state = mixer.update(mixer.init(), _inputs([value] * 6, [0, 1, 1, 0, 0, 0]))
  assert np.all(np.isfinite(np.asarray(w)))
  np.testing.assert_allclose(np.asarray(w), np.full(6, 1 / 6), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(state.weights), [4 / 6, 2 / 6], rtol=1e-6)


def test_single_sample_and_degenerate_hyperparameters_stay_finite():
  mixer = loss_reweighting(1, burn_in=0)
  w, _ = mixer.update(mixer.init(), _inputs([2.5], [0]))
  np.testing.assert_array_equal(np.asarray(w), [1.0])
  for strategy in STRATEGIES:
    for delta, r in [(0.0, 1.0), (1.0, 0.0), (1.0, 1e-9)]:
      mixer = loss_reweighting(3, strategy=strategy, delta=delta, temperature=r, burn_in=0)
      w, _ = mixer.update(mixer.init(), _inputs(LOSSES5, DOMAINS5))
      assert np.all(np.isfinite(np.asarray(w))), (strategy, delta, r)
      np.testing.assert_allclose(float(jnp.sum(w)), 1.0, rtol=1e-6)


def test_invariant_to_affine_rescaling_of_losses():
  # Min-max normalisation removes loss scale and offset (a > 0).
  rng = np.random.default_rng(0)
  losses = rng.gamma(2.0, 1.5, size=16)
  domains = rng.integers(0, 3, size=16)
  for strategy in STRATEGIES:
    mixer = loss_reweighting(3, strategy=strategy, temperature=0.4, burn_in=0)
    w1, _ = mixer.update(mixer.init(), _inputs(losses, domains))
    w2, _ = mixer.update(mixer.init(), _inputs(3.0 * losses + 7.0, domains))
    np.testing.assert_allclose(np.asarray(w1), np.asarray(w2), rtol=1e-4)


def test_unknown_strategy_raises():
  with pytest.raises(ValueError, match="'lower'"):
    loss_reweighting(3, strategy="lower")


def test_traced_hyperparameters_compile_once():
  traces = []

  @jax.jit
  def step(temperature, delta, burn_in, inputs):
    traces.append(1)
    mixer = loss_reweighting(3, strategy="mid", delta=delta, temperature=temperature,
                             burn_in=burn_in)
    return mixer.update(mixer.init(), inputs)[0]

  inputs = _inputs(LOSSES5, DOMAINS5, step=10)
  f_mid_delta1 = 1.0 - ((np.array(LOSSES5) - 6.0) / 4.0) ** 2   # h = (l - 6) / 4
  w_a = step(jnp.float32(0.7), jnp.float32(2.0), jnp.int32(0), inputs)
  w_b = step(jnp.float32(0.2), jnp.float32(2.0), jnp.int32(0), inputs)
  w_c = step(jnp.float32(1.0), jnp.float32(1.0), jnp.int32(0), inputs)
  w_d = step(jnp.float32(1.0), jnp.float32(1.0), jnp.int32(11), inputs)
  assert len(traces) == 1
  np.testing.assert_allclose(np.asarray(w_a), _softmax(F_BY_HAND["mid"], 0.7), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(w_b), _softmax(F_BY_HAND["mid"], 0.2), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(w_c), _softmax(f_mid_delta1, 1.0), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(w_d), np.full(5, 0.2), rtol=1e-6)


def test_linupper_upweights_the_noise_domain_on_the_toy():
  """After burn-in, linupper favours the upper half of the loss range.

  On the toy, the informative and easy domains are learnt to near-zero loss
  while the noise domain keeps an irreducible squared error (its targets are
  pure noise of std 1.5), so its rows fill the upper half of each batch's
  loss range and get the top weight. Expectation: identical weights to the
  batch mean during burn-in; afterwards the noise domain's share of the
  batch's weight clearly exceeds its share of the rows (what the uniform
  mixer logs on the same batches) and exceeds 1/3.
  """
  burn_in, steps = 50, 300
  base = train_toy(uniform(3), steps=steps, seed=0)
  run = train_toy(loss_reweighting(3, strategy="linupper", burn_in=burn_in), steps=steps, seed=0)
  rows_share = np.asarray(base.weights)     # uniform logs each domain's row share
  share = np.asarray(run.weights)
  np.testing.assert_allclose(share[:burn_in], rows_share[:burn_in], atol=1e-6)
  late = slice(100, steps)
  noise_gain = share[late, 1].mean() - rows_share[late, 1].mean()
  assert share[late, 1].mean() > 0.38, share[late].mean(0)
  assert noise_gain > 0.05, (share[late].mean(0), rows_share[late].mean(0))
  # ... taken from the learnt domains, whose low losses sit in the lower half.
  assert share[late, 0].mean() < rows_share[late, 0].mean()
  assert share[late, 2].mean() < rows_share[late, 2].mean()
  assert np.all(np.isfinite(np.asarray(run.losses)))
