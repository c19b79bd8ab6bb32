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

Each stage is a module of :mod:`dograph_jax.transform_stages` (options,
prepare, domain_modes, weights, coefficients); this module composes them and
keeps the public names.

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
the reference path with ``sketch_kind="kronecker"``. Or ``updates`` may be a
:class:`~dograph_jax.factored.LaggedGrads` (micro-batches in one pass,
persistent domains only): the transform hands it the coefficients of the
state before this batch (:func:`~dograph_jax.transform_stages.domain_modes.persistent_lagged_ratios`),
the engine sums the update slice by slice, and the domains and weights then
move on with the whole batch's sketches as above (docs/method.md §7b (c)).

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

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.tree_util import GetAttrKey

from dograph_jax.projection import DEFAULT_BLOCK_BUDGET
from dograph_jax.transform_stages.coefficients import (frequency_coefficients,
                                                       sample_coefficients)
from dograph_jax.factored import FactoredGrads, LaggedGrads
from dograph_jax.transform_stages.domain_modes import (BatchDomains, PersistentDomains,
                                                       domain_mode, persistent_lagged_ratios)
from dograph_jax.transform_stages.options import STATIC_ARGS, DoGraphOptions, default_sketch_dim
from dograph_jax.transform_stages.prepare import (MAX_SKETCH_ENTRY, prepare, projection_key,
                                                  usable_sketches)
from dograph_jax.transform_stages.weights import anchored_weights

__all__ = ["MAX_SKETCH_ENTRY", "STATIC_ARGS", "BatchDomains", "DoGraphOptions", "DoGraphState",
           "PersistentDomains", "anchored_weights", "dograph_transform",
           "frequency_coefficients", "projection_key", "sample_coefficients",
           "usable_sketches"]


class DoGraphState(NamedTuple):
  """State of :func:`dograph_transform`: diagnostics plus the domains' own state.

  ``domains`` is :class:`~dograph_jax.transform_stages.domain_modes.PersistentDomains`
  or :class:`~dograph_jax.transform_stages.domain_modes.BatchDomains`; its
  fields are also readable here (``state.centroids``, ``state.frequencies``,
  ...), None when the mode has no such field (``frequencies`` with
  ``domains="batch"``, ``buffer`` with persistent domains).

  As a pytree the state is flat: its children are named and ordered as the
  fields of the single flat state of earlier versions (``.count``, ``.key``,
  ``.centroids``, ..., ``.buffer``, ``.sums.mass``, ...), not
  ``.domains.…``, so that key paths (sharding rules, leaf names in
  checkpoints) do not depend on how the state is grouped in Python. Fields
  the mode lacks are not children (earlier versions had None leaves there),
  so checkpoints written before this layout do not restore into it.
  """
  count: jax.Array            # () int32, updates taken
  key: jax.Array              # (2,) uint32, PRNG key for k-means++ seeding
  weights: jax.Array          # (M,) float32, smoothed (EMA) domain weights
  raw_weights: jax.Array      # (M,) float32, last solver output
  applied_weights: jax.Array  # (M,) float32, last weights used in the update
  counts: jax.Array           # (M,) int32, last batch's kept samples per domain
  assignments: jax.Array | None   # (B,) int32, last domain of each sample; None if batch_size is None
  coefficients: jax.Array | None  # (B,) float32, last a_i (applied if in_batch); None if batch_size is None
  kept: jax.Array | None      # (B,) bool, samples the last update used; None if batch_size is None
  nonfinite: jax.Array        # () int32, samples dropped in the last update
  nonfinite_total: jax.Array  # () int32, samples dropped since init
  domains: PersistentDomains | BatchDomains  # the mode's own state

  def _domain_field(self, name: str):
    return getattr(self.domains, name, None)

  @property
  def centroids(self) -> jax.Array:
    """(M, K) float32, the domains' centroids after the last step."""
    return self.domains.centroids

  @property
  def frequencies(self) -> jax.Array | None:
    """(M,) float32, last running frequencies ``p_j``; None with ``domains="batch"``."""
    return self._domain_field("frequencies")

  @property
  def mass(self) -> jax.Array | None:
    """(M,) float32, centroids' decayed sample mass; None with ``domains="batch"``."""
    return self._domain_field("mass")

  @property
  def sums(self):
    """Decayed per-domain sums (:class:`~dograph_jax.domains.RunningSums`);
    None with ``domains="batch"``."""
    return self._domain_field("sums")

  @property
  def reseeded(self) -> jax.Array | None:
    """() int32, clusters re-seeded since init; None with ``domains="batch"``."""
    return self._domain_field("reseeded")

  @property
  def buffer(self) -> jax.Array | None:
    """(S, K) float32, recent sketches; None without a buffer (and with persistent domains)."""
    return self._domain_field("buffer")

  @property
  def buffer_valid(self) -> jax.Array | None:
    """(S,) bool, buffer rows holding a sketch; None without a buffer."""
    return self._domain_field("buffer_valid")


# Pytree layout of DoGraphState: the fields of the single flat state of
# earlier versions, by name and in its order, each read from the state itself
# or from its `domains`. A name the mode lacks is left out: it must not be a
# None child, because a tree map that treats None as a leaf (orbax does) puts
# a value there that the state could not hold.
_FLAT_LAYOUT = ("count", "key", "centroids", "weights", "buffer", "buffer_valid", "raw_weights",
                "applied_weights", "counts", "assignments", "coefficients", "kept", "nonfinite",
                "nonfinite_total", "mass", "sums", "frequencies", "reseeded")
_COMMON = tuple(f for f in DoGraphState._fields if f != "domains")
assert set(_COMMON) <= set(_FLAT_LAYOUT)
assert all(set(t._fields) <= set(_FLAT_LAYOUT) for t in (PersistentDomains, BatchDomains))
assert not any(set(_COMMON) & set(t._fields) for t in (PersistentDomains, BatchDomains))


def _layout(domains_type) -> tuple[str, ...]:
  return tuple(n for n in _FLAT_LAYOUT if n in _COMMON or n in domains_type._fields)


def _flatten_state(state: DoGraphState):
  source = lambda n: state if n in _COMMON else state.domains
  children = [(GetAttrKey(n), getattr(source(n), n)) for n in _layout(type(state.domains))]
  return children, type(state.domains)


def _unflatten_state(domains_type, children) -> DoGraphState:
  values = dict(zip(_layout(domains_type), children))
  return DoGraphState(**{n: values[n] for n in _COMMON},
                      domains=domains_type(**{n: values[n] for n in domains_type._fields}))


jax.tree_util.register_pytree_with_keys(DoGraphState, _flatten_state, _unflatten_state)


def _no_map(a_B, keep_B=None):
  raise AssertionError("a LaggedGrads step has no update map: its update is already summed")


def dograph_transform(
    num_domains: int = 11,
    sketch_dim: int | None = None,
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
    in_batch: bool = True,
    coefficients: str = "frequency",
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
    sketch_dim: ``K``, dimension of the gradient sketches. Default (None):
      the dimension of equal distortion for ``sketch_kind``
      (:func:`~dograph_jax.transform_stages.options.default_sketch_dim`: 256
      for the dense ``"gaussian"`` map, 1024 for ``"kronecker"``, which needs
      about 4x the dimension; ``benchmarks/sketch_distortion.py``). With
      :class:`~dograph_jax.FactoredGrads` input pass the engine's ``K``.
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
    in_batch: True (the paper): the update is ``sum_i a_i g_i``. False: the
      update is the plain mean of the kept samples' gradients, while the
      domains, weights and ``a_i`` are computed (and kept in the state) as
      before -- for a trainer that applies the weights by *sampling* its
      batches with them (``--apply_weights sample``), where weighting the
      batch as well would count them twice.
    coefficients: persistent mode: how the weights become the ``a_i``.
      ``"frequency"`` (default): ``a_i ∝ min(w_{c(i)} / p_{c(i)},
      max_ratio)`` (:func:`frequency_coefficients`; domain ``j``'s share of
      the update is ``w_j`` in expectation over batches). ``"post_stratified"``:
      the share exactly, ``a_i = s_{c(i)} / n_{c(i)}`` with ``s_j ∝ p_j
      min(w_j / p_j, max_ratio)`` over the domains present
      (:func:`~dograph_jax.transform_stages.coefficients.post_stratified_coefficients`;
      with ``w = p`` the post-stratified estimator of the mean gradient).
      Needs the whole batch's domains, so not with :class:`LaggedGrads`.
      Measured worse than the default (docs/method.md, "Post-stratified
      coefficients").

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
  if sketch_dim is None:
    sketch_dim = default_sketch_dim(sketch_kind)
  opts = DoGraphOptions(**locals())  # every argument by name; validated here
  mode = domain_mode(opts)
  m = opts.num_domains
  base_key = jax.random.PRNGKey(seed)
  proj_key = projection_key(seed)
  # Per-sample fields are None rather than zero-sized arrays without a batch
  # size: checkpointers (orbax) refuse to save arrays of size 0.
  per_sample = lambda dtype: jnp.zeros((batch_size,), dtype) if opts.has_batch else None

  def init_fn(params):
    del params
    # One array per field: a trainer donates the state, and one buffer cannot
    # be donated twice.
    uniform = lambda: jnp.full((m,), 1.0 / m, jnp.float32)
    return DoGraphState(
        count=jnp.zeros((), jnp.int32), key=jax.random.fold_in(base_key, 1),
        weights=uniform(), raw_weights=uniform(), applied_weights=uniform(),
        counts=jnp.zeros((m,), jnp.int32), assignments=per_sample(jnp.int32),
        coefficients=per_sample(jnp.float32), kept=per_sample(bool),
        nonfinite=jnp.zeros((), jnp.int32), nonfinite_total=jnp.zeros((), jnp.int32),
        domains=mode.init(opts))

  def update_fn(updates, state, params=None, *, losses=None, **extra_args):
    del extra_args
    lag = None
    if isinstance(updates, LaggedGrads):
      # One pass over micro-batches: each one's rows are weighted as they
      # come, from the state before this batch; the domains and weights
      # below then move on with the whole batch's sketches.
      if not opts.persistent:
        raise ValueError("dograph_transform: LaggedGrads (one-pass micro-batches) needs "
                         "domains='persistent': per-batch domains exist only once the "
                         "whole batch is clustered.")
      if losses is not None:
        raise ValueError("dograph_transform: LaggedGrads carries its own losses; do not "
                         "pass losses= with it.")
      if opts.coefficients == "post_stratified":
        raise ValueError("dograph_transform: coefficients='post_stratified' needs this "
                         "batch's domain counts before the update, which LaggedGrads "
                         "(one-pass micro-batches) weights without; use "
                         "coefficients='frequency' or a two-pass update.")

      def ratio_fn(z_bxK, losses_b):
        kept_b = usable_sketches(z_bxK) & jnp.isfinite(losses_b)
        if not in_batch:  # the sampler applies the weights: the plain mean
          return kept_b.astype(jnp.float32), kept_b
        return persistent_lagged_ratios(state.domains, state.applied_weights, state.count,
                                        z_bxK, kept_b, opts), kept_b
      lag = updates.run(ratio_fn)
      updates = FactoredGrads(lag.losses, lag.sketches, _no_map, False)
    # Sketches, kept samples (non-finite policy), losses, and a_B -> sum_i a_i g_i.
    x = prepare(updates, params, losses, opts, proj_key)
    key, seed_key = jax.random.split(state.key)
    # This step's domains (the mode's state moves on), their weights, the a_i.
    domains, part = mode.step(state.domains, x.z, x.kept, x.losses, state.count, seed_key, opts)
    w = mode.weights(domains, part, state.weights, state.count, opts)
    a_B = mode.coefficients(domains, part, w.applied, x.kept, opts)
    if lag is not None:  # already summed: normalise (sum_i a_i = 1, as below)
      total = jnp.sum(lag.ratios)
      scale = jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)
      out = jax.tree.map(lambda g: g * scale, lag.grad_sum)
      if params is not None:
        out = jax.tree.map(lambda g, p: g.astype(p.dtype), out, params)
      if in_batch:  # what was applied; all 0 (a zero update) if every ratio was 0
        a_B = lag.ratios * scale
    elif in_batch:
      out = x.reduce(a_B)
    else:  # the weights act through the sampler: the plain mean of the kept samples
      kept = x.kept.astype(jnp.float32)
      out = x.reduce(kept / jnp.maximum(jnp.sum(kept), 1.0))
    dropped = jnp.sum(~x.kept).astype(jnp.int32)
    new_state = DoGraphState(
        count=optax.safe_increment(state.count), key=key,
        weights=w.smoothed.astype(jnp.float32), raw_weights=w.raw.astype(jnp.float32),
        applied_weights=w.applied.astype(jnp.float32), counts=part.counts,
        assignments=part.assignments if opts.has_batch else None,
        coefficients=a_B if opts.has_batch else None,
        kept=x.kept if opts.has_batch else None,
        nonfinite=dropped, nonfinite_total=state.nonfinite_total + dropped,
        domains=domains)
    return out, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
