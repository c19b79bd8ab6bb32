"""Group DRO: online exponentiated gradient on the domain losses.

Sagawa et al. (ICLR 2020), Algorithm 1: the adversary keeps a distribution
``q`` over groups (here: human domains) and moves it by exponentiated gradient
ascent on the groups' batch losses; the model then descends the ``q``-weighted
loss:

.. math::

  q_g \\leftarrow \\frac{q_g \\exp(\\eta L_g)}{\\sum_{g'} q_{g'} \\exp(\\eta L_{g'})},
  \\qquad \\text{model loss} = \\sum_g q_g L_g,

with ``L_g`` the mean loss of group ``g``'s rows in the batch and ``q`` updated
*before* it weights the loss (as in the official ``loss.py``,
``compute_robust_loss``).

Choices where the official code (``kohpangwei/group_DRO``, ``loss.py``) leaves
room:

* **Absent domains keep their ``q``.** The official code gives an absent group
  a loss of 0 and renormalises the whole vector, so an absent group's ``q``
  shrinks whenever the present groups' losses are positive, i.e. it is
  penalised for not being sampled. Here an absent domain's ``q`` does not move
  at all: the present domains are reweighted among themselves and renormalised
  to the mass they held before. With every domain present this is exactly the
  official update.
* **Raw losses.** The official defaults use neither ``normalize_loss`` nor the
  generalisation adjustment ``C / sqrt(n_g)`` (``adj`` is zero unless given),
  so neither is implemented.
* **Per-sample weights** are :func:`~dograph_jax.mixing.base.domain_to_sample_weights`
  of ``q``: ``w_i = q_{g(i)} / n_{g(i)}`` renormalised over the present domains,
  so that ``sum_i w_i l_i = sum_{g present} q_g L_g / sum_{g present} q_g``.
  The official ``group_loss @ adv_probs`` is the same without the
  renormalisation (its weights sum to the present mass, below 1 when a group
  is absent); our weights sum to 1 as the :class:`OnlineMixer` contract asks.
* **Log space.** ``q`` is kept as ``log q``, the losses are shifted by the
  largest present one (the step is invariant to the shift) and ``q`` is
  normalised with ``logsumexp``, so a huge loss cannot overflow
  ``exp(eta L)``. Non-finite losses are not sanitised: they make the step's
  loss non-finite too, which the trainer's NaN check reports.

Shape legend: ``B`` batch, ``D`` human domains.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dograph_jax.mixing.base import (MixingInputs, OnlineMixer, domain_counts, domain_means,
                                     domain_to_sample_weights)

# log q never goes below this. exp(-1e4) is 0 in float32 anyway; the floor only
# keeps the log-space arithmetic finite (no -inf - -inf) once a domain's q has
# underflowed after enormous losses.
_LOG_Q_FLOOR = -1e4


class GroupDROState(NamedTuple):
  weights: jax.Array      # (D,) float32, q: the adversary's domain distribution
  log_weights: jax.Array  # (D,) float32, log q (what the update works on)
  weights_sum: jax.Array  # (D,) float32, sum of q over updates
  count: jax.Array        # () int32, number of updates


def exponentiated_gradient_step(log_q_D: jax.Array, group_loss_D: jax.Array,
                                present_D: jax.Array, step_size) -> jax.Array:
  """One exponentiated-gradient ascent step on ``log q``, present domains only.

  ``q_g <- q_g exp(eta L_g) * M / sum_{g' present} q_{g'} exp(eta L_{g'})``
  for present ``g``, where ``M = sum_{g' present} q_{g'}`` is the mass the
  present domains held; absent domains are left as they are. With all domains
  present (``M = 1``) this is the paper's normalised update.

  Args:
    log_q_D: ``(D,)`` log of the current ``q`` (on the simplex).
    group_loss_D: ``(D,)`` mean batch loss per domain (ignored where absent).
    present_D: ``(D,)`` bool, domain has rows in the batch.
    step_size: ``eta`` (Python or traced scalar).

  Returns:
    ``(D,)`` the new ``log q``.
  """
  neg_inf = jnp.full_like(log_q_D, -jnp.inf)
  # The step is invariant to a constant added to every present loss (it
  # cancels in the normalisation); subtracting the largest keeps every
  # exponent <= 0, so equal huge losses leave q exactly as it was instead of
  # drowning log q in the round-off of log q + eta * 1e30.
  loss_max = jnp.max(jnp.where(present_D, group_loss_D, neg_inf))
  excess_D = jnp.where(present_D, group_loss_D - loss_max, 0.0)
  proposal_D = log_q_D + step_size * excess_D
  # Log of the present mass before and after the multiplicative step.
  old_mass = jax.nn.logsumexp(jnp.where(present_D, log_q_D, neg_inf))
  new_mass = jax.nn.logsumexp(jnp.where(present_D, proposal_D, neg_inf))
  stepped_D = proposal_D - new_mass + old_mass
  return jnp.maximum(jnp.where(present_D, stepped_D, log_q_D), _LOG_Q_FLOOR)


def group_dro(num_domains: int, *, step_size=1e-3) -> OnlineMixer:
  """Group DRO (online, per human domain) as an :class:`OnlineMixer`.

  Args:
    num_domains: ``D``.
    step_size: ``eta_q``, the adversary's exponentiated-gradient step (may be
      a traced scalar). Default ``1e-3``, not the paper's/official ``0.01``:
      the standard exponentiated-gradient (Hedge) step for ``T`` rounds of
      losses bounded by ``L`` is ``sqrt(2 ln D / T) / L``. The paper's
      setting (4 groups, about 10^4 steps, cross-entropy of a binary
      classifier, ``L`` about 1) gives about 0.016, consistent with its 0.01.
      Ours (7 SlimPajama domains, 20,000 steps, LM cross-entropy up to
      ``ln 50257`` about 10.8 at initialisation) gives about 1.4e-3. With 0.01,
      irreducible loss gaps of about 1 nat between LM domains would put
      ``e^10`` odds on the highest-entropy domain within 1,000 steps.

  Returns:
    An :class:`OnlineMixer` with ``needs = frozenset()`` (``losses``,
    ``domain_id``).

  References:
    Sagawa, Koh, Hashimoto, Liang: "Distributionally Robust Neural Networks
    for Group Shifts: On the Importance of Regularization for Worst-Case
    Generalization", ICLR 2020, Algorithm 1; code:
    github.com/kohpangwei/group_DRO, ``loss.py`` (``LossComputer``).
  """

  def init():
    log_q_D = jnp.full((num_domains,), -jnp.log(num_domains), jnp.float32)
    return GroupDROState(jnp.exp(log_q_D), log_q_D, jnp.zeros((num_domains,), jnp.float32),
                         jnp.zeros((), jnp.int32))

  def update(state: GroupDROState, inputs: MixingInputs):
    losses_B = jax.lax.stop_gradient(inputs.losses).astype(jnp.float32)
    present_D = domain_counts(inputs.domain_id, num_domains) > 0
    group_loss_D = domain_means(losses_B, inputs.domain_id, num_domains)
    log_q_D = exponentiated_gradient_step(state.log_weights, group_loss_D, present_D,
                                          step_size)
    # softmax re-normalises away the float round-off of the log-space step.
    q_D = jax.nn.softmax(log_q_D)
    w_B = domain_to_sample_weights(q_D, inputs.domain_id)
    return w_B, GroupDROState(q_D, log_q_D, state.weights_sum + q_D, state.count + 1)

  return OnlineMixer(init, update)
