"""``dograph_transform``: DoGraph as an optax gradient transformation.

Each ``update`` turns per-sample gradients into one update (docs/method.md §1–4):

1. drop non-finite samples (policy below);
2. sketch every gradient, ``z_i = R g_i`` (``R`` fixed by ``seed`` for the
   whole run, so centroids and buffered sketches of earlier steps live in the
   same space);
3. model-centric domains: by default (``domains="persistent"``) every sample
   joins the nearest of ``num_domains`` centroids that persist across steps
   and are refined by each batch (mini-batch K-means with a forgetting
   factor); with ``domains="batch"`` K-means of this batch (optionally
   warm-started from the previous centroids, optionally over a rolling
   buffer of recent sketches), the paper's Appendix A.3 literally;
4. domain statistics (persistent: decayed running sums over recent steps;
   batch: this batch) and one weight per domain from the chosen objective
   (persistent: written against the running frequencies ``p`` and anchored
   to them);
5. stabilisers: EMA of the weights across steps, a floor on every present
   domain's weight;
6. the update ``sum_i a_i g_i`` with persistent ``a_i ∝ min(w_{c(i)} /
   p_{c(i)}, max_ratio)`` (:func:`frequency_coefficients`: the plain mean
   when ``w = p``) or per-batch ``a_i = w_{c(i)} / |C_{c(i)}|``
   (:func:`sample_coefficients`).

It must be the first member of a chain, because it is the one that reduces the
batch axis::

    tx = optax.chain(dograph_transform(), optax.clip_by_global_norm(1.0),
                     optax.adamw(lr, weight_decay=0.01))
    updates, opt_state = tx.update(per_sample_grads, opt_state, params,
                                   losses=per_sample_losses)

Fast path: instead of per-sample gradients, ``updates`` may be a
:class:`~dograph_jax.factored.FactoredGrads` from the factored engine (losses,
Kronecker sketches made with :func:`projection_key`, and a map from the
coefficients ``a`` to ``sum_i a_i g_i``); the transform then skips its own
sketch and asks that map for the update. Same clusters, weights and update as
the reference path with ``sketch_kind="kronecker"``.

Non-finite policy: a sample whose gradient (or loss, when given) has any
non-finite entry, or whose sketch has an entry beyond
:data:`MAX_SKETCH_ENTRY` (1e12, where the running statistics would overflow
float32), gets coefficient ``a_i = 0``; it takes no part in clustering,
statistics or the update, ``state.kept`` marks the samples used, and
``state.nonfinite`` / ``state.nonfinite_total`` count the dropped ones so a
trainer can log them. If every sample is dropped the update is zero.

Shape legend: ``B`` batch, ``K`` sketch dimension, ``M`` domains, ``S``
buffer size.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dograph_jax import objectives
from dograph_jax.clustering import (StreamingKMeans, assign, kmeans, kmeans_plusplus,
                                    streaming_kmeans_update)
from dograph_jax.domains import (RunningSums, domain_stats, running_domain_stats,
                                 update_running_sums, zero_running_sums)
from dograph_jax.factored import FactoredGrads
from dograph_jax.projection import DEFAULT_BLOCK_BUDGET, sketch, unit_rows

PyTree = Any

# Arguments of `dograph_transform` that fix shapes or Python control flow:
# pass them as `static_args` to `optax.inject_hyperparams`.
STATIC_ARGS = ("num_domains", "sketch_dim", "objective", "domains", "prior", "seed", "sketch_kind",
               "normalize_blocks", "kmeans_iters", "distance", "warm_start", "buffer_size",
               "batch_size", "solver_steps", "solver_backend", "block_budget")


class DoGraphState(NamedTuple):
  """State of :func:`dograph_transform`."""
  count: jax.Array            # () int32, updates taken
  key: jax.Array              # (2,) uint32, PRNG key for k-means++ seeding
  centroids: jax.Array        # (M, K) float32, last centroids (warm start)
  weights: jax.Array          # (M,) float32, smoothed (EMA) domain weights
  buffer: jax.Array | None    # (S, K) float32, recent sketches; None if S == 0
  buffer_valid: jax.Array | None  # (S,) bool, rows holding a sketch; None if S == 0
  raw_weights: jax.Array      # (M,) float32, last solver output
  applied_weights: jax.Array  # (M,) float32, last weights used in the update
  counts: jax.Array           # (M,) int32, last batch's samples per domain
  assignments: jax.Array | None   # (B,) int32, last domain of each sample; None if batch_size is None
  coefficients: jax.Array | None  # (B,) float32, last a_i; None if batch_size is None
  kept: jax.Array | None      # (B,) bool, samples the last update used; None if batch_size is None
  nonfinite: jax.Array        # () int32, samples dropped in the last update
  nonfinite_total: jax.Array  # () int32, samples dropped since init
  # Persistent domains only (None with domains="batch"):
  mass: jax.Array | None = None         # (M,) float32, centroids' decayed sample mass
  sums: RunningSums | None = None       # decayed per-domain sums (running statistics)
  frequencies: jax.Array | None = None  # (M,) float32, last running frequencies p_j
  reseeded: jax.Array | None = None     # () int32, clusters re-seeded since init


def projection_key(seed: int) -> jax.Array:
  """The key of the transform's projection ``R`` for ``seed`` (fixed for a run).

  A caller that sketches itself (the factored engine) must sketch with this
  key so that centroids and buffered sketches of earlier steps stay in the
  same space.
  """
  return jax.random.fold_in(jax.random.PRNGKey(seed), 0)


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
  freq = jnp.asarray(frequencies, jnp.float32)
  ratio = jnp.where(freq > 0, weights / jnp.where(freq > 0, freq, 1.0), 0.0)
  ratio = jnp.minimum(ratio, max_ratio)
  mask = (jnp.ones(assignments.shape, bool) if sample_mask is None
          else jnp.asarray(sample_mask, bool))
  r_B = jnp.where(mask, ratio[assignments], 0.0)
  total = jnp.sum(r_B)
  kept = jnp.sum(mask.astype(jnp.float32))
  fallback = jnp.where(mask, 1.0, 0.0) / jnp.maximum(kept, 1.0)
  return jnp.where(total > 0, r_B / jnp.where(total > 0, total, 1.0),
                   fallback).astype(jnp.float32)


# Largest sketch entry the transform uses: beyond it a sample is dropped and
# counted like a non-finite one. The running statistics hold sums of squared
# sketch entries over the recent history (``K * N_eff * z^2`` with
# ``N_eff = B / (1 - decay)``), which stay far inside float32 (3.4e38) at this
# bound for K up to 1e4 and N_eff up to 1e6; 1e12 is also far beyond any
# trainable per-sample gradient (one that large means the run has diverged).
MAX_SKETCH_ENTRY = 1e12


def usable_sketches(z_BxK: jax.Array) -> jax.Array:
  """``(B,)`` bool: the rows whose entries are finite and at most
  :data:`MAX_SKETCH_ENTRY` in magnitude (the samples the transform keeps)."""
  return jnp.all(jnp.abs(z_BxK) <= MAX_SKETCH_ENTRY, axis=1)  # False for NaN too


def _finite_mask(grads: PyTree, losses: jax.Array | None) -> jax.Array:
  ok = None
  for g in jax.tree.leaves(grads):
    leaf_ok = jnp.all(jnp.isfinite(g).reshape(g.shape[0], -1), axis=1)
    ok = leaf_ok if ok is None else ok & leaf_ok
  if losses is not None:
    ok = ok & jnp.isfinite(losses)
  return ok


def _check_per_sample(updates, params, batch_size):
  leaves = jax.tree.leaves(updates)
  if not leaves:
    raise ValueError("dograph_transform: `updates` has no leaves.")
  if any(x.ndim == 0 for x in leaves):
    raise ValueError(
        "dograph_transform expects per-sample gradients with a leading batch "
        "axis B; got a scalar leaf.")
  if params is not None:
    for g, p in zip(leaves, jax.tree.leaves(params)):
      if g.shape[1:] != jnp.shape(p):
        raise ValueError(
            "dograph_transform expects per-sample gradients (B, *param.shape); "
            f"got a leaf of shape {g.shape} for a parameter of shape "
            f"{jnp.shape(p)}. Did you pass the mean gradient, or put the batch "
            "axis elsewhere?")
  b = leaves[0].shape[0]
  if any(x.shape[0] != b for x in leaves):
    raise ValueError(
        "dograph_transform: per-sample gradient leaves disagree on the leading "
        f"batch axis: {sorted({x.shape[0] for x in leaves})}.")
  if batch_size is not None and b != batch_size:
    raise ValueError(
        f"dograph_transform was built with batch_size={batch_size} but got "
        f"per-sample gradients for B={b}.")
  return b


def _smooth(raw_M, prev_M, count, present_M, ema, weight_floor):
  """EMA across steps, then restrict to present domains and apply the floor."""
  smoothed = jnp.where(count > 0, ema * prev_M + (1.0 - ema) * raw_M, raw_M)
  on_present = jnp.where(present_M, smoothed, 0.0)
  total = jnp.sum(on_present)
  # If the EMA put all its mass on domains absent from this batch, fall back
  # to this step's raw weights (which are zero off the present domains).
  applied = jnp.where(total > 0, on_present / jnp.where(total > 0, total, 1.0),
                      raw_M)
  n_present = jnp.maximum(jnp.sum(present_M), 1)
  floor = jnp.clip(weight_floor, 0.0, 1.0 / n_present)
  applied = jnp.where(present_M, (1.0 - n_present * floor) * applied + floor, 0.0)
  return smoothed, applied


def dograph_transform(
    num_domains: int = 11,
    sketch_dim: int = 256,
    objective: str = "uncertainty",
    *,
    domains: str = "persistent",
    prior: str = "frequency",
    seed: int = 0,
    sketch_kind: str = "gaussian",
    normalize_blocks: bool = False,
    kmeans_iters: int = 10,
    distance: str = "euclidean",
    warm_start: bool = True,
    buffer_size: int = 0,
    batch_size: int | None = None,
    decay: float = 0.9,
    anchor: float = 0.5,
    max_ratio: float = 4.0,
    reseed_fraction: float = 0.05,
    ema: float = 0.0,
    weight_floor: float = 0.0,
    lambda_graph: float = 0.0,
    temperature: float = 1.0,
    lambda_dir: float = 1.0,
    lambda_align: float = 1.0,
    eps: float = 1e-6,
    solver_steps: int = 200,
    solver_backend: str = "auto",
    block_budget: int = DEFAULT_BLOCK_BUDGET,
) -> optax.GradientTransformationExtraArgs:
  """DoGraph: reduce per-sample gradients to a domain-weighted update.

  Two ways to form the model-centric domains (``docs/method.md``):

  * ``domains="persistent"`` (default): ``M`` centroids persist across steps
    and are refined by every batch (mini-batch K-means with forgetting factor
    ``decay``, :func:`~dograph_jax.clustering.streaming_kmeans_update`; the
    first batch is clustered by k-means++ and Lloyd); each sample joins its
    nearest centroid. The objective reads running statistics (decayed sums
    over recent steps, :func:`~dograph_jax.domains.running_domain_stats`),
    the objective is written against the running frequencies ``p``
    (``prior``), its optimum ``w*`` is anchored to ``p``
    (:func:`anchored_weights`) and the update uses frequency-relative
    coefficients ``a_i ∝ min(w_{c(i)} / p_{c(i)}, max_ratio)``
    (:func:`frequency_coefficients`): with ``w = p`` it is the plain batch
    mean, so DoGraph departs from the natural mixture only as far as its
    weights depart from the domains' frequencies.
  * ``domains="batch"``: the paper's Appendix A.3 taken literally: K-means of
    each mini-batch (warm-started, optionally over a rolling ``buffer_size``
    buffer), statistics of this batch, ``a_i = w_{c(i)} / |C_{c(i)}|``
    (:func:`sample_coefficients`). With ``distance="euclidean"`` this is the
    behaviour of the project's first versions.

  Args:
    num_domains: ``M``, number of model-centric domains (paper: 11).
    sketch_dim: ``K``, dimension of the gradient sketches. The default, 256,
      suits the dense ``"gaussian"`` map; the ``"kronecker"`` map and the
      factored engine need about 1024 for the same distortion
      (``benchmarks/sketch_distortion.py``).
    objective: ``"uncertainty"`` (default), ``"variance"``, ``"robust"``
      (needs ``losses``) or ``"alignment"``; see :mod:`dograph_jax.objectives`.
    domains: ``"persistent"`` or ``"batch"`` (above).
    prior: persistent mode: the reference distribution the objective is
      written against (:mod:`dograph_jax.objectives`, "Priors"):
      ``"frequency"`` (the running frequencies ``p``: e.g. ``"robust"``
      becomes ``w ∝ p exp(L / temperature)``, so ``w / p`` is a pure tilt by
      the domain's loss) or ``"uniform"`` (the paper's ``u``, which also
      equalises the domains' shares of the update).
    seed: fixes the projection ``R`` (for the whole run) and the seeding keys.
    sketch_kind: ``"gaussian"`` or ``"kronecker"`` (:func:`~dograph_jax.projection.sketch`).
    normalize_blocks: scale each parameter block's sketch of each sample to
      unit norm before summing (:func:`~dograph_jax.projection.sketch`), so
      that every block counts equally in the clustering and the statistics.
      Applies when the transform sketches per-sample gradients itself; a
      caller that passes :class:`~dograph_jax.FactoredGrads` sketches with
      ``factored_grads(..., normalize_blocks=...)``.
    kmeans_iters: Lloyd iterations (per step in batch mode; on the first
      batch in persistent mode).
    distance: ``"euclidean"`` (default) or ``"cosine"`` (spherical K-means
      on the sketch directions). Chosen by the study in
      ``experiments/results/dograph_domains``: with persistent domains
      Euclidean K-means no longer makes singletons (the running masses and
      re-seeding keep every centroid populated) and measured better.
    warm_start: batch mode: start Lloyd from the previous step's centroids
      (after the first step), which also keeps domain ``j`` the same domain
      across steps and so makes the EMA meaningful.
    buffer_size: batch mode: ``S``; if > 0, cluster on this batch plus the
      ``S`` most recent sketches of earlier batches; statistics and the
      update use this batch only.
    batch_size: ``B``; if given, ``state.assignments`` and
      ``state.coefficients`` hold the last step's per-sample values (their
      shape must be known at ``init``; otherwise they are None) and
      ``update`` checks ``B``.
    decay: persistent mode: forgetting factor of the centroid masses and the
      running statistics, in ``(0, 1]`` (an effective window of about ``1 /
      (1 - decay)`` steps).
    anchor: persistent mode: ``0`` keeps the natural mixture, ``1`` applies
      the objective's optimum; in between, the geometric interpolation.
      Default 0.5: of the settings measured it is the one that held on both
      study corpora (``experiments/results/dograph_domains``).
    max_ratio: persistent mode: cap on ``w_j / p_j``, the up-weighting of a
      domain relative to its frequency.
    reseed_fraction: persistent mode: a centroid whose mass falls below this
      fraction of the mean mass is re-seeded (dead-cluster policy of
      :func:`~dograph_jax.clustering.streaming_kmeans_update`).
    ema: weight of the previous smoothed weights (0 = no smoothing).
    weight_floor: minimum weight of every domain present in the batch
      (clipped to ``1 / present``).
    lambda_graph, temperature, lambda_dir, lambda_align, eps: objective
      hyperparameters (:func:`~dograph_jax.objectives.solve_weights`).
    solver_steps: iteration budget of the iterative weight solvers.
    solver_backend: ``"auto"``, ``"jaxopt"`` or ``"optax"``.
    block_budget: largest random block of the dense sketch.

  Returns:
    An ``optax.GradientTransformationExtraArgs``. ``update(updates, state,
    params=None, *, losses=None)`` takes per-sample gradients (every leaf
    ``(B, *param.shape)``) and optional per-sample ``losses (B,)``, and
    returns a pytree shaped like ``params``. Hyperparameters that do not
    change shapes (``decay``, ``anchor``, ``max_ratio``, ``reseed_fraction``,
    ``ema``, ``weight_floor``, ``lambda_*``, ``temperature``, ``eps``) may be
    traced: wrap with ``optax.inject_hyperparams(dograph_transform,
    static_args=STATIC_ARGS)`` to change them without recompiling.

  References:
    ``docs/method.md``; "Rethinking Data Mixing from the Perspective of Large
    Language Models" (arXiv 2604.07963), Algorithm 1 and Appendix A.3/A.6;
    Sculley, "Web-scale k-means clustering" (WWW 2010).
  """
  if not isinstance(num_domains, int) or num_domains < 1:
    raise ValueError(f"dograph_transform: num_domains must be an int >= 1, got {num_domains!r}.")
  if not isinstance(sketch_dim, int) or sketch_dim < 1:
    raise ValueError(f"dograph_transform: sketch_dim must be an int >= 1, got {sketch_dim!r}.")
  if objective not in objectives.OBJECTIVES:
    raise ValueError(f"dograph_transform: unknown objective {objective!r}; "
                     f"choose one of {objectives.OBJECTIVES}.")
  if domains not in ("persistent", "batch"):
    raise ValueError(f"dograph_transform: domains must be 'persistent' or 'batch', "
                     f"got {domains!r}.")
  if distance not in ("euclidean", "cosine"):
    raise ValueError(f"dograph_transform: unknown distance {distance!r}.")
  if prior not in ("frequency", "uniform"):
    raise ValueError(f"dograph_transform: prior must be 'frequency' or 'uniform', "
                     f"got {prior!r}.")
  if sketch_kind not in ("gaussian", "kronecker"):
    raise ValueError(f"dograph_transform: unknown sketch_kind {sketch_kind!r}.")
  if buffer_size < 0:
    raise ValueError(f"dograph_transform: buffer_size must be >= 0, got {buffer_size}.")
  if buffer_size and domains == "persistent":
    raise ValueError("dograph_transform: buffer_size is an option of domains='batch' "
                     "(persistent domains already pool every batch through their "
                     "running sums); use one or the other.")
  if isinstance(ema, (int, float)) and not 0.0 <= ema < 1.0:
    raise ValueError(f"dograph_transform: ema must be in [0, 1), got {ema}.")
  if isinstance(decay, (int, float)) and not 0.0 < decay <= 1.0:
    raise ValueError(f"dograph_transform: decay must be in (0, 1], got {decay}.")
  if isinstance(anchor, (int, float)) and not 0.0 <= anchor <= 1.0:
    raise ValueError(f"dograph_transform: anchor must be in [0, 1], got {anchor}.")
  if isinstance(max_ratio, (int, float)) and not max_ratio >= 1.0:
    raise ValueError(f"dograph_transform: max_ratio must be >= 1, got {max_ratio}.")
  if isinstance(reseed_fraction, (int, float)) and not 0.0 <= reseed_fraction < 1.0:
    raise ValueError(f"dograph_transform: reseed_fraction must be in [0, 1), "
                     f"got {reseed_fraction}.")
  if isinstance(weight_floor, (int, float)) and not 0.0 <= weight_floor <= 1.0 / num_domains:
    raise ValueError(f"dograph_transform: weight_floor must be in [0, 1/num_domains], "
                     f"got {weight_floor}.")

  m, k = num_domains, sketch_dim
  persistent = domains == "persistent"
  base_key = jax.random.PRNGKey(seed)
  proj_key = projection_key(seed)
  # Optional fields are None rather than zero-sized arrays: checkpointers
  # (orbax) refuse to save arrays of size 0.
  has_buffer, has_batch = buffer_size > 0, batch_size is not None

  def init_fn(params):
    del params
    return DoGraphState(
        count=jnp.zeros((), jnp.int32),
        key=jax.random.fold_in(base_key, 1),
        centroids=jnp.zeros((m, k), jnp.float32),
        weights=jnp.full((m,), 1.0 / m, jnp.float32),
        buffer=jnp.zeros((buffer_size, k), jnp.float32) if has_buffer else None,
        buffer_valid=jnp.zeros((buffer_size,), bool) if has_buffer else None,
        raw_weights=jnp.full((m,), 1.0 / m, jnp.float32),
        applied_weights=jnp.full((m,), 1.0 / m, jnp.float32),
        counts=jnp.zeros((m,), jnp.int32),
        assignments=jnp.zeros((batch_size,), jnp.int32) if has_batch else None,
        coefficients=jnp.zeros((batch_size,), jnp.float32) if has_batch else None,
        kept=jnp.zeros((batch_size,), bool) if has_batch else None,
        nonfinite=jnp.zeros((), jnp.int32),
        nonfinite_total=jnp.zeros((), jnp.int32),
        mass=jnp.zeros((m,), jnp.float32) if persistent else None,
        sums=zero_running_sums(m, k) if persistent else None,
        frequencies=jnp.zeros((m,), jnp.float32) if persistent else None,
        reseeded=jnp.zeros((), jnp.int32) if persistent else None)

  def solve(stats, prior_M=None):
    return objectives.solve_weights(
        stats, objective, lambda_graph=lambda_graph, temperature=temperature,
        lambda_dir=lambda_dir, lambda_align=lambda_align, eps=eps,
        num_steps=solver_steps, backend=solver_backend, prior=prior_M)

  def batch_domains(state, z_BxK, finite_B, losses, seed_key):
    """Literal mode: cluster this batch; coefficients ``w_j / |C_j|``."""
    if has_buffer:
      points = jnp.concatenate([state.buffer, z_BxK], 0)
      mask = jnp.concatenate([state.buffer_valid, finite_B], 0)
    else:
      points, mask = z_BxK, finite_B
    # Spherical K-means seeds on the directions, as kmeans() itself does.
    fresh = kmeans_plusplus(unit_rows(points) if distance == "cosine" else points, m,
                            seed_key, mask)
    init_c = (jnp.where(state.count > 0, state.centroids, fresh)
              if warm_start else fresh)
    clusters = kmeans(points, m, seed_key, iters=kmeans_iters,
                      init_centroids=init_c, distance=distance,
                      sample_mask=mask)
    assign_B = clusters.assignments[buffer_size:]
    stats = domain_stats(z_BxK, assign_B, m, losses, sample_mask=finite_B)
    raw = solve(stats)
    # Huge but finite sketches can overflow the statistics: never NaN weights.
    raw = jnp.where(jnp.all(jnp.isfinite(raw)), raw, objectives.uniform_on(stats.present))
    smoothed, applied = _smooth(raw, state.weights, state.count,
                                stats.counts > 0, ema, weight_floor)
    a_B = sample_coefficients(applied, assign_B, stats.counts, finite_B)
    fields = dict(
        centroids=clusters.centroids,
        buffer=points[points.shape[0] - buffer_size:] if has_buffer else None,
        buffer_valid=mask[mask.shape[0] - buffer_size:] if has_buffer else None)
    return assign_B, stats.counts, raw, smoothed, applied, a_B, fields

  def persistent_domains(state, z_BxK, finite_B, losses, seed_key):
    """Persistent centroids, running statistics, frequency-relative a_i."""
    first = state.count == 0
    # The first batch founds the centroids (k-means++ then Lloyd); later
    # batches only refine them.
    start_c = jax.lax.cond(
        first,
        lambda: kmeans(z_BxK, m, seed_key, iters=kmeans_iters, distance=distance,
                       sample_mask=finite_B).centroids,
        lambda: state.centroids)
    assign_B, nearest_B = assign(z_BxK, start_c, distance)
    stream = streaming_kmeans_update(
        StreamingKMeans(start_c, state.mass, jnp.zeros((m,), bool)), z_BxK,
        assign_B, nearest_B, decay=decay, reseed_fraction=reseed_fraction,
        distance=distance, sample_mask=finite_B)
    sums = update_running_sums(state.sums, z_BxK, assign_B, losses, decay=decay,
                               sample_mask=finite_B)
    stats = running_domain_stats(sums)
    total = jnp.sum(stats.counts)
    freq = stats.counts / jnp.where(total > 0, total, 1.0)
    raw = solve(stats, freq if prior == "frequency" else None)
    raw = jnp.where(jnp.all(jnp.isfinite(raw)), raw, freq)
    target = anchored_weights(raw, freq, anchor)
    smoothed, applied = _smooth(target, state.weights, state.count, freq > 0,
                                ema, weight_floor)
    a_B = frequency_coefficients(applied, freq, assign_B, finite_B, max_ratio)
    counts_B = jnp.sum(jax.nn.one_hot(assign_B, m, dtype=jnp.int32)
                       * finite_B[:, None], 0)
    # A re-seeded centroid starts a new domain: its running sums restart at
    # the next step (this step still used them).
    fresh = stream.reseeded
    sums = jax.tree.map(
        lambda s: jnp.where(fresh.reshape((m,) + (1,) * (s.ndim - 1)), 0.0, s), sums)
    fields = dict(centroids=stream.centroids, mass=stream.mass, sums=sums,
                  frequencies=freq.astype(jnp.float32),
                  reseeded=state.reseeded + jnp.sum(fresh).astype(jnp.int32))
    return assign_B, counts_B, raw, smoothed, applied, a_B, fields

  def update_fn(updates, state, params=None, *, losses=None, **extra_args):
    del extra_args
    fast = isinstance(updates, FactoredGrads)
    if fast:
      b = updates.sketches.shape[0]
      if updates.sketches.shape[1] != k:
        raise ValueError(f"dograph_transform: FactoredGrads sketches have dimension "
                         f"{updates.sketches.shape[1]}, the transform sketch_dim={k}.")
      if batch_size is not None and b != batch_size:
        raise ValueError(f"dograph_transform was built with batch_size={batch_size} "
                         f"but got sketches for B={b}.")
      losses = updates.losses if losses is None else losses
    else:
      b = _check_per_sample(updates, params, batch_size)
    if objective == "robust" and losses is None:
      raise ValueError("dograph_transform(objective='robust') needs per-sample "
                       "`losses=` (shape (B,)) in update().")
    if losses is not None:
      losses = jnp.asarray(losses)
      if losses.shape != (b,):
        raise ValueError(f"dograph_transform: losses must have shape ({b},), "
                         f"got {losses.shape}.")
      losses = losses.astype(jnp.float32)

    if fast:
      finite_B = usable_sketches(updates.sketches)
      if losses is not None:
        finite_B = finite_B & jnp.isfinite(losses)
      z_BxK = jnp.where(finite_B[:, None], updates.sketches, 0.0)
    else:
      finite_B = _finite_mask(updates, losses)
      zero_dropped = lambda keep_B: jax.tree.map(
          lambda g: jnp.where(keep_B.reshape((b,) + (1,) * (g.ndim - 1)), g, 0), updates)
      z_BxK = sketch(zero_dropped(finite_B), proj_key, k, kind=sketch_kind,
                     block_budget=block_budget, normalize_blocks=normalize_blocks)
      # A finite gradient can still have a sketch too large for the statistics.
      finite_B = finite_B & usable_sketches(z_BxK)
      z_BxK = jnp.where(finite_B[:, None], z_BxK, 0.0)
      clean = zero_dropped(finite_B)
    if losses is not None:
      losses = jnp.where(finite_B, losses, 0.0)

    key, seed_key = jax.random.split(state.key)
    form = persistent_domains if persistent else batch_domains
    assign_B, counts_M, raw, smoothed, applied, a_B, fields = form(
        state, z_BxK, finite_B, losses, seed_key)
    if fast:
      # finite_B tells the map which samples to leave out (their stored
      # tensors may hold NaN); it skips that work when every sample is finite.
      out = updates.weighted_grad(a_B, finite_B)
      if updates.second_backward:
        # A second backward cannot leave a non-finite sample out (0 * NaN is
        # NaN in its residuals): such a step is skipped (zero update) and
        # counted in `nonfinite`.
        ok = jnp.all(finite_B)
        out = jax.tree.map(lambda g: jnp.where(ok, g, jnp.zeros_like(g)), out)
    else:
      # sum_i a_i g_i, accumulated in float32 whatever the gradient dtype.
      out = jax.tree.map(
          lambda g: jnp.tensordot(a_B.astype(g.dtype), g, axes=1,
                                  preferred_element_type=jnp.float32).astype(g.dtype),
          clean)

    dropped = jnp.sum(~finite_B).astype(jnp.int32)
    new_state = state._replace(
        count=optax.safe_increment(state.count),
        key=key,
        weights=smoothed.astype(jnp.float32),
        raw_weights=raw.astype(jnp.float32),
        applied_weights=applied.astype(jnp.float32),
        counts=counts_M.astype(jnp.int32),
        assignments=assign_B if has_batch else None,
        coefficients=a_B if has_batch else None,
        kept=finite_B if has_batch else None,
        nonfinite=dropped,
        nonfinite_total=state.nonfinite_total + dropped,
        **fields)
    return out, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
