"""One interface for data-mixing methods (DoGraph's peers and baselines).

A method either

* reweights the batch **online**: an :class:`OnlineMixer`, an optax-style pair
  ``(init, update)`` whose ``update`` maps the step's per-sample information
  (:class:`MixingInputs`) to per-sample loss weights ``w_B`` (``sum w = 1``);
  the trainer then steps on ``grad(sum_i w_i l_i)``. Uniform, Dynamic
  Loss-Based reweighting, Group DRO, Aioli, R&B's round rule, and the proxy
  runs of DoReMi and DoGE are online mixers; or
* sets the **sampling proportions** of the final run (offline): DoReMi and
  DoGE (time-averaged proxy weights), RegMix, Data Mixing Law, stratified,
  temperature sampling.
  Offline methods are orchestrated by ``dograph_jax/train/methods.py`` on top of
  the online mixers and the pure fitting code in this package.

DoGraph itself is the optax transformation :func:`dograph_jax.dograph_transform`
(it needs gradients, not losses); ``dograph_jax/train/methods.py`` registers it
beside the others.

Conventions every online mixer follows:

* The state is a ``NamedTuple`` of arrays with fixed shapes, with at least
  ``weights: (D,)`` (the current domain weights, logged by the trainer, for
  per-sample methods the total weight of each domain's samples in the last
  batch, :func:`mean_sample_weights`, all zeros before the first update) and
  ``weights_sum: (D,)``, ``count: ()`` (the sum and number of updates, for
  the time average that offline methods output).
* ``update`` is pure and jit-compatible; hyperparameters are closed over.
* Methods other than DoGraph read the human domain label ``domain_id``.
* ``needs`` names the optional :class:`MixingInputs` fields the trainer must
  fill; the others are ``None``.

Shape legend: ``B`` batch, ``T`` tokens per sequence, ``D`` human domains.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class MixingInputs(NamedTuple):
  """What an online mixer may look at in one step (all stop-gradient)."""
  losses: jax.Array                         # (B,) float32, per-sequence mean token loss
  domain_id: jax.Array                      # (B,) int32, human domain in [0, D)
  step: jax.Array                           # () int32, steps taken before this one
  token_losses: jax.Array | None = None     # (B, T) float32, this model's token losses
  ref_token_losses: jax.Array | None = None  # (B, T) float32, reference model's (DoReMi)
  domain_gram: jax.Array | None = None      # (D, D) float32, <g_d, g_e> of domain mean-loss grads (DoGE)
  domain_counts: jax.Array | None = None    # (D,) int32, batch rows per domain (always filled)
  probe_losses: jax.Array | None = None     # (D,) float32, held-out per-domain losses (Aioli)
  head_grads: jax.Array | None = None       # (D, F) float32, per-domain sums of per-sample output-layer gradients (R&B; rnb.domain_head_grads)


class OnlineMixer(NamedTuple):
  """``init() -> state``; ``update(state, inputs) -> (sample_weights_B, state)``.

  Two ways to apply a mixer's domain weights (``--apply_weights``):

  * ``reweight``: the batch is drawn at the run's fixed proportions and the
    step descends ``sum_i w_i l_i`` with ``update``'s sample weights;
  * ``sample``: the batch of step ``t`` is *drawn* with
    ``proportions(state, t)`` (the state after step ``t - 1``) by the
    trainer's dynamic sampler (``dograph_jax.data.DynamicMixIterator``), and
    the step descends the plain batch mean; ``update`` still runs (it learns
    from the step's losses), its sample weights are not used.

  ``form`` is the one the method's paper uses (the default of
  ``--apply_weights paper``); ``per_sample`` mixers (weights per row, not per
  domain) can only reweight.
  """
  init: Callable[[], Any]
  update: Callable[[Any, MixingInputs], tuple[jax.Array, Any]]
  needs: frozenset = frozenset()   # optional MixingInputs fields the trainer must fill
  head_sketch_dim: int = 0         # head_grads: 0 exact (F = V * d_model), K > 0 sketched (F = K)
  # (state, step) -> (D,) proportions to draw step `step`'s batch with (sample form);
  # None: ``state.weights``, the weights of the last update. All zeros: the
  # run's own fixed proportions (a mixer that has not learnt any yet).
  proportions: Callable[[Any, jax.Array], jax.Array] | None = None
  form: str = "reweight"           # the paper's form: "reweight" | "sample" | "per_sample"


FORMS = ("reweight", "sample", "per_sample")


def sampling_proportions(mixer: OnlineMixer, state, step) -> jax.Array:
  """``(D,)`` float32 proportions for drawing step ``step``'s batch in the
  sample form: the mixer's ``proportions`` hook, else ``state.weights``."""
  if mixer.proportions is not None:
    return mixer.proportions(state, step)
  return state.weights


NEEDS = frozenset({"token_losses", "ref_token_losses", "domain_gram", "probe_losses",
                   "head_grads"})


def domain_counts(domain_id: jax.Array, num_domains: int) -> jax.Array:
  """``(D,)`` int32 rows of each domain in ``domain_id (B,)``."""
  return jnp.zeros((num_domains,), jnp.int32).at[domain_id].add(1)


def domain_means(values: jax.Array, domain_id: jax.Array, num_domains: int) -> jax.Array:
  """``(D,)`` mean of ``values (B,)`` over each domain's rows; 0 for a domain
  absent from the batch."""
  sums = jnp.zeros((num_domains,), values.dtype).at[domain_id].add(values)
  counts = domain_counts(domain_id, num_domains)
  return jnp.where(counts > 0, sums / jnp.maximum(counts, 1), 0.0)


def domain_to_sample_weights(weights_D: jax.Array, domain_id: jax.Array) -> jax.Array:
  """Per-sample loss weights ``w_i = alpha_{d(i)} / n_{d(i)}``, renormalised
  over the domains present in the batch.

  This is levanter's in-batch form of domain weighting: the batch loss is
  ``sum_d alpha_d * mean_{i in d} l_i``. A domain absent from the batch cannot
  contribute; its weight is shared among the present domains in proportion to
  theirs (the returned weights sum to 1 whenever any domain is present).

  Args:
    weights_D: ``(D,)`` non-negative domain weights.
    domain_id: ``(B,)`` int32.

  Returns:
    ``(B,)`` float32 weights summing to 1.
  """
  num_domains = weights_D.shape[0]
  counts = domain_counts(domain_id, num_domains)
  present = jnp.where(counts > 0, weights_D, 0.0)
  total = jnp.sum(present)
  # All present domains at weight 0 (cannot happen on the simplex interior):
  # fall back to the plain batch mean rather than dividing by zero.
  alpha = jnp.where(total > 0, present / jnp.where(total > 0, total, 1.0),
                    (counts > 0) / jnp.maximum(jnp.sum(counts > 0), 1))
  return (alpha / jnp.maximum(counts, 1))[domain_id].astype(jnp.float32)


def mean_sample_weights(sample_weights: jax.Array, domain_id: jax.Array,
                        num_domains: int) -> jax.Array:
  """``(D,)`` total weight that ``sample_weights (B,)`` gives each domain
  (what per-sample methods log as their domain weights)."""
  return jnp.zeros((num_domains,), jnp.float32).at[domain_id].add(sample_weights)


def check_mixtures(mixtures_NxD, name: str = "mixtures_NxD", num_domains: int | None = None,
                   atol: float = 1e-3) -> np.ndarray:
  """``mixtures_NxD`` as a float64 ``(N, D)`` array of mixtures (host side:
  the offline fits of RegMix and the mixing law).

  Raises:
    ValueError: a wrong shape, another number of domains than
      ``num_domains``, NaN/inf, or a row that is not on the simplex (within
      ``atol``).
  """
  x = np.asarray(mixtures_NxD, np.float64)
  if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 2:
    raise ValueError(f"{name} must have shape (N, D) with N >= 1, D >= 2, got {x.shape}")
  if num_domains is not None and x.shape[1] != num_domains:
    raise ValueError(f"{name} has {x.shape[1]} domains, expected {num_domains}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} contains NaN or inf")
  if np.any(x < -1e-9) or np.any(np.abs(x.sum(axis=1) - 1.0) > atol):
    raise ValueError(f"every row of {name} must be a mixture (>= 0, sums to 1 within {atol})")
  return x
