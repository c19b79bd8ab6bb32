"""Lloyd's K-means with k-means++ seeding, jit-stable (fixed iteration count).

docs/method.md §2: the sketches ``z_i`` are clustered into ``M`` model-centric domains.

Empty-cluster policy (the same as scikit-learn's Lloyd): after each assignment
step, a cluster that received no sample is re-seeded at the sample farthest
from its own centroid (the ``r``-th empty cluster takes the ``r``-th farthest
sample). When there are fewer distinct samples than clusters, re-seeding
cannot help and the surplus clusters stay empty: they are reported with
``counts == 0`` and their centroid is left where it was. Masked-out samples
(``sample_mask == False``) never move a centroid, are never chosen as seeds
and are not counted; they still receive an assignment (their nearest
centroid), so downstream code must apply the same mask.

Range: distances are ``||x||^2 - 2 x.c + ||c||^2`` in float32, so entries
must keep ``K * max|x|^2`` below float32's 3.4e38 (``|x| < 1e17`` for
``K = 1024``); beyond it distances overflow (``inf - inf``). The transform
drops sketches with entries above ``MAX_SKETCH_ENTRY = 1e12`` before they
reach this module (``tests/test_scales.py``).

Shape legend: ``B`` samples, ``K`` features, ``M`` clusters.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

Distance = Literal["euclidean", "cosine"]
_HI = jax.lax.Precision.HIGHEST


class KMeansResult(NamedTuple):
  centroids: jax.Array    # (M, K) float32
  assignments: jax.Array  # (B,) int32, index of the nearest centroid
  counts: jax.Array       # (M,) int32, unmasked samples per cluster
  inertia: jax.Array      # () float32, sum over unmasked samples of the distance


def _normalize(x: jax.Array) -> jax.Array:
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.where(norm > 0, norm, 1.0)


def pairwise_sq_dists(x_BxK: jax.Array, c_MxK: jax.Array) -> jax.Array:
  """Squared Euclidean distances ``(B, M)``, clipped at 0 against round-off."""
  d = (jnp.sum(x_BxK**2, -1)[:, None] - 2.0 * jnp.dot(x_BxK, c_MxK.T, precision=_HI)
       + jnp.sum(c_MxK**2, -1)[None, :])
  return jnp.maximum(d, 0.0)


def _distances(x_BxK, c_MxK, distance):
  if distance == "cosine":
    # For unit vectors ||x - c||^2 = 2 (1 - cos): report 1 - cos.
    return 0.5 * pairwise_sq_dists(x_BxK, c_MxK)
  return pairwise_sq_dists(x_BxK, c_MxK)


def kmeans_plusplus(x_BxK: jax.Array, num_clusters: int, key: jax.Array,
                    sample_mask: jax.Array | None = None) -> jax.Array:
  """k-means++ seeding (Arthur & Vassilvitskii, 2007): ``(M, K)`` centroids.

  The first seed is a uniformly chosen unmasked sample; each next one is drawn
  with probability proportional to the squared distance to the nearest seed so
  far. When every unmasked sample already coincides with a seed (duplicates,
  fewer distinct samples than clusters) the draw falls back to uniform.
  """
  b = x_BxK.shape[0]
  mask = jnp.ones((b,), bool) if sample_mask is None else sample_mask
  keys = jax.random.split(key, num_clusters)
  uniform_logits = jnp.where(mask, 0.0, -jnp.inf)
  # If nothing is unmasked, draw uniformly anyway (the result is unused).
  uniform_logits = jnp.where(jnp.any(mask), uniform_logits, 0.0)
  first = jax.random.categorical(keys[0], uniform_logits)
  centroids = jnp.zeros((num_clusters, x_BxK.shape[1]), x_BxK.dtype)
  centroids = centroids.at[0].set(x_BxK[first])
  min_d = jnp.sum((x_BxK - x_BxK[first])**2, -1)

  def body(j, carry):
    centroids, min_d = carry
    weights = jnp.where(mask, min_d, 0.0)
    logits = jnp.where(weights > 0, jnp.log(jnp.where(weights > 0, weights, 1.0)),
                       -jnp.inf)
    logits = jnp.where(jnp.any(weights > 0), logits, uniform_logits)
    pick = jax.random.categorical(keys[j], logits)
    centroids = centroids.at[j].set(x_BxK[pick])
    min_d = jnp.minimum(min_d, jnp.sum((x_BxK - x_BxK[pick])**2, -1))
    return centroids, min_d

  centroids, _ = jax.lax.fori_loop(1, num_clusters, body, (centroids, min_d))
  return centroids


def _assign(x_BxK, c_MxK, distance):
  d_BxM = _distances(x_BxK, c_MxK, distance)
  assignments = jnp.argmin(d_BxM, axis=1).astype(jnp.int32)
  return assignments, jnp.take_along_axis(d_BxM, assignments[:, None], 1)[:, 0]


def _lloyd_step(x_BxK, c_MxK, mask_B, distance):
  m = c_MxK.shape[0]
  assignments, nearest_B = _assign(x_BxK, c_MxK, distance)
  onehot_BxM = jax.nn.one_hot(assignments, m, dtype=x_BxK.dtype) * mask_B[:, None]
  counts_M = jnp.sum(onehot_BxM, 0)
  sums_MxK = jnp.dot(onehot_BxM.T, x_BxK, precision=_HI)
  means_MxK = sums_MxK / jnp.maximum(counts_M, 1.0)[:, None]
  new_c = jnp.where(counts_M[:, None] > 0, means_MxK, c_MxK)
  # Re-seed empty clusters at the farthest (unmasked) samples.
  empty_M = counts_M == 0
  far_d = jnp.where(mask_B, nearest_B, -1.0)
  _, far_idx = jax.lax.top_k(far_d, min(m, x_BxK.shape[0]))
  rank_M = jnp.cumsum(empty_M) - 1
  usable = empty_M & (rank_M < far_idx.shape[0])
  cand_M = far_idx[jnp.clip(rank_M, 0, far_idx.shape[0] - 1)]
  usable = usable & (far_d[cand_M] > 0)
  new_c = jnp.where(usable[:, None], x_BxK[cand_M], new_c)
  if distance == "cosine":
    new_c = _normalize(new_c)
  return new_c


def kmeans(x: jax.Array, num_clusters: int, key: jax.Array, *,
           iters: int = 20,
           init_centroids: jax.Array | None = None,
           distance: Distance = "euclidean",
           sample_mask: jax.Array | None = None) -> KMeansResult:
  """Cluster the rows of ``x`` into ``num_clusters`` groups.

  Lloyd's algorithm for exactly ``iters`` iterations (a ``fori_loop``: no
  data-dependent Python control flow, so it jit-compiles once per shape).

  Args:
    x: ``(B, K)`` points (cast to float32).
    num_clusters: ``M >= 1``. ``M > B`` is allowed: surplus clusters are empty.
    key: PRNG key for k-means++ seeding (unused with ``init_centroids``).
    iters: number of Lloyd iterations (assignment + update).
    init_centroids: ``(M, K)`` warm start instead of k-means++.
    distance: ``"euclidean"`` (squared distance) or ``"cosine"`` (spherical
      K-means: rows and centroids normalised to unit length, distance
      ``1 - cos``).
    sample_mask: optional ``(B,)`` bool; ``False`` rows take no part (see the
      module docstring).

  Returns:
    :class:`KMeansResult`; ``assignments`` and ``inertia`` are computed from
    the final centroids.
  """
  if x.ndim != 2:
    raise ValueError(f"kmeans: x must be (B, K), got shape {x.shape}.")
  if num_clusters < 1:
    raise ValueError(f"kmeans: num_clusters must be >= 1, got {num_clusters}.")
  if distance not in ("euclidean", "cosine"):
    raise ValueError(f"kmeans: unknown distance {distance!r}.")
  x = x.astype(jnp.float32)
  if distance == "cosine":
    x = _normalize(x)
  mask = (jnp.ones(x.shape[0], bool) if sample_mask is None
          else jnp.asarray(sample_mask, bool))
  if init_centroids is None:
    c = kmeans_plusplus(x, num_clusters, key, mask)
  else:
    if init_centroids.shape != (num_clusters, x.shape[1]):
      raise ValueError(
          f"kmeans: init_centroids must be {(num_clusters, x.shape[1])}, "
          f"got {init_centroids.shape}.")
    c = init_centroids.astype(jnp.float32)
    if distance == "cosine":
      c = _normalize(c)
  c = jax.lax.fori_loop(0, iters,
                        lambda _, c: _lloyd_step(x, c, mask, distance), c)
  assignments, nearest = _assign(x, c, distance)
  counts = jnp.sum(jax.nn.one_hot(assignments, num_clusters, dtype=jnp.int32)
                   * mask[:, None], 0)
  inertia = jnp.sum(jnp.where(mask, nearest, 0.0))
  return KMeansResult(c, assignments, counts.astype(jnp.int32), inertia)


def assign(x_BxK: jax.Array, centroids_MxK: jax.Array,
           distance: Distance = "euclidean") -> tuple[jax.Array, jax.Array]:
  """Nearest centroid of every row: ``(assignments (B,) int32, distance (B,))``.

  With ``distance="cosine"`` rows and centroids are normalised first and the
  distance is ``1 - cos``.
  """
  x = x_BxK.astype(jnp.float32)
  c = centroids_MxK.astype(jnp.float32)
  if distance == "cosine":
    x, c = _normalize(x), _normalize(c)
  return _assign(x, c, distance)


class StreamingKMeans(NamedTuple):
  """Persistent centroids refined by every batch (:func:`streaming_kmeans_update`)."""
  centroids: jax.Array  # (M, K) float32 (unit rows for cosine)
  mass: jax.Array       # (M,) float32, decayed count of the samples each absorbed
  reseeded: jax.Array   # (M,) bool, re-seeded by the last update


def streaming_kmeans_update(state: StreamingKMeans, x_BxK: jax.Array,
                            assignments_B: jax.Array, nearest_B: jax.Array, *,
                            decay=1.0, reseed_fraction=0.0,
                            distance: Distance = "euclidean",
                            sample_mask: jax.Array | None = None) -> StreamingKMeans:
  """One mini-batch K-means step with a forgetting factor.

  Mini-batch K-means (Sculley, "Web-scale k-means clustering", WWW 2010, in
  the per-batch form of scikit-learn's ``MiniBatchKMeans``) with the old
  masses discounted by ``decay`` first, so that the centroids follow the
  sketches of a model that keeps changing::

      m_j <- decay * m_j;   c_j <- (m_j c_j + sum_{i in C_j} x_i) / (m_j + n_j);
      m_j <- m_j + n_j

  ``c_j`` is then the exponentially weighted mean of the rows the cluster
  absorbed (``decay = 1``: scikit-learn's ``partial_fit`` exactly, which the
  tests check). For ``"cosine"`` the rows are normalised and each centroid is
  renormalised after the step (online spherical K-means).

  Re-seeding (dead clusters): after the step, a cluster whose mass is below
  ``reseed_fraction * mean_j m_j`` is moved to an unmasked row of this batch
  that is far from its own centroid (the ``r``-th dead cluster takes the
  ``r``-th farthest row) and given the smallest mass among the live clusters,
  as scikit-learn does when it reassigns, so that it can compete on the next
  batch rather than being re-seeded again at once. ``reseed_fraction = 0``
  never re-seeds.

  Args:
    state: the centroids and masses before this batch.
    x_BxK: ``(B, K)`` rows of this batch.
    assignments_B, nearest_B: :func:`assign` of ``x_BxK`` to ``state.centroids``.
    decay: forgetting factor in ``(0, 1]`` (may be traced).
    reseed_fraction: dead-cluster threshold (may be traced).
    distance: ``"euclidean"`` or ``"cosine"``.
    sample_mask: ``(B,)`` bool; ``False`` rows take no part.

  Returns:
    The new :class:`StreamingKMeans`.
  """
  m = state.centroids.shape[0]
  x = x_BxK.astype(jnp.float32)
  if distance == "cosine":
    x = _normalize(x)
  mask = (jnp.ones(x.shape[0], bool) if sample_mask is None
          else jnp.asarray(sample_mask, bool))
  x = jnp.where(mask[:, None], x, 0.0)
  onehot_BxM = jax.nn.one_hot(assignments_B, m, dtype=jnp.float32) * mask[:, None]
  n_M = jnp.sum(onehot_BxM, 0)
  old_M = decay * state.mass
  sums_MxK = jnp.dot(onehot_BxM.T, x, precision=_HI)
  mass_M = old_M + n_M
  c = jnp.where(n_M[:, None] > 0,
                (old_M[:, None] * state.centroids + sums_MxK)
                / jnp.where(mass_M > 0, mass_M, 1.0)[:, None],
                state.centroids)
  if distance == "cosine":
    c = _normalize(c)
  # Dead clusters: re-seed at the farthest rows of this batch.
  mean_mass = jnp.sum(mass_M) / m
  dead_M = mass_M < reseed_fraction * mean_mass
  far_d = jnp.where(mask, nearest_B, -1.0)
  _, far_idx = jax.lax.top_k(far_d, min(m, x.shape[0]))
  rank_M = jnp.cumsum(dead_M) - 1
  cand_M = far_idx[jnp.clip(rank_M, 0, far_idx.shape[0] - 1)]
  dead_M = dead_M & (rank_M < far_idx.shape[0]) & (far_d[cand_M] > 0)
  live_min = jnp.min(jnp.where(dead_M, jnp.inf, mass_M))
  live_min = jnp.where(jnp.isfinite(live_min), live_min, 1.0)
  c = jnp.where(dead_M[:, None], x[cand_M], c)
  mass_M = jnp.where(dead_M, live_min, mass_M)
  return StreamingKMeans(c, mass_M, dead_M)
