"""Synthetic logistic-regression domains for sanity checks and examples.

In the manner of levanter's DoReMi test: three domains with a known role,

* ``informative`` (0): labels from a fixed linear rule (learnable);
* ``noise`` (1): labels are fair coin flips (nothing to learn);
* ``easy`` (2): labels from a rule with a large margin (learnt at once).

Each domain draws its features mainly in its own block of ``block`` input
dimensions (plus a little shared noise), so the domains' per-sample gradients
lie in nearly orthogonal subspaces: a gradient-based clustering should recover
them, and a weighting that distrusts high gradient variance should shy away
from the noise domain (its residuals stay at +-0.5 for ever).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

DOMAIN_NAMES = ("informative", "noise", "easy")


class ToyBatch(NamedTuple):
  x: jax.Array       # (B, D) float32 features
  y: jax.Array       # (B,) float32 labels in {0, 1}
  domain: jax.Array  # (B,) int32 true domain id


def toy_batch(key: jax.Array, batch_size: int, *, block: int = 8,
              shared_noise: float = 0.1,
              proportions=(1 / 3, 1 / 3, 1 / 3)) -> ToyBatch:
  """One batch mixing the three domains in the given proportions."""
  d = 3 * block
  k_dom, k_x, k_noise, k_y = jax.random.split(key, 4)
  domain = jax.random.choice(k_dom, 3, (batch_size,),
                             p=jnp.asarray(proportions)).astype(jnp.int32)
  own = jax.random.normal(k_x, (batch_size, block))
  # Place each sample's features in its domain's block.
  onehot = jax.nn.one_hot(domain, 3)
  x = (onehot[:, :, None] * own[:, None, :]).reshape(batch_size, d)
  x = x + shared_noise * jax.random.normal(k_noise, (batch_size, d))
  w_inf = jnp.linspace(-1.0, 1.0, block)
  logit_inf = x[:, :block] @ w_inf
  logit_easy = 10.0 * x[:, 2 * block]
  y_inf = (logit_inf > 0).astype(jnp.float32)
  y_noise = jax.random.bernoulli(k_y, 0.5, (batch_size,)).astype(jnp.float32)
  y_easy = (logit_easy > 0).astype(jnp.float32)
  y = jnp.select([domain == 0, domain == 1], [y_inf, y_noise], y_easy)
  return ToyBatch(x.astype(jnp.float32), y, domain)


def init_params(dim: int) -> dict:
  return {"w": jnp.zeros((dim,), jnp.float32), "b": jnp.zeros((), jnp.float32)}


def example_loss(params: dict, example: ToyBatch) -> jax.Array:
  """Logistic loss of ONE example (the per-sample loss for DoGraph)."""
  logit = jnp.dot(example.x, params["w"]) + params["b"]
  return jnp.logaddexp(0.0, logit) - example.y * logit
