"""Domain weights: the objective's solve, anchoring, smoothing and floor.

Per-batch domains (:func:`batch_weights`): the objective's optimum for this
batch's statistics, uniform over the present domains if it is not finite.
Persistent domains (:func:`running_weights`): the optimum for the running
statistics, written against the running frequencies ``p`` (``prior``),
``p`` itself if not finite, then anchored to ``p`` (:func:`anchored_weights`).
Both then pass through :func:`smooth` (EMA across steps, floor on the present
domains) (docs/method.md §3–4).

Shape legend: ``M`` domains.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dograph_jax import objectives
from dograph_jax.domains import DomainStats
from dograph_jax.transform_stages.options import DoGraphOptions


class Weights(NamedTuple):
  """One step's domain weights, each ``(M,)``."""
  raw: jax.Array       # the solver's output (after the non-finite fallback)
  smoothed: jax.Array  # EMA across steps: the next step's `prev`
  applied: jax.Array   # on the present domains, floored: used in the update


def solve(stats: DomainStats, opts: DoGraphOptions, prior_M: jax.Array | None = None) -> jax.Array:
  """:func:`~dograph_jax.objectives.solve_weights` with the options' objective
  and hyperparameters; ``prior_M`` ``(M,)`` or None (uniform)."""
  return objectives.solve_weights(
      stats, opts.objective, lambda_graph=opts.lambda_graph, temperature=opts.temperature,
      lambda_dir=opts.lambda_dir, lambda_align=opts.lambda_align, eps=opts.eps,
      num_steps=opts.solver_steps, backend=opts.solver_backend, prior=prior_M)


def anchored_weights(optimum: jax.Array, frequencies: jax.Array, anchor) -> jax.Array:
  """``w_j ∝ p_j^(1 - anchor) * w*_j^anchor`` over the domains with ``p_j > 0``.

  A geometric path from the natural mixture ``p`` (``anchor = 0``: DoGraph
  reduces to the plain batch mean) to the objective's optimum ``w*``
  (``anchor = 1``); ``anchor`` may be traced. Returns ``(M,)`` float32 on
  the simplex (``p`` itself if the result is not finite).
  """
  present = frequencies > 0
  log_p = jnp.log(jnp.where(present, frequencies, 1.0))
  log_w = jnp.log(jnp.maximum(optimum, 1e-30))
  logits = jnp.where(present, (1.0 - anchor) * log_p + anchor * log_w, -jnp.inf)
  w = jax.nn.softmax(jnp.where(jnp.any(present), logits, 0.0))
  w = jnp.where(present | ~jnp.any(present), w, 0.0)
  return jnp.where(jnp.all(jnp.isfinite(w)), w, frequencies).astype(jnp.float32)


def smooth(target_M: jax.Array, prev_M: jax.Array, count: jax.Array, present_M: jax.Array,
           ema, weight_floor) -> tuple[jax.Array, jax.Array]:
  """EMA across steps, then restriction to the present domains and the floor.

  Args:
    target_M: ``(M,)`` this step's weights; prev_M: ``(M,)`` the previous
      smoothed weights; count: ``()`` steps taken (no history at 0);
    present_M: ``(M,)`` bool; ema, weight_floor: may be traced.

  Returns:
    ``(smoothed, applied)``, each ``(M,)``: ``smoothed = ema * prev + (1 -
    ema) * target``; ``applied`` is ``smoothed`` renormalised on the present
    domains (``target`` if the EMA has no mass there), then ``(1 - n f) w +
    f`` with ``f = min(weight_floor, 1 / n)`` over the ``n`` present domains,
    0 elsewhere.
  """
  smoothed = jnp.where(count > 0, ema * prev_M + (1.0 - ema) * target_M, target_M)
  on_present = jnp.where(present_M, smoothed, 0.0)
  total = jnp.sum(on_present)
  # If the EMA put all its mass on domains absent from this batch, fall back
  # to this step's target (which is zero off the present domains).
  applied = jnp.where(total > 0, on_present / jnp.where(total > 0, total, 1.0),
                      target_M)
  n_present = jnp.maximum(jnp.sum(present_M), 1)
  floor = jnp.clip(weight_floor, 0.0, 1.0 / n_present)
  applied = jnp.where(present_M, (1.0 - n_present * floor) * applied + floor, 0.0)
  return smoothed, applied


def batch_weights(stats: DomainStats, prev_M: jax.Array, count: jax.Array,
                  opts: DoGraphOptions) -> Weights:
  """Per-batch domains: the optimum for ``stats`` (this batch), smoothed.

  ``present`` is ``stats.counts > 0``; a non-finite optimum (huge but finite
  sketches can overflow the statistics) becomes uniform over the present
  domains: never NaN weights.
  """
  raw = solve(stats, opts)
  raw = jnp.where(jnp.all(jnp.isfinite(raw)), raw, objectives.uniform_on(stats.present))
  smoothed, applied = smooth(raw, prev_M, count, stats.counts > 0, opts.ema,
                             opts.weight_floor)
  return Weights(raw, smoothed, applied)


def running_weights(stats: DomainStats, frequencies: jax.Array, prev_M: jax.Array,
                    count: jax.Array, opts: DoGraphOptions) -> Weights:
  """Persistent domains: the optimum for the running ``stats``, anchored to ``p``.

  Args:
    stats: running statistics (:func:`~dograph_jax.domains.running_domain_stats`);
    frequencies: ``(M,)`` running ``p`` (the objective's prior when
      ``opts.prior == "frequency"``; the fallback for a non-finite optimum);
    prev_M, count: previous smoothed weights and steps taken; opts: options.

  Returns:
    :class:`Weights`; ``raw`` is the optimum, the target of :func:`smooth` is
    :func:`anchored_weights` of it (``opts.anchor``), present = ``p > 0``.
  """
  raw = solve(stats, opts, frequencies if opts.prior == "frequency" else None)
  raw = jnp.where(jnp.all(jnp.isfinite(raw)), raw, frequencies)
  target = anchored_weights(raw, frequencies, opts.anchor)
  smoothed, applied = smooth(target, prev_M, count, frequencies > 0, opts.ema,
                             opts.weight_floor)
  return Weights(raw, smoothed, applied)
