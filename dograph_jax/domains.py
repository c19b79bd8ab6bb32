"""Per-domain statistics of a clustered batch, in sketch space (docs/method.md §2).

Every quantity the weight objectives use is an inner product of gradients,
which the random projection keeps in expectation, so all of them are computed
from the sketches ``z_i = R g_i``:

* ``counts_j = |C_j|``;
* ``means_j = nu_j = mean_{i in C_j} z_i = R mu_j``;
* ``variances_j = s2_j = mean_{i in C_j} ||z_i - nu_j||^2`` (0 for a
  singleton or an empty domain);
* ``losses_j = L_j = mean_{i in C_j} l_i``;
* ``gram_jl = <nu_j, nu_l>``; ``adjacency_jl = max(0, cos(nu_j, nu_l))`` for
  ``j != l`` (0 on the diagonal and for empty domains); ``laplacian = D - A``;
* ``batch_mean = mean_i z_i``, the sketch of the plain mean gradient ``g_bar``;
* ``pooled_variance``: the within-domain sum of squares over all samples
  divided by ``n - (number of non-empty domains)``, the variance estimate
  used for domains too small to have their own.

Shape legend: ``B`` samples, ``K`` sketch dimension, ``M`` domains.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dograph_jax.projection import unit_rows

_HI = jax.lax.Precision.HIGHEST


class DomainStats(NamedTuple):
  counts: jax.Array           # (M,) float32, |C_j| (unmasked samples)
  means: jax.Array            # (M, K) float32, nu_j (0 for empty domains)
  variances: jax.Array        # (M,) float32, s2_j
  losses: jax.Array           # (M,) float32, L_j (0 if no losses / empty)
  gram: jax.Array             # (M, M) float32, <nu_j, nu_l>
  adjacency: jax.Array        # (M, M) float32, max(0, cos), zero diagonal
  laplacian: jax.Array        # (M, M) float32, diag(A 1) - A
  batch_mean: jax.Array       # (K,) float32, mean_i z_i (sketch of g_bar)
  pooled_variance: jax.Array  # () float32

  @property
  def present(self) -> jax.Array:
    """``(M,)`` bool: domains with at least one sample."""
    return self.counts > 0


def _similarity_graph(means_MxK: jax.Array):
  """Gram ``<nu_j, nu_l>``, cosine graph ``max(0, cos)`` (zero diagonal, zero for
  zero means) and its Laplacian ``diag(A 1) - A``."""
  gram = jnp.dot(means_MxK, means_MxK.T, precision=_HI)
  # Cosines of the unit directions, not gram / (|a| |b|): with huge means the
  # Gram matrix overflows (inf / inf), the directions do not.
  units = unit_rows(means_MxK)
  cos = jnp.clip(jnp.dot(units, units.T, precision=_HI), -1.0, 1.0)
  adjacency = jnp.maximum(cos, 0.0) * (1.0 - jnp.eye(means_MxK.shape[0]))
  laplacian = jnp.diag(jnp.sum(adjacency, 1)) - adjacency
  return gram, adjacency, laplacian


def domain_stats(z: jax.Array, assignments: jax.Array, num_domains: int,
                 losses: jax.Array | None = None, *,
                 sample_mask: jax.Array | None = None) -> DomainStats:
  """Statistics of each model-centric domain.

  Args:
    z: ``(B, K)`` sketches.
    assignments: ``(B,)`` int domain of each sample, in ``[0, num_domains)``.
    num_domains: ``M``.
    losses: optional ``(B,)`` per-sample losses.
    sample_mask: optional ``(B,)`` bool; ``False`` samples are ignored
      everywhere (e.g. those with non-finite gradients).

  Returns:
    :class:`DomainStats` (see the module docstring for the formulas).
  """
  if z.ndim != 2:
    raise ValueError(f"domain_stats: z must be (B, K), got {z.shape}.")
  b = z.shape[0]
  if assignments.shape != (b,):
    raise ValueError(
        f"domain_stats: assignments must be ({b},), got {assignments.shape}.")
  if losses is not None and jnp.shape(losses) != (b,):
    raise ValueError(
        f"domain_stats: losses must be ({b},), got {jnp.shape(losses)}.")
  z = z.astype(jnp.float32)
  mask = (jnp.ones((b,), bool) if sample_mask is None
          else jnp.asarray(sample_mask, bool))
  # Masked samples may carry garbage (NaN): zero them before any product.
  z = jnp.where(mask[:, None], z, 0.0)
  onehot_BxM = jax.nn.one_hot(assignments, num_domains, dtype=jnp.float32)
  onehot_BxM = onehot_BxM * mask[:, None]
  counts_M = jnp.sum(onehot_BxM, 0)
  safe_counts = jnp.maximum(counts_M, 1.0)
  means_MxK = jnp.dot(onehot_BxM.T, z, precision=_HI) / safe_counts[:, None]
  resid_B = jnp.sum((z - jnp.dot(onehot_BxM, means_MxK, precision=_HI))**2, -1)
  resid_B = jnp.where(mask, resid_B, 0.0)
  ss_M = jnp.dot(onehot_BxM.T, resid_B, precision=_HI)
  variances_M = ss_M / safe_counts
  if losses is None:
    losses_M = jnp.zeros((num_domains,), jnp.float32)
  else:
    l_B = jnp.where(mask, jnp.asarray(losses, jnp.float32), 0.0)
    losses_M = jnp.dot(onehot_BxM.T, l_B, precision=_HI) / safe_counts
  gram_MxM, adjacency, laplacian = _similarity_graph(means_MxK)
  n = jnp.sum(mask.astype(jnp.float32))
  batch_mean = jnp.sum(z, 0) / jnp.maximum(n, 1.0)
  dof = n - jnp.sum(counts_M > 0)
  pooled = jnp.where(dof > 0, jnp.sum(ss_M) / jnp.maximum(dof, 1.0), 0.0)
  return DomainStats(counts_M, means_MxK, variances_M, losses_M, gram_MxM,
                     adjacency, laplacian, batch_mean, pooled)


class RunningSums(NamedTuple):
  """Decayed sums over recent steps of each persistent domain's samples.

  With forgetting factor ``gamma`` and step ``t``'s samples ``C_j^t``:
  ``mass_j = sum_t gamma^(T-t) |C_j^t|`` and likewise for the sketches, the
  losses and the squared residuals (each residual taken against the running
  mean after its own step, which avoids the cancellation of
  ``E||z||^2 - ||E z||^2``).
  """
  mass: jax.Array      # (M,) float32
  sum_z: jax.Array     # (M, K) float32
  sum_sq: jax.Array    # (M,) float32
  sum_loss: jax.Array  # (M,) float32


def zero_running_sums(num_domains: int, dim: int) -> RunningSums:
  return RunningSums(jnp.zeros((num_domains,), jnp.float32),
                     jnp.zeros((num_domains, dim), jnp.float32),
                     jnp.zeros((num_domains,), jnp.float32),
                     jnp.zeros((num_domains,), jnp.float32))


def update_running_sums(sums: RunningSums, z: jax.Array, assignments: jax.Array,
                        losses: jax.Array | None = None, *, decay=1.0,
                        sample_mask: jax.Array | None = None) -> RunningSums:
  """Discount ``sums`` by ``decay`` and add this batch.

  Args:
    sums: the sums before this batch.
    z: ``(B, K)`` sketches; assignments: ``(B,)`` int domains.
    losses: optional ``(B,)`` per-sample losses.
    decay: forgetting factor in ``(0, 1]`` (may be traced).
    sample_mask: optional ``(B,)`` bool; ``False`` samples are ignored.
  """
  m = sums.mass.shape[0]
  b = z.shape[0]
  mask = (jnp.ones((b,), bool) if sample_mask is None
          else jnp.asarray(sample_mask, bool))
  z = jnp.where(mask[:, None], z.astype(jnp.float32), 0.0)
  onehot_BxM = jax.nn.one_hot(assignments, m, dtype=jnp.float32) * mask[:, None]
  mass = decay * sums.mass + jnp.sum(onehot_BxM, 0)
  sum_z = decay * sums.sum_z + jnp.dot(onehot_BxM.T, z, precision=_HI)
  means = sum_z / jnp.where(mass > 0, mass, 1.0)[:, None]
  resid_B = jnp.sum((z - jnp.dot(onehot_BxM, means, precision=_HI))**2, -1)
  sum_sq = decay * sums.sum_sq + jnp.dot(onehot_BxM.T, jnp.where(mask, resid_B, 0.0),
                                         precision=_HI)
  if losses is None:
    sum_loss = decay * sums.sum_loss
  else:
    l_B = jnp.where(mask, jnp.asarray(losses, jnp.float32), 0.0)
    sum_loss = decay * sums.sum_loss + jnp.dot(onehot_BxM.T, l_B, precision=_HI)
  return RunningSums(mass, sum_z, sum_sq, sum_loss)


def running_domain_stats(sums: RunningSums) -> DomainStats:
  """:class:`DomainStats` of the persistent domains from their decayed sums.

  ``counts`` are the decayed masses (so ``counts / sum(counts)`` is the
  running frequency ``p_j``), ``means = sum_z / mass``, ``variances =
  sum_sq / mass``, ``losses = sum_loss / mass``; the Gram matrix, cosine graph
  and Laplacian are those of the running means, exactly as in
  :func:`domain_stats`; ``batch_mean`` is the running mean over all domains
  (the sketch of the natural-mixture gradient) and ``pooled_variance`` is
  ``sum_j sum_sq_j / (sum_j mass_j - #present)``.
  """
  mass = sums.mass
  present = mass > 0
  safe = jnp.where(present, mass, 1.0)
  means = jnp.where(present[:, None], sums.sum_z / safe[:, None], 0.0)
  variances = jnp.where(present, sums.sum_sq / safe, 0.0)
  losses = jnp.where(present, sums.sum_loss / safe, 0.0)
  gram, adjacency, laplacian = _similarity_graph(means)
  total = jnp.sum(mass)
  batch_mean = jnp.sum(sums.sum_z, 0) / jnp.maximum(total, 1e-30)
  dof = total - jnp.sum(present)
  pooled = jnp.where(dof > 0, jnp.sum(sums.sum_sq) / jnp.maximum(dof, 1e-30), 0.0)
  return DomainStats(mass, means, variances, losses, gram, adjacency, laplacian,
                     batch_mean, pooled)
