"""Per-domain statistics of a clustered batch, in sketch space (DESIGN §2).

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
  gram_MxM = jnp.dot(means_MxK, means_MxK.T, precision=_HI)
  norms_M = jnp.sqrt(jnp.maximum(jnp.diag(gram_MxM), 0.0))
  denom = norms_M[:, None] * norms_M[None, :]
  cos_MxM = jnp.where(denom > 0, gram_MxM / jnp.where(denom > 0, denom, 1.0), 0.0)
  adjacency = jnp.maximum(cos_MxM, 0.0) * (1.0 - jnp.eye(num_domains))
  laplacian = jnp.diag(jnp.sum(adjacency, 1)) - adjacency
  n = jnp.sum(mask.astype(jnp.float32))
  batch_mean = jnp.sum(z, 0) / jnp.maximum(n, 1.0)
  dof = n - jnp.sum(counts_M > 0)
  pooled = jnp.where(dof > 0, jnp.sum(ss_M) / jnp.maximum(dof, 1.0), 0.0)
  return DomainStats(counts_M, means_MxK, variances_M, losses_M, gram_MxM,
                     adjacency, laplacian, batch_mean, pooled)
