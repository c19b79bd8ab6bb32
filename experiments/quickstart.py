"""A short, runnable DoGraph example on the synthetic three-domain task.

Trains a linear model with ``optax.chain(dograph_transform(), clip, adamw)``
on batches mixing an informative, a pure-noise and an easy domain
(``dograph_jax.toy``), and prints, every few steps, the loss per true domain,
how well the model-centric domains match the true ones (adjusted Rand index),
and the share of the update each true domain receives.

Run: ``python experiments/quickstart.py [--steps 60] [--objective uncertainty]``.
(The GPT-2 pretraining job, ``experiments/pretrain.py``, comes next.)
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax

import dograph_jax as dg
from dograph_jax import toy
from dograph_jax.agreement import adjusted_rand_index


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--batch_size", type=int, default=96)
  parser.add_argument("--objective", default="uncertainty", choices=dg.OBJECTIVES)
  parser.add_argument("--lr", type=float, default=0.01)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  b = args.batch_size
  params = toy.init_params(24)
  tx = optax.chain(
      dg.dograph_transform(3, 64, args.objective, batch_size=b, seed=args.seed),
      optax.clip_by_global_norm(1.0),
      optax.adamw(args.lr, weight_decay=0.01))
  state = tx.init(params)

  @jax.jit
  def step(params, state, key):
    batch = toy.toy_batch(key, b)
    losses, grads = dg.per_sample_loss_and_grads(toy.example_loss, params, batch)
    updates, state = tx.update(grads, state, params, losses=losses)
    return optax.apply_updates(params, updates), state, batch.domain, losses

  print(f"DoGraph ({args.objective}) on {', '.join(toy.DOMAIN_NAMES)}; "
        f"B={b}, {args.steps} steps")
  print(f"{'step':>5} {'loss per domain':>24} {'ARI':>6} {'update share per domain':>26}")
  start, shares = time.perf_counter(), []
  for t in range(args.steps):
    params, state, domain, losses = step(params, state,
                                         jax.random.PRNGKey(args.seed * 10**6 + t))
    inner, domain, losses = state[0], np.asarray(domain), np.asarray(losses)
    a = np.asarray(inner.coefficients)
    shares.append([a[domain == d].sum() for d in range(3)])
    if t % 10 == 0 or t == args.steps - 1:
      per_domain = " ".join(f"{losses[domain == d].mean():7.3f}" for d in range(3))
      ari = adjusted_rand_index(domain, np.asarray(inner.assignments))
      share = " ".join(f"{s:8.3f}" for s in shares[-1])
      print(f"{t:5d} {per_domain:>24} {ari:6.2f} {share:>26}")
  mean = np.mean(shares, 0)
  print(f"mean update share: " + ", ".join(
      f"{n} {s:.3f}" for n, s in zip(toy.DOMAIN_NAMES, mean)))
  print(f"samples dropped as non-finite: {int(state[0].nonfinite_total)}; "
        f"{args.steps / (time.perf_counter() - start):.1f} steps/s")


if __name__ == "__main__":
  main()
