"""Per-sample coefficients ``a_i`` from the domain weights (docs/method.md §2).

The update is always ``sum_i a_i g_i = grad(sum_i a_i l_i)``, so a trainer
may apply DoGraph's weights as a weighted loss instead of holding per-sample
gradients. Persistent domains use :func:`frequency_coefficients` (or, with
``coefficients="post_stratified"``, :func:`post_stratified_coefficients`),
per-batch domains :func:`sample_coefficients`.

Shape legend: ``B`` batch, ``M`` domains.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_coefficients(weights: jax.Array, assignments: jax.Array,
                        counts: jax.Array,
                        sample_mask: jax.Array | None = None) -> jax.Array:
  """Per-sample coefficients ``a_i = w_{c(i)} / |C_{c(i)}|`` (docs/method.md §2).

  ``sum_i a_i g_i = sum_j w_j mu_j``, so a trainer may apply DoGraph's weights
  as the weighted loss ``sum_i a_i l_i`` (``jax.lax.stop_gradient(a)``)
  instead of holding per-sample gradients.

  Args:
    weights: ``(M,)`` domain weights; assignments: ``(B,)`` int;
    counts: ``(M,)`` samples per domain (masked samples excluded);
    sample_mask: optional ``(B,)`` bool, ``False`` gives ``a_i = 0``.

  Returns:
    ``(B,)`` float32 coefficients.
  """
  counts = jnp.asarray(counts, jnp.float32)
  a = weights[assignments] / jnp.maximum(counts[assignments], 1.0)
  a = jnp.where(counts[assignments] > 0, a, 0.0)
  if sample_mask is not None:
    a = jnp.where(sample_mask, a, 0.0)
  return a.astype(jnp.float32)


def frequency_ratios(weights: jax.Array, frequencies: jax.Array, max_ratio=jnp.inf) -> jax.Array:
  """``(M,)`` ``r_j = min(w_j / p_j, max_ratio)`` (0 where ``p_j = 0``): how far
  each domain's weight departs from its running frequency."""
  freq = jnp.asarray(frequencies, jnp.float32)
  ratio = jnp.where(freq > 0, weights / jnp.where(freq > 0, freq, 1.0), 0.0)
  return jnp.minimum(ratio, max_ratio)


def frequency_coefficients(weights: jax.Array, frequencies: jax.Array,
                           assignments: jax.Array, sample_mask: jax.Array | None = None,
                           max_ratio=jnp.inf) -> jax.Array:
  """Frequency-relative per-sample coefficients (persistent domains).

  ``r_j = min(w_j / p_j, max_ratio)`` is how far domain ``j``'s weight departs
  from its running frequency ``p_j``; ``a_i = r_{c(i)} / sum_k r_{c(k)}``
  (self-normalised over the kept samples, so ``sum_i a_i = 1``). With ``w =
  p`` every ``a_i = 1 / B``: the plain batch mean. ``max_ratio`` caps how much
  one domain's samples can be up-weighted relative to the natural mixture
  (before the normalisation; it may be traced). With in-batch frequencies
  ``p_j = n_j / B`` and no cap this is :func:`sample_coefficients`.

  Args:
    weights: ``(M,)`` domain weights; frequencies: ``(M,)`` running ``p``
      (summing to 1); assignments: ``(B,)`` int; sample_mask: optional
      ``(B,)`` bool (``False``: ``a_i = 0``).

  Returns:
    ``(B,)`` float32 coefficients summing to 1 (uniform over the kept samples
    if every ratio is 0; all 0 if no sample is kept).
  """
  ratio = frequency_ratios(weights, frequencies, max_ratio)
  mask = _mask(assignments, sample_mask)
  return _normalised(jnp.where(mask, ratio[assignments], 0.0), mask)


def _mask(assignments: jax.Array, sample_mask: jax.Array | None) -> jax.Array:
  return (jnp.ones(assignments.shape, bool) if sample_mask is None
          else jnp.asarray(sample_mask, bool))


def _normalised(a_B: jax.Array, mask_B: jax.Array) -> jax.Array:
  """``a_B / sum(a_B)`` in float32; uniform over the kept samples where the sum
  is 0, all 0 where none is kept."""
  total = jnp.sum(a_B)
  kept = jnp.sum(mask_B.astype(jnp.float32))
  fallback = jnp.where(mask_B, 1.0, 0.0) / jnp.maximum(kept, 1.0)
  return jnp.where(total > 0, a_B / jnp.where(total > 0, total, 1.0),
                   fallback).astype(jnp.float32)


def post_stratified_coefficients(weights: jax.Array, frequencies: jax.Array,
                                 assignments: jax.Array, counts: jax.Array,
                                 sample_mask: jax.Array | None = None,
                                 max_ratio=jnp.inf) -> jax.Array:
  """Post-stratified per-sample coefficients (persistent domains).

  Each domain ``j`` present in the batch (``n_j`` kept samples) gets the
  share ``s_j ∝ p_j min(w_j / p_j, max_ratio)`` of the update, split evenly
  over its samples: ``a_i = s_{c(i)} / n_{c(i)}``, the shares renormalised
  over the present domains (``sum_i a_i = 1``). Where
  :func:`frequency_coefficients` gives domain ``j`` the share ``w_j`` only in
  expectation over batches (its share is ``n_j r_j / sum_k n_k r_k``, which
  moves with the batch's counts), this gives it exactly, so the counts' own
  noise leaves the update. With ``w = p`` it is the classic post-stratified
  estimator of the mean gradient: ``sum_j p_j mu_j`` with ``mu_j`` the
  batch's mean gradient of domain ``j``, whose variance lacks the plain
  mean's between-domain term ``sum_j p_j |m_j - m|^2 / B`` (``m_j`` the
  domain's population mean), to first order in ``1 / B`` (Cochran, *Sampling
  Techniques*, 3rd ed., §5A.9).

  Args:
    weights: ``(M,)`` domain weights; frequencies: ``(M,)`` running ``p``;
    assignments: ``(B,)`` int; counts: ``(M,)`` kept samples per domain in
    this batch; sample_mask: optional ``(B,)`` bool (``False``: ``a_i = 0``).

  Returns:
    ``(B,)`` float32 coefficients summing to 1 (uniform over the kept samples
    where no present domain has a positive share; all 0 if none is kept).
  """
  counts = jnp.asarray(counts, jnp.float32)
  share = jnp.asarray(frequencies, jnp.float32) * frequency_ratios(weights, frequencies,
                                                                   max_ratio)
  share = jnp.where(counts > 0, share, 0.0)
  mask = _mask(assignments, sample_mask)
  # Each kept sample carries share / n of its domain: the a_i sum to the
  # shares of the domains present, which _normalised brings to 1.
  return _normalised(jnp.where(mask, share[assignments] / jnp.maximum(counts[assignments], 1.0),
                               0.0), mask)
