"""A tiny online-mixing loop on the synthetic toy domains (tests, examples).

It fills :class:`~dograph_jax.mixing.base.MixingInputs` exactly as the
pretraining trainer does (``dograph_jax/train/training.py``), for the linear model
and the three domains of :mod:`dograph_jax.toy` (``informative``, ``noise``,
``easy``), so each method's synthetic-domain test runs its real ``update``
in a loop small enough for the CPU. A sample's "tokens" are the sample
itself (``T = 1``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from dograph_jax import toy
from dograph_jax.mixing.base import MixingInputs, OnlineMixer, domain_counts

NUM_DOMAINS = len(toy.DOMAIN_NAMES)


class ToyRun(NamedTuple):
  params: dict
  state: object              # the mixer's final state
  weights: jax.Array         # (steps, D) the mixer's `weights` after each step
  losses: jax.Array          # (steps,) batch-mean training loss


def _per_sample_losses(params, batch: toy.ToyBatch) -> jax.Array:
  return jax.vmap(toy.example_loss, in_axes=(None, 0))(params, batch)


def probe_losses(params, key: jax.Array, rows: int = 64, block: int = 8) -> jax.Array:
  """``(D,)`` mean loss on a fixed held-out batch of each domain."""
  out = []
  for d in range(NUM_DOMAINS):
    batch = toy.toy_batch(jax.random.fold_in(key, d), rows, block=block,
                          proportions=tuple(float(d == e) for e in range(NUM_DOMAINS)))
    out.append(jnp.mean(_per_sample_losses(params, batch)))
  return jnp.stack(out)


def train_toy(mixer: OnlineMixer, *, steps: int = 300, batch_size: int = 48,
              learning_rate: float = 0.05, seed: int = 0, block: int = 8,
              ref_params: dict | None = None) -> ToyRun:
  """Trains the toy linear model with ``mixer``'s per-sample weights (Adam).

  Args:
    mixer: the method under test.
    ref_params: the reference model for ``ref_token_losses`` (DoReMi); e.g.
      ``train_toy(uniform(3)).params``.
  """
  if "ref_token_losses" in mixer.needs and ref_params is None:
    raise ValueError("this mixer needs ref_params (a reference model)")
  params = toy.init_params(3 * block)
  opt = optax.adam(learning_rate)
  probe_key = jax.random.PRNGKey(10_000 + seed)

  def step(carry, key):
    params, opt_state, mstate, count = carry
    batch = toy.toy_batch(key, batch_size, block=block)
    losses, vjp = jax.vjp(lambda p: _per_sample_losses(p, batch), params)
    counts = domain_counts(batch.domain, NUM_DOMAINS)
    fields = dict(losses=losses, domain_id=batch.domain, step=count, domain_counts=counts)
    if "token_losses" in mixer.needs:
      fields["token_losses"] = losses[:, None]
    if "ref_token_losses" in mixer.needs:
      fields["ref_token_losses"] = _per_sample_losses(ref_params, batch)[:, None]
    if "domain_gram" in mixer.needs:
      onehot = jax.nn.one_hot(batch.domain, NUM_DOMAINS).T            # (D, B)
      per_domain = onehot / jnp.maximum(counts, 1)[:, None]
      grads = jax.vmap(lambda c: vjp(c)[0])(per_domain)               # D stacked grads
      flat = jnp.concatenate([g.reshape(NUM_DOMAINS, -1) for g in jax.tree.leaves(grads)], 1)
      fields["domain_gram"] = flat @ flat.T
    if "probe_losses" in mixer.needs:
      fields["probe_losses"] = probe_losses(params, probe_key, block=block)
    w, mstate = mixer.update(mstate, MixingInputs(**fields))
    grads = vjp(jax.lax.stop_gradient(w))[0]
    updates, opt_state = opt.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return (params, opt_state, mstate, count + 1), (mstate.weights, jnp.mean(losses))

  keys = jax.random.split(jax.random.PRNGKey(seed), steps)
  init = (params, opt.init(params), mixer.init(), jnp.zeros((), jnp.int32))
  (params, _, mstate, _), (weights, losses) = jax.jit(
      lambda c, k: jax.lax.scan(step, c, k))(init, keys)
  return ToyRun(params, mstate, weights, losses)
