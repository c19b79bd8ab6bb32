"""DoGE's proxy run: domain weights from gradient alignment (generalisation).

Fan, Pagliardini, Jaggi (2024), "DoGE: Domain Reweighting with
Generalization Estimation". A small proxy model is trained on
``sum_d alpha_d g_d`` (``g_d`` the gradient of domain ``d``'s mean loss);
``alpha`` moves toward the domains whose gradient helps the others. In the
official code (``Olivia-fsm/DoGE``, ``src/trainer.py``,
``update_domain_weights``), with ``G`` the Gram matrix of the domain gradients
and ``eta_t`` the proxy's current learning rate,

.. math::

  W_i = \\eta_t \\sum_{j \\ne i} \\langle g_i, g_j \\rangle
        / (\\overline{\\lVert g \\rVert} + 10^{-6}),
  \\qquad W_i \\leftarrow \\mathrm{clip}(W_i, \\eta_t w_{\\min}, \\eta_t w_{\\max}),

.. math::

  \\alpha \\leftarrow (1 - \\epsilon)\\,
     \\mathrm{softmax}(\\log \\alpha + W / \\mu) + \\epsilon / D,

where ``mean ||g||`` averages the domains' gradient norms. The proxy then steps
on ``sum_d alpha_d g_d`` with the *new* ``alpha`` (``add_model_grad_ls`` after
the update). The method's output is the time average ``weights_sum / count``
(``avg_dw / dw_update_steps``).

Here ``G`` arrives as :attr:`MixingInputs.domain_gram`, computed on the device
by the trainer, so per-domain gradients never leave the device; the model
step uses per-sample weights
:func:`~dograph_jax.mixing.base.domain_to_sample_weights` of ``alpha``
(``w_i = alpha_{d(i)} / n_{d(i)}``, so ``sum_i w_i grad l_i = sum_d alpha_d
g_d``).

Choices where the official code leaves room or cannot be followed:

* **Target.** ``target="others"`` (default) scores ``g_i`` against the sum of
  the *other* domains' gradients: the code's branch for target domains equal
  to the training domains (``scores_mat.sum(-1) - scores_mat.diag()``) and
  the paper's universal-generalisation rule. The published universal run
  (``config/doge.json``, ``tgt_domains: "mix"``) instead scores against the
  gradient of a separate held-out ``mix`` domain (a uniform mixture of all
  domains, disjoint samples), about ``(1/D) sum_j g_j`` *including* ``i``'s
  own distribution but not its samples. We have no such batch: with the same
  samples the self term ``||g_i||^2`` would reward a domain for its own
  gradient noise, so the default drops it. ``target="all"`` keeps it (the
  code's branch for disjoint target domains applied to the training
  domains), for comparison.
* **Absent domains keep their weight.** The official code keeps a stale
  gradient for a domain without rows in the batch (``flat_grad_mat`` is not
  cleared) and scores it with that. We have only this step's Gram: an absent
  domain's row and column are ignored (treated as zero whatever they hold),
  it is left out of ``mean ||g||``, its ``alpha`` does not move, and the
  present domains are reweighted among themselves and renormalised to the
  mass they held. (Scoring it 0 and renormalising all of ``alpha`` instead
  would shrink it for not being sampled, since scores are clipped at
  ``eta_t w_min = 0``.) Its gradient is absent from the model step, as in the
  code; our per-sample weights are renormalised over the present domains to
  sum to 1, where the code's present weights sum to less.
* **Per-domain gradient clipping.** The code clips each domain gradient to
  ``max_grad_norm`` (5.0 in ``config/doge.json``) before the Gram and the
  model step. The Gram arrives unclipped; clipping the combined step is the
  trainer's business.
* **The learning rate** ``eta_t`` is ``step_size``: a number or an optax-style
  schedule ``step -> lr`` evaluated at :attr:`MixingInputs.step`; pass the
  proxy's own schedule to follow the code exactly (it reads
  ``lr_scheduler.get_last_lr()``).

Defaults (official): ``mu = 0.01``, ``step_size = 5e-4``, ``dw_min = 0``,
``dw_max = 5``, ``smoothing = 0`` from ``config/doge.json`` (the run that
``script/doge.sh`` launches; ``step_size`` is its peak ``learning_rate``, under
a linear-warmup-cosine schedule to ``lr_end = 1e-4``). The trainer's own
dataclass defaults differ only in ``mu = 0.05``; without a scheduler it uses
``eta_t = 1e-4``.

Shape legend: ``B`` batch, ``D`` human domains.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from dograph_jax.mixing.base import (MixingInputs, OnlineMixer, domain_counts,
                                     domain_to_sample_weights)

TARGETS = ("others", "all")

# log alpha never goes below this (exp(-1e4) is 0 in float32); it only keeps
# the log-space arithmetic finite once a weight has underflowed.
_LOG_ALPHA_FLOOR = -1e4


class DoGEState(NamedTuple):
  weights: jax.Array      # (D,) float32, alpha after the last update (on the simplex)
  log_weights: jax.Array  # (D,) float32, log alpha (what the update works on)
  scores: jax.Array       # (D,) float32, last clipped scores W (before / mu); 0 if absent
  weights_sum: jax.Array  # (D,) float32, sum of alpha over updates
  count: jax.Array        # () int32, number of updates


def generalisation_scores(gram_DxD: jax.Array, present_D: jax.Array, learning_rate, *,
                          target: str = "others", dw_min=0.0, dw_max=5.0) -> jax.Array:
  """DoGE's clipped scores ``W`` from the Gram matrix of domain gradients.

  ``W_i = clip(lr * <g_i, g_target> / (mean_j ||g_j|| + 1e-6), lr * dw_min,
  lr * dw_max)`` with ``g_target = sum_{j != i} g_j`` (``"others"``) or
  ``sum_j g_j`` (``"all"``); sums and the mean norm run over present domains.

  Args:
    gram_DxD: ``(D, D)`` ``<g_d, g_e>`` of the domains' mean-loss gradients.
    present_D: ``(D,)`` bool, domain has rows in the batch.
    learning_rate: ``eta_t`` (Python or traced scalar).
    target: ``"others"`` or ``"all"`` (static).
    dw_min: lower clip, in units of ``learning_rate``.
    dw_max: upper clip, in units of ``learning_rate``.

  Returns:
    ``(D,)`` float32 scores; 0 where absent.
  """
  if target not in TARGETS:
    raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
  both_DxD = present_D[:, None] & present_D[None, :]
  gram_DxD = jnp.where(both_DxD, gram_DxD.astype(jnp.float32), 0.0)
  diag_D = jnp.diagonal(gram_DxD)
  # A Gram's diagonal is >= 0; round-off may leave -1e-12, which sqrt would NaN.
  norms_D = jnp.sqrt(jnp.maximum(diag_D, 0.0))
  avg_norm = jnp.sum(norms_D) / jnp.maximum(jnp.sum(present_D), 1)
  inner_D = jnp.sum(gram_DxD, axis=-1)
  if target == "others":
    inner_D = inner_D - diag_D
  scores_D = learning_rate * inner_D / (avg_norm + 1e-6)
  scores_D = jnp.clip(scores_D, learning_rate * dw_min, learning_rate * dw_max)
  # Clipping bounds +-inf; a NaN (inf - inf in the Gram) carries no
  # information: score 0.
  scores_D = jnp.where(jnp.isnan(scores_D), 0.0, scores_D)
  return jnp.where(present_D, scores_D, 0.0)


def mirror_step(log_alpha_D: jax.Array, scores_D: jax.Array, present_D: jax.Array, mu,
                smoothing) -> jax.Array:
  """``log`` of ``(1 - eps) softmax(log alpha + W / mu) + eps / D``, present
  domains only.

  Absent domains keep their ``alpha``; the present ones share the mass they
  held before. With all domains present this is the official update.

  Args:
    log_alpha_D: ``(D,)`` log of the current weights (on the simplex).
    scores_D: ``(D,)`` ``W`` (ignored where absent).
    present_D: ``(D,)`` bool.
    mu: the Bregman-divergence coefficient (Python or traced scalar).
    smoothing: ``eps`` in ``[0, 1]`` (Python or traced scalar).

  Returns:
    ``(D,)`` the new ``log alpha``.
  """
  num_domains = log_alpha_D.shape[0]
  neg_inf = jnp.full_like(log_alpha_D, -jnp.inf)
  proposal_D = log_alpha_D + scores_D / mu
  old_mass = jax.nn.logsumexp(jnp.where(present_D, log_alpha_D, neg_inf))
  new_mass = jax.nn.logsumexp(jnp.where(present_D, proposal_D, neg_inf))
  stepped_D = jnp.where(present_D, proposal_D - new_mass + old_mass, log_alpha_D)
  # (1 - eps) alpha + eps / D in log space; log(0) = -inf is fine in logaddexp.
  smoothed_D = jnp.logaddexp(jnp.log1p(-smoothing) + stepped_D,
                             jnp.log(smoothing / num_domains))
  return jnp.maximum(smoothed_D, _LOG_ALPHA_FLOOR)


def doge(num_domains: int, *, step_size: float | Callable = 5e-4, mu=0.01, dw_min=0.0,
         dw_max=5.0, smoothing=0.0, target: str = "others") -> OnlineMixer:
  """DoGE's proxy-model run as an :class:`OnlineMixer`.

  Args:
    num_domains: ``D``.
    step_size: ``eta_t``, the proxy's learning rate: a scalar (may be traced)
      or a schedule ``step -> lr``. Default ``5e-4`` (``config/doge.json``
      ``learning_rate``).
    mu: the Bregman-divergence coefficient; ``log alpha += W / mu``. Default
      0.01 (``config/doge.json``; the dataclass default is 0.05).
    dw_min: lower score clip in units of ``eta_t``. Default 0.
    dw_max: upper score clip in units of ``eta_t``. Default 5.
    smoothing: ``eps``, mixing toward uniform after each step. Default 0
      (``reweight_eps``).
    target: ``"others"`` (default) or ``"all"`` (static); see the module
      docstring.

  Returns:
    An :class:`OnlineMixer` with ``needs = {"domain_gram"}``; its state is
    :class:`DoGEState`, whose ``weights_sum / count`` is DoGE's output.

  Raises:
    ValueError: ``target`` is not one of :data:`TARGETS`.

  References:
    Fan, Pagliardini, Jaggi: "DoGE: Domain Reweighting with Generalization
    Estimation", ICML 2024; code: github.com/Olivia-fsm/DoGE,
    ``src/trainer.py`` (``update_domain_weights``), ``config/doge.json``.
  """
  if target not in TARGETS:
    raise ValueError(f"target must be one of {TARGETS}, got {target!r}")

  def init():
    log_alpha_D = jnp.full((num_domains,), -jnp.log(num_domains), jnp.float32)
    zeros_D = jnp.zeros((num_domains,), jnp.float32)
    return DoGEState(jnp.exp(log_alpha_D), log_alpha_D, zeros_D, zeros_D,
                     jnp.zeros((), jnp.int32))

  def update(state: DoGEState, inputs: MixingInputs):
    if inputs.domain_gram is None:
      raise ValueError("doge needs MixingInputs.domain_gram")
    gram_DxD = jax.lax.stop_gradient(inputs.domain_gram)
    present_D = domain_counts(inputs.domain_id, num_domains) > 0
    lr = step_size(inputs.step) if callable(step_size) else step_size
    scores_D = generalisation_scores(gram_DxD, present_D, lr, target=target, dw_min=dw_min,
                                     dw_max=dw_max)
    # log_softmax re-normalises away the float round-off of the log-space step.
    log_alpha_D = jax.nn.log_softmax(
        mirror_step(state.log_weights, scores_D, present_D, mu, smoothing))
    alpha_D = jnp.exp(log_alpha_D)
    w_B = domain_to_sample_weights(alpha_D, inputs.domain_id)
    return w_B, DoGEState(alpha_D, log_alpha_D, scores_D, state.weights_sum + alpha_D,
                          state.count + 1)

  return OnlineMixer(init, update, frozenset({"domain_gram"}))
