"""Model-centric domains: persistent or per-batch, each an ``(init, step)`` pair.

* Persistent (``domains="persistent"``, docs/method.md §2a):
  :class:`PersistentDomains` holds ``M`` centroids refined by every batch
  (mini-batch K-means with forgetting factor ``decay``; the first batch is
  clustered by k-means++ and Lloyd), their masses, and decayed per-domain
  sums from which the running statistics and frequencies ``p`` come.
* Per-batch (``domains="batch"``, §2b, the paper's Appendix A.3): K-means of
  each batch, warm-started from :class:`BatchDomains`' last centroids and
  optionally run over a rolling buffer of recent sketches; statistics of
  this batch only.

``step`` returns the mode's next state and a :class:`Partition`: this
step's assignments, per-domain counts and the statistics the objective
reads. The mode also fixes how weights and coefficients are formed from
them (:class:`DomainMode`): persistent weights are relative to ``p``
(:func:`~.weights.running_weights`, :func:`~.coefficients.frequency_coefficients`),
per-batch ones are not (:func:`~.weights.batch_weights`,
:func:`~.coefficients.sample_coefficients`).

Shape legend: ``B`` batch, ``K`` sketch dimension, ``M`` domains, ``S``
buffer size.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from dograph_jax.clustering import (StreamingKMeans, assign, kmeans, kmeans_plusplus,
                                    streaming_kmeans_update)
from dograph_jax.domains import (DomainStats, RunningSums, domain_stats, running_domain_stats,
                                 update_running_sums, zero_running_sums)
from dograph_jax.projection import unit_rows
from dograph_jax.transform_stages.coefficients import (frequency_coefficients,
                                                       frequency_ratios,
                                                       post_stratified_coefficients,
                                                       sample_coefficients)
from dograph_jax.transform_stages.options import DoGraphOptions
from dograph_jax.transform_stages.weights import Weights, batch_weights, running_weights


class Partition(NamedTuple):
  """One step's domains, as the weights and coefficients read them."""
  assignments: jax.Array  # (B,) int32, domain of each sample (meaningless where not kept)
  counts: jax.Array       # (M,) int32, kept samples of this batch per domain
  stats: DomainStats      # statistics the objective reads (this batch's, or running)


class PersistentDomains(NamedTuple):
  """State of persistent domains."""
  centroids: jax.Array    # (M, K) float32
  mass: jax.Array         # (M,) float32, centroids' decayed sample mass
  sums: RunningSums       # decayed per-domain sums (running statistics)
  frequencies: jax.Array  # (M,) float32, running frequencies p_j of the last step
  reseeded: jax.Array     # () int32, clusters re-seeded since init


class BatchDomains(NamedTuple):
  """State of per-batch domains.

  The buffer fields are None without a buffer (``buffer_size=0``), rather
  than ``(0, K)`` arrays: checkpointers (orbax) refuse to save arrays of
  size 0.
  """
  centroids: jax.Array            # (M, K) float32, last centroids (warm start)
  buffer: jax.Array | None        # (S, K) float32, recent sketches
  buffer_valid: jax.Array | None  # (S,) bool, rows holding a sketch


def persistent_init(opts: DoGraphOptions) -> PersistentDomains:
  """Empty persistent domains (the first step founds the centroids)."""
  m, k = opts.num_domains, opts.sketch_dim
  return PersistentDomains(centroids=jnp.zeros((m, k), jnp.float32),
                           mass=jnp.zeros((m,), jnp.float32),
                           sums=zero_running_sums(m, k),
                           frequencies=jnp.zeros((m,), jnp.float32),
                           reseeded=jnp.zeros((), jnp.int32))


def persistent_step(state: PersistentDomains, z_BxK: jax.Array, kept_B: jax.Array,
                    losses_B: jax.Array | None, count: jax.Array, key: jax.Array,
                    opts: DoGraphOptions) -> tuple[PersistentDomains, Partition]:
  """Assign the batch to the persistent centroids, refine them, update the sums.

  Args:
    state: the domains before this batch.
    z_BxK: ``(B, K)`` sketches; kept_B: ``(B,)`` bool (others take no part);
    losses_B: optional ``(B,)`` losses; count: ``()`` steps taken before this
      one (0: this batch founds the centroids); key: k-means++ seeding key.
    opts: options (``num_domains``, ``kmeans_iters``, ``distance``, traced
      ``decay`` and ``reseed_fraction``).

  Returns:
    ``(next state, partition)``. The partition's statistics are the running
    statistics including this batch; ``next.frequencies`` is their ``p``.
    A re-seeded centroid starts a new domain: its running sums restart in
    ``next`` (this step's statistics still used them).
  """
  m = opts.num_domains
  # The first batch founds the centroids (k-means++ then Lloyd); later
  # batches only refine them.
  start_c = jax.lax.cond(
      count == 0,
      lambda: kmeans(z_BxK, m, key, iters=opts.kmeans_iters, distance=opts.distance,
                     sample_mask=kept_B).centroids,
      lambda: state.centroids)
  assign_B, nearest_B = assign(z_BxK, start_c, opts.distance)
  stream = streaming_kmeans_update(
      StreamingKMeans(start_c, state.mass, jnp.zeros((m,), bool)), z_BxK,
      assign_B, nearest_B, decay=opts.decay, reseed_fraction=opts.reseed_fraction,
      distance=opts.distance, sample_mask=kept_B)
  sums = update_running_sums(state.sums, z_BxK, assign_B, losses_B, decay=opts.decay,
                             sample_mask=kept_B)
  stats = running_domain_stats(sums)
  total = jnp.sum(stats.counts)
  freq = stats.counts / jnp.where(total > 0, total, 1.0)
  counts_M = jnp.sum(jax.nn.one_hot(assign_B, m, dtype=jnp.int32) * kept_B[:, None], 0)
  fresh = stream.reseeded
  sums = jax.tree.map(
      lambda s: jnp.where(fresh.reshape((m,) + (1,) * (s.ndim - 1)), 0.0, s), sums)
  new = PersistentDomains(centroids=stream.centroids, mass=stream.mass, sums=sums,
                          frequencies=freq.astype(jnp.float32),
                          reseeded=state.reseeded + jnp.sum(fresh).astype(jnp.int32))
  return new, Partition(assign_B, counts_M, stats)


def persistent_lagged_ratios(state: PersistentDomains, applied_M: jax.Array,
                             count: jax.Array, z_bxK: jax.Array, kept_b: jax.Array,
                             opts: DoGraphOptions) -> jax.Array:
  """Coefficients of rows met before their batch updates the domains
  (micro-batches in one pass, docs/method.md §7b, design (c)).

  Each row joins its nearest centroid of ``state`` (the same centroids
  :func:`persistent_step` assigns this batch to) and takes ``r_i =
  min(w_{c(i)} / p_{c(i)}, max_ratio)`` with the *previous* step's applied
  weights ``applied_M`` and frequencies ``state.frequencies``: the
  unnormalised :func:`~.coefficients.frequency_coefficients`. Before the
  first step there are no domains and every kept row takes ``r_i = 1``
  (the plain mean).

  Args:
    state: the domains before this batch; applied_M: ``(M,)`` the previous
      step's applied weights; count: ``()`` steps taken before this one;
    z_bxK: ``(b, K)`` sketches of some of the batch's rows; kept_b: ``(b,)``
      bool (others get 0); opts: options (``distance``, traced ``max_ratio``).

  Returns:
    ``(b,)`` float32 ratios.
  """
  assign_b, _ = assign(z_bxK, state.centroids, opts.distance)
  ratio = frequency_ratios(applied_M, state.frequencies, opts.max_ratio)
  r_b = jnp.where(count > 0, ratio[assign_b], 1.0)
  return jnp.where(kept_b, r_b, 0.0).astype(jnp.float32)


def batch_init(opts: DoGraphOptions) -> BatchDomains:
  """No centroids yet, an empty buffer (if any)."""
  m, k, s = opts.num_domains, opts.sketch_dim, opts.buffer_size
  return BatchDomains(centroids=jnp.zeros((m, k), jnp.float32),
                      buffer=jnp.zeros((s, k), jnp.float32) if opts.has_buffer else None,
                      buffer_valid=jnp.zeros((s,), bool) if opts.has_buffer else None)


def batch_step(state: BatchDomains, z_BxK: jax.Array, kept_B: jax.Array,
               losses_B: jax.Array | None, count: jax.Array, key: jax.Array,
               opts: DoGraphOptions) -> tuple[BatchDomains, Partition]:
  """K-means of this batch (and the buffer); statistics of this batch.

  Args: as :func:`persistent_step`; ``count > 0`` lets Lloyd start from the
    previous centroids when ``opts.warm_start``.

  Returns:
    ``(next state, partition)``: the new centroids, the buffer rolled by
    ``B`` rows (the newest last), and this batch's assignments, counts and
    :func:`~dograph_jax.domains.domain_stats`.
  """
  m, s = opts.num_domains, opts.buffer_size
  if opts.has_buffer:
    points = jnp.concatenate([state.buffer, z_BxK], 0)
    mask = jnp.concatenate([state.buffer_valid, kept_B], 0)
  else:
    points, mask = z_BxK, kept_B
  # Spherical K-means seeds on the directions, as kmeans() itself does.
  fresh = kmeans_plusplus(unit_rows(points) if opts.distance == "cosine" else points, m,
                          key, mask)
  init_c = (jnp.where(count > 0, state.centroids, fresh) if opts.warm_start else fresh)
  clusters = kmeans(points, m, key, iters=opts.kmeans_iters, init_centroids=init_c,
                    distance=opts.distance, sample_mask=mask)
  assign_B = clusters.assignments[s:]
  stats = domain_stats(z_BxK, assign_B, m, losses_B, sample_mask=kept_B)
  new = BatchDomains(
      centroids=clusters.centroids,
      buffer=points[points.shape[0] - s:] if opts.has_buffer else None,
      buffer_valid=mask[mask.shape[0] - s:] if opts.has_buffer else None)
  return new, Partition(assign_B, stats.counts.astype(jnp.int32), stats)


class DomainMode(NamedTuple):
  """What differs between persistent and per-batch domains.

  ``init(opts) -> state``; ``step(state, z_BxK, kept_B, losses_B, count, key,
  opts) -> (state, Partition)``; ``weights(state, partition, prev_M, count,
  opts) -> Weights`` and ``coefficients(state, partition, applied_M, kept_B,
  opts) -> a_B`` read the state *after* ``step``.
  """
  init: Callable[..., NamedTuple]
  step: Callable[..., tuple[NamedTuple, Partition]]
  weights: Callable[..., Weights]
  coefficients: Callable[..., jax.Array]


PERSISTENT = DomainMode(
    init=persistent_init, step=persistent_step,
    weights=lambda state, part, prev_M, count, opts: running_weights(
        part.stats, state.frequencies, prev_M, count, opts),
    coefficients=lambda state, part, applied_M, kept_B, opts: (
        post_stratified_coefficients(applied_M, state.frequencies, part.assignments,
                                     part.counts, kept_B, opts.max_ratio)
        if opts.coefficients == "post_stratified" else
        frequency_coefficients(applied_M, state.frequencies, part.assignments, kept_B,
                               opts.max_ratio)))

BATCH = DomainMode(
    init=batch_init, step=batch_step,
    weights=lambda state, part, prev_M, count, opts: batch_weights(
        part.stats, prev_M, count, opts),
    # w_j / |C_j| with |C_j| this batch's kept samples of domain j.
    coefficients=lambda state, part, applied_M, kept_B, opts: sample_coefficients(
        applied_M, part.assignments, part.stats.counts, kept_B))


def domain_mode(opts: DoGraphOptions) -> DomainMode:
  """:data:`PERSISTENT` or :data:`BATCH`, by ``opts.domains``."""
  return PERSISTENT if opts.persistent else BATCH
