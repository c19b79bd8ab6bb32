"""Synthetic regression domains for sanity checks and examples.

In the manner of levanter's DoReMi test: three domains with a known role,

* ``informative`` (0): targets from a fixed linear rule plus a little noise
  (learnable, and worth learning);
* ``noise`` (1): targets are a level plus large pure noise (nothing to learn
  beyond the level);
* ``easy`` (2): a constant target (learnt at once).

Each domain draws its features in its own block of ``block`` input dimensions
around a non-zero mean (plus a little shared noise), and every target sits at
the same level, which an untrained model misses. So at the start each
domain's per-sample gradients ``(pred - y) x`` form their own tight group in
their own subspace: a gradient-based clustering should recover the domains
early in training. Later the residuals of the learnable domains vanish while
the noise domain's stay of order ``noise_std`` for ever: its gradients have by
far the largest variance, which the ``"uncertainty"`` objective should
distrust.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

DOMAIN_NAMES = ("informative", "noise", "easy")


class ToyBatch(NamedTuple):
  x: jax.Array       # (B, D) float32 features, D = 3 * block
  y: jax.Array       # (B,) float32 targets
  domain: jax.Array  # (B,) int32 true domain id


def toy_batch(key: jax.Array, batch_size: int, *, block: int = 8,
              level: float = 4.0, noise_std: float = 1.5,
              proportions=(1 / 3, 1 / 3, 1 / 3)) -> ToyBatch:
  """One batch mixing the three domains in the given proportions."""
  d = 3 * block
  k_dom, k_x, k_shared, k_eps = jax.random.split(key, 4)
  domain = jax.random.choice(k_dom, 3, (batch_size,),
                             p=jnp.asarray(proportions)).astype(jnp.int32)
  own = 1.0 + 0.1 * jax.random.normal(k_x, (batch_size, block))
  onehot = jax.nn.one_hot(domain, 3)
  x = (onehot[:, :, None] * own[:, None, :]).reshape(batch_size, d)
  x = x + 0.05 * jax.random.normal(k_shared, (batch_size, d))
  eps = jax.random.normal(k_eps, (batch_size,))
  w_inf = jnp.linspace(-1.0, 1.0, block)
  y_inf = level + 30.0 * (own - 1.0) @ w_inf / block + 0.05 * eps
  y_noise = level + noise_std * eps
  y_easy = jnp.full((batch_size,), level)
  y = jnp.select([domain == 0, domain == 1], [y_inf, y_noise], y_easy)
  return ToyBatch(x.astype(jnp.float32), y.astype(jnp.float32), domain)


def init_params(dim: int) -> dict:
  return {"w": jnp.zeros((dim,), jnp.float32), "b": jnp.zeros((), jnp.float32)}


def example_loss(params: dict, example: ToyBatch) -> jax.Array:
  """Squared error of ONE example (the per-sample loss for DoGraph)."""
  pred = jnp.dot(example.x, params["w"]) + params["b"]
  return 0.5 * (pred - example.y) ** 2
