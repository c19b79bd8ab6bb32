"""Synthetic-domains sanity test, in the manner of levanter's DoReMi test.

Three regression domains (dograph_jax.toy): informative, pure noise, easy.
Two claims of the method are checked on them:

1. Model-centric domains match the true ones early in training. At the start
   every target sits at a level the untrained model misses, so each domain's
   per-sample gradients ``(pred - y) x`` form a tight group in the domain's
   own feature block, orthogonal to the others'. A noise sample only leaves
   its group when its noise flips the residual's sign (probability
   ``Phi(-level / noise_std) ~ 0.4%``), so ARI close to 1 is expected; we
   assert a mean ARI over the first 10 steps above 0.8 (observed 0.97) to
   leave room for seeds and K-means' occasional poor split, while still
   failing loudly for a random partition (ARI ~ 0).
2. The ``"uncertainty"`` objective down-weights the noise domain: its
   residuals keep a spread of ``noise_std`` for ever, so its gradient variance
   dominates. Measured without cluster labels, as the share of the update's
   coefficient mass ``sum_{i in domain} a_i`` carried by each true domain,
   averaged over training: noise must get less than each other domain and
   less than 0.25 (uniform would be 1/3; observed about 0.19).
"""

import jax
import numpy as np
import optax
import pytest
from sklearn.metrics import adjusted_rand_score

import dograph_jax as dg
from dograph_jax import toy

B, STEPS = 96, 40


def _train(seed, domains="persistent"):
  params = toy.init_params(24)
  extra = {} if domains == "persistent" else {"distance": "euclidean"}
  tx = optax.chain(dg.dograph_transform(3, 64, "uncertainty", batch_size=B, seed=seed,
                                        domains=domains, **extra),
                   optax.adam(0.01))
  state = tx.init(params)

  @jax.jit
  def step(params, state, key):
    batch = toy.toy_batch(key, B)
    losses, grads = dg.per_sample_loss_and_grads(toy.example_loss, params, batch)
    updates, state = tx.update(grads, state, params, losses=losses)
    return optax.apply_updates(params, updates), state, batch.domain

  aris, mass = [], []
  for t in range(STEPS):
    params, state, domain = step(params, state, jax.random.PRNGKey(1000 * seed + t))
    inner, domain = state[0], np.asarray(domain)
    aris.append(adjusted_rand_score(domain, np.asarray(inner.assignments)))
    a = np.asarray(inner.coefficients)
    mass.append([a[domain == d].sum() for d in range(3)])
  return np.asarray(aris), np.asarray(mass)


@pytest.mark.parametrize("domains", ["persistent", "batch"])
@pytest.mark.parametrize("seed", [0, 1])
def test_clusters_match_domains_and_noise_is_downweighted(seed, domains):
  aris, mass = _train(seed, domains)
  assert aris[:10].mean() > 0.8, aris[:10]
  share = mass.mean(0)
  np.testing.assert_allclose(mass.sum(1), 1.0, rtol=1e-5)
  informative, noise, easy = share
  assert noise < 0.25 and noise < informative and noise < easy, share
