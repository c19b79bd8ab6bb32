"""Aioli: estimate the linear mixing law online, then exponentiated gradient.

Aioli (Chen et al., ICLR 2025) splits training into rounds of ``round_steps``
steps. Each round starts with ``LearnParams``: ``sweep_rounds`` sweeps over the
``D`` domains in a random order, training ``sweep_steps`` steps on a mixture
skewed towards one domain ``j``,

.. math:: m^{(j)} = s\\,e_j + \\tfrac{1-s}{D-1}(\\mathbf 1 - e_j),

and recording the drop of every domain's held-out loss over that sub-round in
column ``j`` of a ``(D, D)`` matrix ``G``. Under Aioli's linear mixing law the
drop of domain ``i``'s loss under mixture ``m`` is ``sum_l A[i, l] m_l``, so
``G[i] = M A[i]`` with ``M`` the matrix whose row ``j`` is ``m^{(j)}``; the
repository solves this system per row. ``M = a I + c 11^T`` with
``c = (1-s)/(D-1)``, ``a = s - c`` and ``a + D c = 1``, hence in closed form

.. math:: A = \\big(\\bar G - c\\,\\bar G \\mathbf 1 \\mathbf 1^T\\big) / a,
   \\qquad \\bar G = G / \\text{sweep\\_rounds}.

``A`` is then shifted to be non-negative and scaled to sum to 1
(``aioli_normalize_A``), smoothed across rounds (``ema``) and turned into the
proportions by exponentiated gradient on the column sums (the total effect of
training on ``j`` on all domains' losses):

.. math:: p_j \\propto \\exp\\big(\\eta \\textstyle\\sum_i \\bar A_{ij}\\big)
   \\quad\\text{(with ema)}, \\qquad
   p_j \\propto p^{\\text{prev}}_j \\exp\\big(\\eta \\textstyle\\sum_i A_{ij}\\big)
   \\quad\\text{(without)}.

The rest of the round (``round_steps - sweep_rounds * D * sweep_steps``
steps) trains at ``p``.

This module is that algorithm as a fixed-shape state machine driven by
``inputs.step``: the phase (prior / sweep / train) and the sub-round follow
from the step number with ``jnp.where``, never from Python control flow, so
one trace serves every step and every numeric hyperparameter may be a traced
scalar.

**Sampled (the paper's form) or in-batch.** The repository re-samples its
training data with the mixture (``set_proportions``); so does the trainer
by default (``--apply_weights paper``, ``form="sample"``): before step ``t``
it asks ``proportions(state, t)`` -- the prior, the sweep's skewed mixture
or ``p``, by the phase of step ``t`` -- and draws the batch with it
(:class:`~dograph_jax.data.DynamicMixIterator`), stepping on the batch
mean. One lag differs from the repository: the step that ends a sweep
trains on the old ``p`` (its new ``p`` needs that step's probe losses) and
the next step on the new one. ``--apply_weights reweight`` applies the
mixture as in-batch loss weights instead
(:func:`~dograph_jax.mixing.base.domain_to_sample_weights`,
``w_i = m_{d(i)} / n_{d(i)}``): the weighted batch loss is
``sum_d m_d mean_{i in d} l_i``, whose expectation (given every domain is in
the batch) is ``sum_d m_d E[l | d]``, the expected loss of a batch *sampled*
with mixture ``m``. Both forms follow the same expected gradient; they
differ in batch noise (in-batch, a domain weighted ``m_d`` is still
represented by its ``n_d`` sampled rows, and one favoured in a sweep puts
most of the gradient on those few rows), and in-batch a domain absent from
a batch cannot be weighted at all (its share goes to the present domains).

**Probe losses.** ``inputs.probe_losses`` are the held-out per-domain losses
of the parameters *before* this step's update; only those at sub-round
boundaries (local step ``s`` with ``s % sweep_steps == 0``,
``s <= sweep_rounds * D * sweep_steps``) are read.

References:
  Chen, Hu, Lourie, Cho, Re. "Aioli: A Unified Optimization Framework for
  Language Model Data Mixing", ICLR 2025, arXiv:2411.05735.
  https://github.com/HazyResearch/aioli: ``trainer/aioli_trainer.py``
  (``learn_params_subroutine``, ``train``), defaults from
  ``scripts/full/aioli/run.sh`` (7 SlimPajama domains).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dograph_jax.mixing.base import MixingInputs, OnlineMixer, domain_to_sample_weights

# Loss drops are clipped to this magnitude (float32 max / 3400) so that the sums over sub-rounds,
# sweeps and domains stay finite in float32 even for absurd (or inf) losses.
_MAX_DROP = 1e35


class AioliState(NamedTuple):
  """State of :func:`aioli`; ``D`` domains."""
  weights: jax.Array        # (D,) float32, current proportions p (logged; prior before the first estimate)
  weights_sum: jax.Array    # (D,) float32, sum of `weights` over updates
  count: jax.Array          # () int32, number of updates
  mixture: jax.Array        # (D,) float32, domain mixture applied at the last step (skewed in a sweep)
  skew_domain: jax.Array    # () int32, domain the last step was skewed towards; -1 outside sweeps
  prev_probe: jax.Array     # (D,) float32, probe losses at the start of the current sub-round
  drops: jax.Array          # (D, D) float32, G: summed loss drops, column j = sub-rounds skewed to j
  graph: jax.Array          # (D, D) float32, A of the last round (solved, before normalisation)
  ema_graph: jax.Array      # (D, D) float32, normalised A smoothed over rounds (what sets p with ema)
  logits: jax.Array         # (D,) float32, log p up to a constant
  num_estimates: jax.Array  # () int32, rounds whose A has been estimated


def _is_static_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def skewed_mixture(num_domains: int, domain: jax.Array, skew) -> jax.Array:
  """``(D,)`` mixture with ``skew`` on ``domain`` and ``(1 - skew)/(D - 1)``
  on each other domain (the repository's smoothed one-hot vector)."""
  rest = (1.0 - skew) / (num_domains - 1)
  onehot = jax.nn.one_hot(domain, num_domains, dtype=jnp.float32)
  return (skew * onehot + rest * (1.0 - onehot)).astype(jnp.float32)


def solve_mixing_law(drops_DxD: jax.Array, skew, *, diagonal: bool = False) -> jax.Array:
  """The mixing-law parameters ``A`` from the averaged loss drops ``G``.

  Row ``i`` of ``G`` holds the drops of domain ``i``'s loss in the sub-rounds
  skewed towards each domain; ``G[i] = M A[i]`` with ``M`` the matrix of the
  skewed mixtures. ``M = a I + c 11^T`` (``c = (1-s)/(D-1)``, ``a = s - c``,
  ``a + D c = 1``), so ``M^{-1} = (I - c 11^T) / a``.

  Args:
    drops_DxD: ``(D, D)`` averaged loss drops ``G``.
    skew: weight ``s`` of the favoured domain, in ``(1/D, 1]``.
    diagonal: the ``aioli_diagonal`` ablation: ``A = diag(G_ii / s)``.

  Returns:
    ``(D, D)`` float32 ``A``.
  """
  num_domains = drops_DxD.shape[0]
  if diagonal:
    return jnp.diag(jnp.diagonal(drops_DxD) / skew)
  rest = (1.0 - skew) / (num_domains - 1)
  gap = skew - rest
  # A skew of exactly 1/D makes M singular (every sub-round is uniform);
  # the factory rejects it when static, and a traced one must not give NaN.
  gap = jnp.where(jnp.abs(gap) > 1e-6, gap, 1.0)
  return (drops_DxD - rest * jnp.sum(drops_DxD, axis=1, keepdims=True)) / gap


def normalize_graph(graph_DxD: jax.Array) -> jax.Array:
  """``aioli_normalize_A``: shift so the smallest entry is 0 (only when it is
  negative), then scale to sum 1; all zeros when there is no signal."""
  # Both steps are invariant to a positive rescaling of A, so rescale by the
  # largest magnitude first: no overflow from huge losses.
  scale = jnp.max(jnp.abs(graph_DxD))
  graph = graph_DxD / jnp.where(scale > 0, scale, 1.0)
  graph = graph - jnp.minimum(jnp.min(graph), 0.0)
  total = jnp.sum(graph)
  return jnp.where(total > 0, graph / jnp.where(total > 0, total, 1.0), 0.0)


def aioli(num_domains: int, *, step_size=1.0, sweep_rounds=2, sweep_steps=10,
          round_steps=200, skew=0.75, ema: float | None = 0.1, normalize: bool = True,
          diagonal: bool = False, prior=None, prior_steps=0, shuffle: bool = True,
          seed: int = 0) -> OnlineMixer:
  """Aioli as an :class:`OnlineMixer` (needs ``probe_losses``).

  Defaults are those of the repository's 7-domain SlimPajama run
  (``scripts/full/aioli/run.sh``).

  Args:
    num_domains: ``D >= 2``.
    step_size: ``eta``, the exponentiated-gradient step size.
    sweep_rounds: ``lp_rounds``, sweeps over the ``D`` domains per
      ``LearnParams``; ``G`` is averaged over them.
    sweep_steps: ``lp_steps``, training steps of each skewed sub-round.
    round_steps: ``update_steps``, steps per round (``LearnParams`` sweep
      included); must exceed ``sweep_rounds * D * sweep_steps``.
    skew: ``one_hot_factor``, the favoured domain's share in a sub-round, in
      ``(1/D, 1]`` (1: one-hot mixtures, no linear solve needed).
    ema: ``ema``, weight of the previous smoothed ``A`` (``A_bar <- (1 - ema)
      A + ema A_bar``; lower = more recency) with ``p ∝ exp(eta colsum
      A_bar)``. ``None``: no smoothing, multiplicative ``p <- p exp(eta colsum
      A)``. In ``[0, 1)``.
    normalize: ``aioli_normalize_A``: shift ``A`` to be non-negative and
      scale it to sum 1 before the update.
    diagonal: ``aioli_diagonal`` ablation: keep only ``A_ii = G_ii / skew``.
    prior: ``aioli_prior``, ``(D,)`` non-negative proportions trained at for
      the first ``prior_steps`` steps ("restricted" Aioli); ``None``: uniform.
    prior_steps: ``prior_steps``; rounds start after them.
    shuffle: each sweep visits the domains in a fresh random order (the
      repository's ``np.random.permutation``); ``False``: ``0, ..., D-1``.
    seed: seeds the sweep orders.

  Returns:
    The mixer. Its ``update`` returns ``(B,)`` sample weights summing to 1.

  Raises:
    ValueError: on a bad static option or a static numeric value out of range.
  """
  if not isinstance(num_domains, int) or num_domains < 2:
    raise ValueError(f"aioli needs num_domains >= 2 (the skewed mixtures divide by D - 1), "
                     f"got {num_domains!r}")
  for name, value in (("normalize", normalize), ("diagonal", diagonal), ("shuffle", shuffle)):
    if not isinstance(value, bool):
      raise ValueError(f"aioli: {name} must be a bool, got {value!r}")
  if _is_static_number(skew) and not 1.0 / num_domains < skew <= 1.0:
    raise ValueError(f"aioli: skew must be in (1/D, 1] = ({1.0 / num_domains:.4g}, 1] so the "
                     f"skewed mixtures favour their domain and the law is solvable, got {skew!r}")
  if ema is not None and _is_static_number(ema) and not 0.0 <= ema < 1.0:
    raise ValueError(f"aioli: ema must be None or in [0, 1), got {ema!r}")
  for name, value in (("sweep_rounds", sweep_rounds), ("sweep_steps", sweep_steps),
                      ("round_steps", round_steps)):
    if _is_static_number(value) and (int(value) != value or value < 1):
      raise ValueError(f"aioli: {name} must be a positive integer, got {value!r}")
  if _is_static_number(prior_steps) and (int(prior_steps) != prior_steps or prior_steps < 0):
    raise ValueError(f"aioli: prior_steps must be a non-negative integer, got {prior_steps!r}")
  if all(_is_static_number(v) for v in (sweep_rounds, sweep_steps, round_steps)):
    if sweep_rounds * num_domains * sweep_steps >= round_steps:
      raise ValueError(
          f"aioli: round_steps={round_steps!r} must exceed the LearnParams sweep "
          f"sweep_rounds * D * sweep_steps = {sweep_rounds * num_domains * sweep_steps}")
  if prior is None:
    prior_D = jnp.full((num_domains,), 1.0 / num_domains, jnp.float32)
  else:
    prior_D = jnp.asarray(prior, jnp.float32)
    if prior_D.shape != (num_domains,):
      raise ValueError(f"aioli: prior must have shape ({num_domains},), got {prior_D.shape}")
    total = jnp.sum(prior_D)
    prior_D = jnp.where(total > 0, prior_D / jnp.where(total > 0, total, 1.0), 1.0 / num_domains)

  base_key = jax.random.PRNGKey(seed)

  def sweep_domain(round_idx, sub_round):
    """Domain favoured by sub-round ``sub_round`` of round ``round_idx``."""
    if not shuffle:
      return (sub_round % num_domains).astype(jnp.int32)
    key = jax.random.fold_in(jax.random.fold_in(base_key, round_idx), sub_round // num_domains)
    order = jax.random.permutation(key, num_domains)
    return order[sub_round % num_domains].astype(jnp.int32)

  def init():
    zeros_D = jnp.zeros((num_domains,), jnp.float32)
    zeros_DxD = jnp.zeros((num_domains, num_domains), jnp.float32)
    return AioliState(
        weights=prior_D, weights_sum=zeros_D, count=jnp.zeros((), jnp.int32),
        mixture=prior_D, skew_domain=jnp.full((), -1, jnp.int32), prev_probe=zeros_D,
        drops=zeros_DxD, graph=zeros_DxD, ema_graph=zeros_DxD, logits=zeros_D,
        num_estimates=jnp.zeros((), jnp.int32))

  def estimate(state, drops_DxD):
    """End of LearnParams: ``A`` from ``G``, then the new proportions."""
    graph = solve_mixing_law(drops_DxD / sweep_rounds, skew, diagonal=diagonal)
    used = normalize_graph(graph) if normalize else graph
    first = state.num_estimates == 0
    if ema is None:
      ema_graph = used
      # The repository's first round starts from all-ones weights (the prior,
      # if any, is not carried into the update); later rounds multiply.
      logits = jnp.where(first, 0.0, state.logits) + step_size * jnp.sum(used, axis=0)
    else:
      ema_graph = jnp.where(first, used, (1.0 - ema) * used + ema * state.ema_graph)
      logits = step_size * jnp.sum(ema_graph, axis=0)
    logits = logits - jnp.max(logits)   # p is shift-invariant; keeps logits bounded
    weights = jax.nn.softmax(logits)
    ok = (jnp.all(jnp.isfinite(graph)) & jnp.all(jnp.isfinite(ema_graph))
          & jnp.all(jnp.isfinite(logits)) & jnp.all(jnp.isfinite(weights)))
    # Non-finite estimates (overflowing losses, a degenerate traced skew)
    # leave the proportions as they were rather than poisoning them.
    keep = lambda new, old: jnp.where(ok, new, old)
    return (keep(graph, state.graph), keep(ema_graph, state.ema_graph),
            keep(logits, state.logits), keep(weights, state.weights),
            state.num_estimates + ok.astype(jnp.int32))

  def phase(step):
    """``(in_prior, round, local step, sub-round, in_sweep)`` of ``step``."""
    dyn_step = step.astype(jnp.int32) - prior_steps
    in_prior = dyn_step < 0
    dyn_step = jnp.maximum(dyn_step, 0)
    local = dyn_step % round_steps                       # s in [0, round_steps)
    in_sweep = ~in_prior & (local < sweep_rounds * num_domains * sweep_steps)
    return in_prior, dyn_step // round_steps, local, local // sweep_steps, in_sweep

  def mixture_at(weights_D, step):
    """``((D,) mixture trained on at ``step``, favoured domain, in_sweep)``:
    the prior, a sweep's skewed mixture, or ``weights_D`` (the proportions)."""
    in_prior, round_idx, _, sub_round, in_sweep = phase(jnp.asarray(step))
    favoured = sweep_domain(round_idx, sub_round)
    mixture = jnp.where(in_prior, prior_D,
                        jnp.where(in_sweep, skewed_mixture(num_domains, favoured, skew),
                                  weights_D))
    return mixture, favoured, in_sweep

  def proportions(state: AioliState, step):
    # The sample form's mixture of `step`, from the state after step - 1:
    # the same as update's but at the step that ends a sweep, whose new
    # proportions need that step's probe losses (used from the next step on).
    return mixture_at(state.weights, step)[0]

  def update(state: AioliState, inputs: MixingInputs):
    if inputs.probe_losses is None:
      raise ValueError("aioli needs inputs.probe_losses (needs={'probe_losses'})")
    probe_D = inputs.probe_losses.astype(jnp.float32)
    sweep_len = sweep_rounds * num_domains * sweep_steps
    in_prior, round_idx, local, sub_round, _ = phase(inputs.step)
    at_boundary = ~in_prior & (local % sweep_steps == 0) & (local <= sweep_len)

    # Close the sub-round that just ended: its loss drop goes to the column
    # of the domain it favoured (`new_graph[:, onehot_idx] += previous_loss -
    # new_loss`). At s = 0 a new round starts from G = 0.
    closes = at_boundary & (local > 0)
    ended = sweep_domain(round_idx, jnp.maximum(sub_round - 1, 0))
    drop_D = jnp.nan_to_num(state.prev_probe - probe_D, nan=0.0,
                            posinf=_MAX_DROP, neginf=-_MAX_DROP)
    drop_D = jnp.clip(drop_D, -_MAX_DROP, _MAX_DROP)
    column = jax.nn.one_hot(ended, num_domains, dtype=jnp.float32)
    drops = jnp.where(local == 0, 0.0, state.drops)
    drops = drops + jnp.where(closes, drop_D[:, None] * column[None, :], 0.0)
    prev_probe = jnp.where(at_boundary, probe_D, state.prev_probe)

    # End of the sweep: estimate A and move p before this step trains at p.
    finished = ~in_prior & (local == sweep_len)
    new = estimate(state, drops)
    old = (state.graph, state.ema_graph, state.logits, state.weights, state.num_estimates)
    graph, ema_graph, logits, weights, num_estimates = jax.tree.map(
        lambda n, o: jnp.where(finished, n, o), new, old)

    mixture, favoured, in_sweep = mixture_at(weights, inputs.step)
    sample_weights = domain_to_sample_weights(mixture, inputs.domain_id)
    state = AioliState(
        weights=weights, weights_sum=state.weights_sum + weights, count=state.count + 1,
        mixture=mixture, skew_domain=jnp.where(in_sweep, favoured, -1).astype(jnp.int32),
        prev_probe=prev_probe, drops=drops, graph=graph, ema_graph=ema_graph,
        logits=logits, num_estimates=num_estimates)
    return sample_weights, state

  return OnlineMixer(init, update, frozenset({"probe_losses"}), proportions=proportions,
                     form="sample")
