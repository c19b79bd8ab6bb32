"""Aioli as an online mixer: hand-computed law estimates and updates, the
repository's update transcribed in numpy as an oracle, the skewed sub-round
mixtures, degenerate probe losses, tracing, and the toy domains."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dograph_jax.mixing.aioli import aioli, normalize_graph, solve_mixing_law
from dograph_jax.mixing.base import MixingInputs
from dograph_jax.mixing.simulate import train_toy

DOMAIN_ID = np.array([0, 0, 1, 2, 2, 2], np.int32)   # B = 6, D = 3


def _inputs(step, probe, domain_id=DOMAIN_ID):
  domain_id = jnp.asarray(domain_id, jnp.int32)
  return MixingInputs(losses=jnp.ones(domain_id.shape, jnp.float32), domain_id=domain_id,
                      step=jnp.asarray(step, jnp.int32),
                      domain_counts=jnp.bincount(domain_id, length=3).astype(jnp.int32),
                      probe_losses=jnp.asarray(probe, jnp.float32))


def _drive(mixer, probes, domain_id=DOMAIN_ID):
  """Runs ``update`` over the rows of ``probes`` (steps, D); returns the
  per-step sample weights and states."""
  update = jax.jit(mixer.update)
  state = mixer.init()
  weights, states = [], []
  for t, probe in enumerate(probes):
    w, state = update(state, _inputs(t, probe, domain_id))
    weights.append(np.asarray(w))
    states.append(jax.tree.map(np.asarray, state))
  return weights, states


# -- hand-computed --------------------------------------------------------------------------


@pytest.mark.parametrize("ema", [None, 0.5])
def test_two_domains_by_hand(ema):
  """D = 2, one-hot sub-rounds (skew 1), one sweep of one step per domain,
  rounds of 4 steps. Round 1 probes 3,3 -> 2,2.5 (train on 0) -> 1.5,1.0
  (train on 1): G = [[1, .5], [.5, 1.5]], normalised by its sum 3.5, column
  sums (1.5, 2)/3.5 = (3/7, 4/7), so p0 = 1 / (1 + e^(1/7)). Round 2 probes
  1,1 -> .8,1 -> .8,.6: G = diag(.2, .4), normalised column sums (1/3, 2/3);
  without ema the logits add up, with ema .5 the matrices are averaged."""
  probes = np.array([[3.0, 3.0], [2.0, 2.5], [1.5, 1.0], [9.0, 9.0],
                     [1.0, 1.0], [0.8, 1.0], [0.8, 0.6], [9.0, 9.0]])
  domain_id = np.array([0, 0, 1], np.int32)
  mixer = aioli(2, step_size=1.0, sweep_rounds=1, sweep_steps=1, round_steps=4, skew=1.0,
                ema=ema, shuffle=False)
  weights, states = _drive(mixer, probes, domain_id)

  np.testing.assert_array_equal([s.skew_domain for s in states], [0, 1, -1, -1, 0, 1, -1, -1])
  # Sub-rounds train one-hot: all weight on the favoured domain's rows.
  np.testing.assert_allclose(weights[0], [0.5, 0.5, 0.0])
  np.testing.assert_allclose(weights[1], [0.0, 0.0, 1.0])
  np.testing.assert_allclose(states[1].weights, [0.5, 0.5])       # no estimate yet

  np.testing.assert_allclose(states[2].graph, [[1.0, 0.5], [0.5, 1.5]], rtol=1e-6)
  p0 = 1.0 / (1.0 + math.exp(1.0 / 7.0))
  np.testing.assert_allclose(states[2].weights, [p0, 1 - p0], rtol=1e-6)
  np.testing.assert_allclose(weights[2], [p0 / 2, p0 / 2, 1 - p0], rtol=1e-6)
  np.testing.assert_allclose(states[3].weights, [p0, 1 - p0], rtol=1e-6)  # trains at p

  np.testing.assert_allclose(states[6].graph, [[0.2, 0.0], [0.0, 0.4]], rtol=1e-5, atol=1e-7)
  gap = 1.0 / 7.0 + 1.0 / 3.0 if ema is None else 0.5 * (1.0 / 7.0) + 0.5 * (1.0 / 3.0)
  p0 = 1.0 / (1.0 + math.exp(gap))
  np.testing.assert_allclose(states[6].weights, [p0, 1 - p0], rtol=1e-5)
  np.testing.assert_array_equal(states[7].num_estimates, 2)
  # The time average accumulates p at every step.
  np.testing.assert_allclose(states[7].weights_sum, np.sum([s.weights for s in states], 0),
                             rtol=1e-6)
  assert states[7].count == 8


def test_solve_two_domains_by_hand():
  """skew .75: M = [[.75, .25], [.25, .75]], M^-1 = [[1.5, -.5], [-.5, 1.5]];
  a drop of 1 in domain 0's loss only when skewed to 0 means A[0] = (1.5, -.5)."""
  got = solve_mixing_law(jnp.array([[1.0, 0.0], [0.0, 0.0]]), 0.75)
  np.testing.assert_allclose(got, [[1.5, -0.5], [0.0, 0.0]], rtol=1e-6)


@pytest.mark.parametrize("skew", [0.3, 0.6, 1.0])
def test_solve_matches_linear_system(skew):
  """The closed form against the repository's per-row np.linalg.solve."""
  d = 4
  drops = np.random.default_rng(0).normal(size=(d, d))
  mix = np.full((d, d), (1 - skew) / (d - 1))
  np.fill_diagonal(mix, skew)
  want = np.stack([np.linalg.solve(mix, row) for row in drops])
  np.testing.assert_allclose(solve_mixing_law(jnp.asarray(drops, jnp.float32), skew), want,
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(solve_mixing_law(jnp.asarray(drops, jnp.float32), skew,
                                              diagonal=True),
                             np.diag(np.diag(drops) / skew), rtol=1e-6)


def test_normalize_graph_by_hand():
  graph = jnp.array([[1.0, -1.0], [0.0, 2.0]])       # shift by 1 -> [[2, 0], [1, 3]], sum 6
  np.testing.assert_allclose(normalize_graph(graph), [[2 / 6, 0.0], [1 / 6, 3 / 6]], rtol=1e-6)
  graph = jnp.array([[1.0, 0.5], [0.0, 2.5]])         # no negative entry: no shift
  np.testing.assert_allclose(normalize_graph(graph), [[0.25, 0.125], [0.0, 0.625]], rtol=1e-6)
  np.testing.assert_array_equal(normalize_graph(jnp.full((3, 3), -2.0)), np.zeros((3, 3)))


# -- the repository's update as an oracle -----------------------------------------------------


def _repository_weights(probes, order, *, d, sweep_rounds, sweep_steps, round_steps, skew,
                        eta, ema, normalize, diagonal, num_rounds):
  """HazyResearch/aioli trainer/aioli_trainer.py (learn_params_subroutine and
  train) transcribed: returns the proportions after each round."""
  out = []
  weights = np.ones(d)
  ema_graph = None
  for r in range(num_rounds):
    start = r * round_steps
    previous = probes[start].astype(np.float64)
    new_graph = np.zeros((d, d))
    for m, j in enumerate(order[r]):
      new = probes[start + (m + 1) * sweep_steps].astype(np.float64)
      new_graph[:, j] += previous - new
      previous = new
    new_graph /= sweep_rounds
    if skew != 1 and not diagonal:
      mix = np.zeros((d, d))
      for i in range(d):
        mix[i] = (1 - skew) / (d - 1)
        mix[i, i] = skew
      graph = np.stack([np.linalg.solve(mix, row) for row in new_graph])
    elif skew != 1 and diagonal:
      graph = np.diag(np.diag(new_graph) / skew)
    else:
      graph = new_graph
    if normalize:
      if graph.min() < 0:
        graph = graph - graph.min()
      graph = graph / graph.sum()
    if ema is not None:
      ema_graph = graph if r == 0 else (1 - ema) * graph + ema * ema_graph
      weights = np.ones(d) * np.exp(eta * ema_graph.sum(axis=0))
    else:
      weights = (np.ones(d) if r == 0 else weights) * np.exp(eta * graph.sum(axis=0))
    out.append(weights / weights.sum())
  return out


@pytest.mark.parametrize("ema,normalize,diagonal", [
    (0.3, True, False), (None, True, False), (None, False, False), (0.3, True, True)])
def test_matches_repository_update(ema, normalize, diagonal):
  """Three rounds, two shuffled sweeps of two steps per domain, random probe
  losses every step: the proportions equal the repository's after each round,
  and each sweep visits every domain once."""
  d, sweep_rounds, sweep_steps, round_steps, num_rounds = 3, 2, 2, 16, 3
  kw = dict(d=d, sweep_rounds=sweep_rounds, sweep_steps=sweep_steps, round_steps=round_steps,
            skew=0.6, eta=0.7, ema=ema, normalize=normalize, diagonal=diagonal,
            num_rounds=num_rounds)
  probes = np.random.default_rng(1).uniform(1.0, 5.0, (round_steps * num_rounds, d))
  mixer = aioli(d, step_size=0.7, sweep_rounds=sweep_rounds, sweep_steps=sweep_steps,
                round_steps=round_steps, skew=0.6, ema=ema, normalize=normalize,
                diagonal=diagonal, seed=3)
  _, states = _drive(mixer, probes.astype(np.float32))

  sweep_len = sweep_rounds * d * sweep_steps
  order = []
  for r in range(num_rounds):
    skewed = [int(states[r * round_steps + s].skew_domain) for s in range(round_steps)]
    assert skewed[sweep_len:] == [-1] * (round_steps - sweep_len)
    assert skewed[:sweep_len] == list(np.repeat(skewed[:sweep_len:sweep_steps], sweep_steps))
    subs = skewed[:sweep_len:sweep_steps]
    for sweep in range(sweep_rounds):
      assert sorted(subs[sweep * d:(sweep + 1) * d]) == list(range(d))
    order.append(subs)
  assert order[0] != order[1] or order[1] != order[2]     # shuffled anew

  want = _repository_weights(probes, order, **kw)
  for r in range(num_rounds):
    np.testing.assert_allclose(states[r * round_steps + sweep_len].weights, want[r],
                               rtol=2e-5)
    np.testing.assert_allclose(states[(r + 1) * round_steps - 1].weights, want[r], rtol=2e-5)
  np.testing.assert_allclose(states[sweep_len - 1].weights, np.full(d, 1 / d))


# -- the mixture applied ------------------------------------------------------------------


def test_skewed_mixture_in_sample_weights():
  """In a sub-round favouring j the batch loss is sum_d m_d mean_{i in d} l_i
  with m = skew e_j + (1 - skew)/(D - 1) elsewhere; during the prior phase m is
  the prior; a domain absent from the batch hands its share to the others."""
  skew = 0.5
  mixer = aioli(3, sweep_rounds=1, sweep_steps=2, round_steps=10, skew=skew,
                prior=[2.0, 1.0, 1.0], prior_steps=3, seed=5)
  counts = np.bincount(DOMAIN_ID, minlength=3)
  weights, states = _drive(mixer, np.full((12, 3), 2.0, np.float32))
  for t in range(3):
    assert states[t].skew_domain == -1
    np.testing.assert_allclose(weights[t], (np.array([0.5, 0.25, 0.25]) / counts)[DOMAIN_ID],
                               rtol=1e-6)
  seen = []
  for t in range(3, 9):
    j = int(states[t].skew_domain)
    seen.append(j)
    mix = np.full(3, 0.25)
    mix[j] = skew
    np.testing.assert_allclose(states[t].mixture, mix, rtol=1e-6)
    np.testing.assert_allclose(weights[t], (mix / counts)[DOMAIN_ID], rtol=1e-6)
    np.testing.assert_allclose(weights[t].sum(), 1.0, rtol=1e-6)
  assert sorted(seen[::2]) == [0, 1, 2] and seen[::2] == seen[1::2]

  # Domain 1 absent: m restricted to domains 0 and 2, renormalised.
  update = jax.jit(mixer.update)
  state = mixer.init()
  absent = np.array([0, 2, 2, 0], np.int32)
  w, state = update(state, _inputs(3, np.ones(3), absent))
  mix = np.full(3, 0.25)
  mix[int(state.skew_domain)] = skew
  mix[1] = 0.0
  mix /= mix.sum()
  np.testing.assert_allclose(w, (mix / np.array([2, 1, 2]))[absent], rtol=1e-6)


# -- degenerate inputs ---------------------------------------------------------------------


def _assert_simplex(states, weights):
  for s, w in zip(states, weights):
    assert np.all(np.isfinite(s.weights)) and np.all(s.weights >= 0)
    np.testing.assert_allclose(s.weights.sum(), 1.0, rtol=1e-5)
    assert np.all(np.isfinite(w))
    np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-5)


@pytest.mark.parametrize("ema,normalize", [(0.1, True), (None, True), (None, False)])
def test_constant_probe_losses_keep_uniform(ema, normalize):
  """No loss ever moves, so A = 0 and p stays uniform (exp(0) for every domain)."""
  mixer = aioli(3, sweep_rounds=1, sweep_steps=2, round_steps=8, ema=ema,
                normalize=normalize)
  weights, states = _drive(mixer, np.full((24, 3), 3.0, np.float32))
  _assert_simplex(states, weights)
  assert states[-1].num_estimates == 3
  np.testing.assert_array_equal(states[-1].graph, np.zeros((3, 3)))
  np.testing.assert_allclose(states[-1].weights, np.full(3, 1 / 3), rtol=1e-6)


@pytest.mark.parametrize("ema,normalize", [(0.1, True), (None, False)])
def test_huge_and_nonfinite_probe_losses(ema, normalize):
  """Losses near the float32 limit, inf and NaN never produce NaN weights."""
  rng = np.random.default_rng(2)
  probes = (rng.uniform(0.0, 3e38, (40, 3))).astype(np.float32)
  probes[5, 1] = np.inf
  probes[10, 0] = np.nan
  probes[15] = -np.inf
  mixer = aioli(3, step_size=50.0, sweep_rounds=1, sweep_steps=2, round_steps=8, ema=ema,
                normalize=normalize)
  weights, states = _drive(mixer, probes)
  _assert_simplex(states, weights)
  assert states[-1].num_estimates >= 1
  assert np.all(np.isfinite(states[-1].logits))


def test_huge_losses_same_proportions_as_scaled_down():
  """With normalisation, A is scale-free: losses 1e30 times larger give the
  same proportions (no overflow on the way)."""
  probes = np.random.default_rng(4).uniform(1.0, 5.0, (24, 3))
  mixer = aioli(3, sweep_rounds=1, sweep_steps=2, round_steps=8, seed=1)
  _, small = _drive(mixer, probes.astype(np.float32))
  _, huge = _drive(mixer, (probes * 1e30).astype(np.float32))
  np.testing.assert_allclose(huge[-1].weights, small[-1].weights, rtol=1e-4)
  assert not np.allclose(small[-1].weights, 1 / 3, atol=1e-3)


# -- tracing and hyperparameters ----------------------------------------------------------


def test_one_trace_over_all_phases():
  traces = []
  mixer = aioli(3, sweep_rounds=1, sweep_steps=2, round_steps=8, prior_steps=4)

  @jax.jit
  def step(state, inputs):
    traces.append(None)
    return mixer.update(state, inputs)

  state = mixer.init()
  probes = np.random.default_rng(0).uniform(1.0, 2.0, (40, 3))
  for t in range(40):          # prior, 4 rounds of sweep + training
    _, state = step(state, _inputs(t, probes[t]))
  assert len(traces) == 1
  assert int(state.num_estimates) == 4


def test_traced_hyperparameters():
  """Every numeric hyperparameter may be a traced scalar: one compilation
  serves two settings, and each agrees with the static factory."""
  traces = []
  probes = np.random.default_rng(6).uniform(1.0, 5.0, (30, 3)).astype(np.float32)

  @jax.jit
  def run(hp):
    traces.append(None)
    mixer = aioli(3, step_size=hp["eta"], sweep_rounds=hp["rounds"], sweep_steps=hp["steps"],
                  round_steps=hp["round"], skew=hp["skew"], ema=hp["ema"],
                  prior_steps=hp["prior"], seed=0)
    def body(state, xs):
      t, probe = xs
      return mixer.update(state, _inputs(t, probe))[1], None

    state, _ = jax.lax.scan(body, mixer.init(), (jnp.arange(30), jnp.asarray(probes)))
    return state.weights

  settings = [dict(eta=0.5, rounds=1, steps=2, round=10, skew=0.6, ema=0.2, prior=2),
              dict(eta=2.0, rounds=2, steps=1, round=9, skew=0.8, ema=0.0, prior=0)]
  for hp in settings:
    traced = run({k: jnp.asarray(v) for k, v in hp.items()})
    static = _drive(aioli(3, step_size=hp["eta"], sweep_rounds=hp["rounds"],
                          sweep_steps=hp["steps"], round_steps=hp["round"], skew=hp["skew"],
                          ema=hp["ema"], prior_steps=hp["prior"], seed=0), probes)[1][-1]
    np.testing.assert_allclose(traced, static.weights, rtol=1e-5)
    assert not np.allclose(traced, 1 / 3, atol=1e-3)
  assert len(traces) == 1


def test_validation_and_needs():
  assert aioli(3).needs == frozenset({"probe_losses"})
  bad = [dict(num_domains=1), dict(skew=0.3), dict(skew=1.5), dict(ema=1.0), dict(ema=-0.1),
         dict(sweep_steps=0), dict(sweep_rounds=1.5), dict(prior_steps=-1),
         dict(round_steps=60), dict(prior=[1.0, 1.0]), dict(normalize="yes")]
  for kw in bad:
    kw = {"num_domains": 3, **kw}
    with pytest.raises(ValueError):
      aioli(kw.pop("num_domains"), **kw)
  with pytest.raises(ValueError, match="probe_losses"):
    aioli(3).update(aioli(3).init(), MixingInputs(jnp.ones(2), jnp.zeros(2, jnp.int32),
                                                  jnp.zeros((), jnp.int32)))


# -- synthetic domains ---------------------------------------------------------------------


def test_toy_domains():
  """``train_toy(aioli(3))``: 300 steps, rounds of 200 (a 60-step LearnParams
  sweep, then training at p), so p moves exactly at steps 60 and 260.

  What Aioli sees here: at initialisation every domain's target sits at the
  same unlearnt level, so every domain's held-out loss falls steeply during
  the very first sub-round *whichever* domain it favours. The domain visited
  first collects that drop in its column of A and gets the largest proportion
  after round 1 (an order effect of Aioli's sweep that the random order only
  removes on average over seeds). Later, the domains compete only through the
  shared bias: the easy domain's loss (a constant target, learnt at once)
  barely moves, so its row of A is small. The noise domain is *not* pushed
  down in this toy: its own held-out loss is the most sensitive one (Adam's
  jitter on the shared bias) and Aioli's objective, the sum of held-out
  losses, counts it; see test_shared_rule_toy for a toy where it is.
  """
  mixer = aioli(3)
  first = int(mixer.update(mixer.init(), _inputs(0, np.ones(3)))[1].skew_domain)
  run = train_toy(mixer, steps=300)
  weights = np.asarray(run.weights)
  assert np.all(np.isfinite(weights)) and np.all(weights >= 0)
  np.testing.assert_allclose(weights.sum(1), 1.0, rtol=1e-5)
  moved = np.flatnonzero(np.any(weights[1:] != weights[:-1], axis=1)) + 1
  np.testing.assert_array_equal(moved, [60, 260])
  assert int(run.state.num_estimates) == 2
  np.testing.assert_allclose(weights[:60], 1 / 3)
  assert int(np.argmax(weights[60])) == first and weights[60, first] > 0.45
  graph = np.asarray(run.state.graph)
  assert np.max(np.abs(graph[2])) < 0.2 * np.max(np.abs(graph))
  assert float(np.mean(run.losses[-20:])) < 0.1 * float(np.mean(run.losses[:5]))


_DIM = 8
_W_STAR = jnp.linspace(-1.0, 1.0, _DIM)
_NOISE_STD = jnp.array([0.1, 1.0, 0.0])


def _shared_rule_batch(key, per_domain):
  """Domains 0 and 2 share one linear rule (0 with a little noise), domain 1
  is zero-mean noise; the features are shared. Stratified: equal rows."""
  k_x, k_eps = jax.random.split(key)
  domain = jnp.repeat(jnp.arange(3, dtype=jnp.int32), per_domain)
  x = jax.random.normal(k_x, (3 * per_domain, _DIM))
  eps = jax.random.normal(k_eps, (3 * per_domain,))
  y = jnp.where(domain == 1, 0.0, x @ _W_STAR) + _NOISE_STD[domain] * eps
  return x, y, domain


def _train_shared_rule(mixer, *, steps, seed, lr=0.02, per_domain=16):
  def losses(w, x, y):
    return 0.5 * (x @ w - y) ** 2

  probe_x, probe_y, probe_domain = _shared_rule_batch(jax.random.PRNGKey(1000 + seed), 64)

  def probe(w):
    return jnp.zeros(3).at[probe_domain].add(losses(w, probe_x, probe_y)) / 64

  def step(carry, xs):
    w, state = carry
    t, key = xs
    x, y, domain = _shared_rule_batch(key, per_domain)
    inputs = MixingInputs(losses(w, x, y), domain, t, probe_losses=probe(w),
                          domain_counts=jnp.bincount(domain, length=3).astype(jnp.int32))
    sample_w, state = mixer.update(state, inputs)
    grad = jax.grad(lambda w: jnp.sum(sample_w * losses(w, x, y)))(w)
    return (w - lr * grad, state), state.weights

  keys = jax.random.split(jax.random.PRNGKey(seed), steps)
  init = (jnp.zeros((_DIM,)), mixer.init())
  (_, state), weights = jax.jit(lambda: jax.lax.scan(step, init, (jnp.arange(steps), keys)))()
  return state, np.asarray(weights)


@pytest.mark.parametrize("seed", [0, 1])
def test_shared_rule_toy(seed):
  """A toy with a known mixing law. At w = t w*, from w = 0, the two rule
  domains' losses are 0.5 (1 - t)^2 |w*|^2 and the noise domain's is
  0.5 t^2 |w*|^2 + const: training on a rule domain moves t up and lowers two
  losses, training on the noise domain shrinks w and raises them (and only
  adds gradient noise), so while t < 2/3 the noise column of A sums lowest
  and exponentiated gradient pushes the noise domain below 1/3 and below both
  rule domains, after the first round and, accumulating (ema None), at the end."""
  mixer = aioli(3, round_steps=50, sweep_rounds=2, sweep_steps=3, ema=None, seed=seed)
  state, weights = _train_shared_rule(mixer, steps=200, seed=seed)
  assert np.all(np.isfinite(weights))
  assert int(state.num_estimates) == 4
  for p in (weights[18], weights[-1]):        # first estimate (after 2 * 3 * 3 steps), final
    assert p[1] < 1 / 3 - 0.03 and p[1] < p[0] - 0.03 and p[1] < p[2] - 0.03, p
