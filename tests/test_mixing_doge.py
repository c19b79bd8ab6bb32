"""DoGE's proxy-run mixer against hand-computed updates and a shared-feature toy.

Oracles: the update of ``Olivia-fsm/DoGE`` ``src/trainer.py``
(``update_domain_weights``) worked out in numpy from explicit gradient
vectors (not from their Gram matrix, and never by calling the module under
test), and a synthetic toy in which two domains share what they teach and a
third is pure noise.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dograph_jax.mixing.base import MixingInputs, domain_counts
from dograph_jax.mixing.doge import DoGEState, doge
from dograph_jax.mixing.simulate import train_toy

# Three domain gradients in R^4.
G_VECS = np.array([[1.0, 2.0, 0.0, -1.0],
                   [0.5, -1.0, 1.0, 0.0],
                   [1.0, 1.0, 1.0, 1.0]])
# A second step's gradients.
G_VECS2 = np.array([[0.0, 1.0, 1.0, 0.0],
                    [1.0, 1.0, 0.0, 0.0],
                    [-1.0, 0.0, 2.0, 1.0]])


def _inputs(g_vecs, domain_id, step=0, num_domains=3):
  domain_id = jnp.asarray(domain_id, jnp.int32)
  g = jnp.asarray(g_vecs, jnp.float32)
  return MixingInputs(losses=jnp.zeros(domain_id.shape), domain_id=domain_id,
                      step=jnp.asarray(step, jnp.int32), domain_gram=g @ g.T,
                      domain_counts=domain_counts(domain_id, num_domains))


def _np_scores(g_vecs, lr, dw_min=0.0, dw_max=5.0, target="others"):
  """The repo's scores from the gradient vectors themselves."""
  total = g_vecs.sum(0)
  tgt = total[None, :] - g_vecs if target == "others" else np.broadcast_to(total, g_vecs.shape)
  inner = np.einsum("dp,dp->d", g_vecs, tgt)
  avg_norm = np.linalg.norm(g_vecs, axis=1).mean()
  return np.clip(lr * inner / (avg_norm + 1e-6), lr * dw_min, lr * dw_max)


def _np_alpha(alpha, scores, mu, eps=0.0):
  z = alpha * np.exp(scores / mu)
  return (1 - eps) * z / z.sum() + eps / len(alpha)


def test_scores_by_hand():
  # <g0,g1> = -1.5, <g0,g2> = 2, <g1,g2> = .5; norms sqrt(6), sqrt(2.25), 2.
  # Sum over the others: g0 -> .5, g1 -> -1 (clipped to lr * 0), g2 -> 2.5.
  avg = (np.sqrt(6) + 1.5 + 2) / 3
  lr = 0.1
  want = np.array([lr * 0.5 / (avg + 1e-6), 0.0, min(lr * 2.5 / (avg + 1e-6), lr * 0.5)])
  assert want[2] == lr * 0.5    # the upper clip bites
  np.testing.assert_allclose(_np_scores(G_VECS, lr, dw_max=0.5), want, rtol=1e-12)
  mixer = doge(3, step_size=lr, mu=0.05, dw_max=0.5)
  _, state = mixer.update(mixer.init(), _inputs(G_VECS, [0, 1, 2, 2]))
  np.testing.assert_allclose(state.scores, want, rtol=1e-5)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_two_steps_match_repo_update(eps):
  lr, mu, dw_max = 0.1, 0.05, 0.5
  mixer = doge(3, step_size=lr, mu=mu, dw_max=dw_max, smoothing=eps)
  assert mixer.needs == frozenset({"domain_gram"})
  state = mixer.init()
  dom = [0, 1, 2, 2]

  w1, state = mixer.update(state, _inputs(G_VECS, dom))
  a1 = _np_alpha(np.full(3, 1 / 3), _np_scores(G_VECS, lr, dw_max=dw_max), mu, eps)
  np.testing.assert_allclose(state.weights, a1, rtol=1e-5)
  # Model step on sum_d alpha_d g_d: w_i = alpha_d / n_d with the NEW alpha.
  np.testing.assert_allclose(w1, [a1[0], a1[1], a1[2] / 2, a1[2] / 2], rtol=1e-5)

  w2, state = mixer.update(state, _inputs(G_VECS2, dom, step=1))
  a2 = _np_alpha(a1, _np_scores(G_VECS2, lr, dw_max=dw_max), mu, eps)
  np.testing.assert_allclose(state.weights, a2, rtol=1e-5)
  np.testing.assert_allclose(state.weights_sum / state.count, (a1 + a2) / 2, rtol=1e-5)
  assert int(state.count) == 2


def test_default_hyperparameters_and_target_all():
  # Repo defaults (config/doge.json): lr 5e-4, mu .01, clip [0, 5 lr], eps 0.
  mixer = doge(3)
  _, state = mixer.update(mixer.init(), _inputs(G_VECS, [0, 1, 2]))
  a1 = _np_alpha(np.full(3, 1 / 3), _np_scores(G_VECS, 5e-4), 0.01)
  np.testing.assert_allclose(state.weights, a1, rtol=1e-5)
  # "all": <g_i, sum_j g_j>, self term included.
  mixer = doge(3, step_size=0.1, mu=0.5, target="all")
  _, state = mixer.update(mixer.init(), _inputs(G_VECS, [0, 1, 2]))
  s = _np_scores(G_VECS, 0.1, target="all")
  np.testing.assert_allclose(state.scores, s, rtol=1e-5)
  np.testing.assert_allclose(state.weights, _np_alpha(np.full(3, 1 / 3), s, 0.5), rtol=1e-5)
  with pytest.raises(ValueError, match="'mix'"):
    doge(3, target="mix")


def test_schedule_and_traced_hyperparameters():
  schedule = optax.linear_schedule(0.2, 0.0, 10)
  mixer = doge(3, step_size=schedule, mu=0.05)
  _, state = mixer.update(mixer.init(), _inputs(G_VECS, [0, 1, 2], step=5))   # lr = 0.1
  want = _np_alpha(np.full(3, 1 / 3), _np_scores(G_VECS, 0.1), 0.05)
  np.testing.assert_allclose(state.weights, want, rtol=1e-5)

  traces = []

  @jax.jit
  def one_step(lr, mu, dw_max, eps):
    traces.append(None)
    m = doge(3, step_size=lr, mu=mu, dw_max=dw_max, smoothing=eps)
    return m.update(m.init(), _inputs(G_VECS, [0, 1, 2]))[1].weights

  for lr, mu, dw_max, eps in [(0.1, 0.05, 0.5, 0.0), (0.3, 0.2, 5.0, 0.2)]:
    want = _np_alpha(np.full(3, 1 / 3), _np_scores(G_VECS, lr, dw_max=dw_max), mu, eps)
    got = one_step(*(jnp.float32(v) for v in (lr, mu, dw_max, eps)))
    np.testing.assert_allclose(got, want, rtol=1e-5)
  assert len(traces) == 1


def test_absent_domain_keeps_its_weight():
  # Domain 1 has no rows: whatever its Gram row/column holds is ignored, it is
  # left out of the mean norm, its alpha stays, and domains 0 and 2 share
  # the mass they held, reweighted by their scores against each other only.
  lr, mu = 0.1, 0.05
  g = G_VECS.copy()
  g[1] = [30.0, -20.0, 10.0, 5.0]    # garbage: must not matter
  mixer = doge(3, step_size=lr, mu=mu)
  prev = np.array([0.2, 0.5, 0.3])
  state0 = mixer.init()._replace(weights=jnp.asarray(prev, jnp.float32),
                                 log_weights=jnp.log(jnp.asarray(prev, jnp.float32)))
  w, state = mixer.update(state0, _inputs(g, [0, 2, 2, 0]))
  present = G_VECS[[0, 2]]
  s = _np_scores(present, lr)     # <g0, g2> = 2 for both; mean of the 2 norms
  z = prev[[0, 2]] * np.exp(s / mu)
  want = np.array([0.5 * z[0] / z.sum(), 0.5, 0.5 * z[1] / z.sum()])
  np.testing.assert_allclose(state.weights, want, rtol=1e-5)
  np.testing.assert_allclose(state.scores, [s[0], 0.0, s[1]], rtol=1e-5)
  np.testing.assert_allclose(w, np.array([want[0], want[2], want[2], want[0]]) /
                             (2 * (want[0] + want[2])), rtol=1e-5)
  # The trainer's zero row/column for the absent domain gives the same.
  g[1] = 0.0
  _, state_zero = mixer.update(state0, _inputs(g, [0, 2, 2, 0]))
  np.testing.assert_allclose(state_zero.weights, want, rtol=1e-5)


@pytest.mark.parametrize("gram", ["zero", "inf", "nan", "huge"])
def test_degenerate_gram_is_finite(gram):
  mixer = doge(3, step_size=0.1, mu=0.01)
  fill = {"zero": 0.0, "inf": np.inf, "nan": np.nan, "huge": 3e38}[gram]
  inputs = _inputs(G_VECS, [0, 1, 2, 0])._replace(domain_gram=jnp.full((3, 3), fill, jnp.float32))
  w, state = mixer.update(mixer.init(), inputs)
  assert np.all(np.isfinite(state.weights)) and np.all(np.isfinite(w))
  assert float(jnp.sum(state.weights)) == pytest.approx(1.0, abs=1e-6)
  assert float(jnp.sum(w)) == pytest.approx(1.0, abs=1e-6)
  if gram == "zero":   # nothing to go on: no move
    np.testing.assert_allclose(state.weights, [1 / 3] * 3, rtol=1e-6)
    np.testing.assert_allclose(w, [1 / 6, 1 / 3, 1 / 3, 1 / 6], rtol=1e-6)


def test_long_run_never_underflows_to_nan():
  # Scores pinned at the upper clip for one domain for many steps: the others'
  # alpha underflows in float32, yet nothing becomes NaN and the absent-domain
  # bookkeeping stays finite.
  mixer = doge(3, step_size=1.0, mu=0.01)
  g = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
  update = jax.jit(mixer.update)
  state = mixer.init()
  for t in range(60):
    dom = [0, 1, 2] if t % 3 else [2, 2, 2]
    w, state = update(state, _inputs(g, dom, t))
    assert np.all(np.isfinite(state.log_weights)) and np.all(np.isfinite(w))
    assert float(jnp.sum(w)) == pytest.approx(1.0, abs=1e-5)
  assert update._cache_size() == 1


def test_state_shapes():
  state = doge(4).init()
  assert isinstance(state, DoGEState)
  assert [x.shape for x in state] == [(4,), (4,), (4,), (4,), ()]
  with pytest.raises(ValueError, match="domain_gram"):
    doge(3).update(doge(3).init(), _inputs(G_VECS, [0, 1, 2])._replace(domain_gram=None))


def test_runs_on_project_toy_and_averages():
  # simulate.py's trainer-shaped loop computes the Gram on the device.
  # NOTE: the project's toy puts each domain on its own block of features,
  # so domain gradients meet only through the shared bias: a shared-feature
  # toy (below) is the sanity test for DoGE.
  run = train_toy(doge(3, step_size=0.05, mu=1.0), steps=60)
  weights = np.asarray(run.weights)
  assert np.all(np.isfinite(weights))
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(run.state.weights_sum / run.state.count, weights.mean(0), rtol=1e-5)
  assert not np.allclose(weights[-1], 1 / 3)   # the weights did move


# --- A toy where generalisation across domains means something. ---
# Linear regression on 8 shared features with one true weight vector w*:
# 0 informative: x ~ N(0, I), y = w*.x + .1 noise;
# 1 noise: x ~ N(0, I), y = N(0, 1), unrelated to x;
# 2 easy: x = (1 + .1 N(0, 1)) w*/|w*| (one direction), y = w*.x.
# Domains 0 and 2 teach the same w*, so their gradients align; the noise
# domain's mean gradient is w (a pull toward 0, against the others once w
# grows) plus sampling noise in a random direction, so its clipped score is
# mostly 0: DoGE should give it the smallest weight.
W_STAR = jnp.array([1.0, -0.5, 0.8, 0.3, -1.0, 0.6, -0.2, 0.9])


def _shared_batch(key, n):
  k_dom, k_x, k_eps, k_scale = jax.random.split(key, 4)
  dom = jax.random.randint(k_dom, (n,), 0, 3)
  x = jax.random.normal(k_x, (n, 8))
  x_easy = (1.0 + 0.1 * jax.random.normal(k_scale, (n, 1))) * W_STAR / jnp.linalg.norm(W_STAR)
  x = jnp.where((dom == 2)[:, None], x_easy, x)
  eps = jax.random.normal(k_eps, (n,))
  y = jnp.where(dom == 1, eps, x @ W_STAR + 0.1 * eps * (dom == 0))
  return x, y, dom


def _make_shared_trainer(mixer, learning_rate, steps=300, batch_size=48):
  """Jitted ``key -> mixer state``: SGD on the mixer's per-sample weights,
  with the Gram of per-domain mean-loss gradients as simulate.train_toy."""

  def run(key):
    params = jnp.zeros((8,))
    opt = optax.sgd(learning_rate)

    def step(carry, key):
      params, opt_state, mstate, t = carry
      x, y, dom = _shared_batch(key, batch_size)
      losses, vjp = jax.vjp(lambda p: 0.5 * (x @ p - y) ** 2, params)
      counts = domain_counts(dom, 3)
      per_domain = jax.nn.one_hot(dom, 3).T / jnp.maximum(counts, 1)[:, None]
      grads_DxP = jax.vmap(lambda c: vjp(c)[0])(per_domain)
      inputs = MixingInputs(losses=losses, domain_id=dom, step=t, domain_counts=counts,
                            domain_gram=grads_DxP @ grads_DxP.T)
      w, mstate = mixer.update(mstate, inputs)
      updates, opt_state = opt.update(vjp(w)[0], opt_state, params)
      return (optax.apply_updates(params, updates), opt_state, mstate, t + 1), None

    init = (params, opt.init(params), mixer.init(), jnp.zeros((), jnp.int32))
    return jax.lax.scan(step, init, jax.random.split(key, steps))[0][2]

  return jax.jit(run)


def test_synthetic_domains_noise_gets_least_weight():
  # eta_t is the proxy's learning rate (as in the repo) and mu = 20 eta_t
  # keeps the repo's ratio (5e-4 / 0.01): the same log-weight move per unit
  # of normalised score.
  lr = 0.05
  train = _make_shared_trainer(doge(3, step_size=lr, mu=20 * lr), lr)
  for seed in range(3):
    state = train(jax.random.PRNGKey(seed))
    avg = np.asarray(state.weights_sum / state.count)
    assert avg.sum() == pytest.approx(1.0, abs=1e-5)
    assert avg[1] < min(avg[0], avg[2]), avg
    assert avg[1] < 0.25, avg


def test_synthetic_domains_target_all_rewards_noise():
  # Why "others" is the default: with the same samples on both sides, "all"
  # adds ||g_i||^2, the noise domain's own sampling noise, to its score.
  lr = 0.05
  avg = {}
  for target in ("others", "all"):
    state = _make_shared_trainer(doge(3, step_size=lr, mu=20 * lr, target=target), lr)(
        jax.random.PRNGKey(0))
    avg[target] = np.asarray(state.weights_sum / state.count)
  assert avg["all"][1] > avg["others"][1] + 0.1, avg
