"""ODM: Online Data Mixing, an EXP3 bandit over domains rewarded by the training loss.

Albalak, Pan, Raffel, Wang (2023), "Efficient Online Data Mixing For Language
Model Pre-Training" (arXiv:2312.02406). Each domain ``D_i`` is an arm of a
multi-armed bandit; the policy ``pi`` is the sampling distribution over the
``K`` domains, and the reward of an arm is the training loss of the data
drawn from it (a high loss = much left to learn). With ``t`` the 1-based
training step (``t = inputs.step + 1``), the exploration rate

.. math::

  \\varepsilon_t = \\min\\Big\\{\\frac1K,\\ \\sqrt{\\frac{\\ln K}{K t}}\\Big\\},
  \\qquad \\varepsilon_0 = \\frac1K,

the policy that draws step ``t``'s batch

.. math::

  \\pi_t(D_i) = (1 - K\\varepsilon_t)\\,
      \\frac{\\exp(\\varepsilon_{t-1} \\hat R_i)}{\\sum_j \\exp(\\varepsilon_{t-1} \\hat R_j)}
      + \\varepsilon_t

(EXP3's Gibbs distribution with a decaying temperature ``eps_{t-1}`` and an
exploration floor ``eps_t``: every domain keeps probability ``>= eps_t > 0``),
and, after the step, for every arm ``i`` that was pulled, the smoothed
importance-weighted reward

.. math::

  \\hat R_i \\leftarrow \\alpha \\hat R_i + (1 - \\alpha) \\frac{L_i}{\\pi_t(D_i)},

``L_i`` the training loss of the data from ``D_i``; an arm not pulled keeps
its ``R_hat``. ``R_hat`` starts at 0, so ``pi_1`` is uniform.

**Mixed batches: every domain present is pulled, with its mean loss.** The
paper's bandit pulls one arm per draw. Our batches mix domains (each row's
domain drawn from ``pi_t``), so a step pulls every domain with at least one
row, and ``L_i`` is the mean per-sequence loss of domain ``i``'s rows (over
its finite losses). This is exactly the authors' own mixed-minibatch training
loop (``megatron/training.py``, main loop: each micro-batch's domain is drawn
from the policy, ``batch_losses[name]`` averages the micro-batch losses of
each distinct domain, and ``group_update`` updates all of them at once, each
with its own ``1/pi``); our batch rows play the role of their micro-batches.
(With several draws per step a domain is present with probability
``1 - (1 - pi_i)^B``, not ``pi_i``, so ``L_i / pi_i`` is not an unbiased
estimate as in single-draw EXP3; the authors accept the same.)

Where the authors' code differs from the paper (``alon-albalak/online-data-mixing``,
``megatron/data/data_sampling_utils.py``; the README names
``SmoothedMeanWeightUpdater`` as "the data mixing implementation described in
the paper"), we follow the paper's equations:

* ``SmoothedMeanWeightUpdater.group_update`` (the mixed-minibatch path)
  smooths ``exp(L_i)`` without the ``1/pi`` importance weight and normalises
  ``eps_{t-1} R_hat`` linearly instead of by a softmax; its single-arm
  ``update`` smooths ``exp(L_i)`` with the softmax. ``Exp3WeightUpdater``
  accumulates ``L_i / (10 pi_i)`` (no smoothing, rewards scaled by 1/10 "so
  that the cumulative reward doesn't explode").
* The code's policy after step ``t`` uses the floor ``eps_t`` and temperature
  ``eps_{t-1}``, one index behind the paper's ``pi_{t+1}`` (``eps_{t+1}``,
  ``eps_t``); we use the paper's indices.

Choices the paper leaves open:

* **Warm-up and prior** (``warmup_steps``, ``prior``): the authors' scripts
  train the first 2000 of 100k steps at the corpus's original domain weights
  (``data_sampling_warmup_steps``), collecting no rewards, and the first
  update after the warm-up importance-weights by those initial weights. Here
  the first ``warmup_steps`` steps sample at ``prior`` (``None``: uniform)
  without updating ``R_hat``; the first update then weights by ``prior`` and
  ``eps`` keeps counting from the start of training (as the code's
  ``iteration``). The default ``warmup_steps = 0`` is the paper's algorithm.
* **Non-finite losses** are left out of a domain's mean; a domain with no
  finite loss in the batch is not pulled. Rewards are clipped to
  ``+-1e30`` so that ``R_hat`` and the policy stay finite for absurd losses.
* **Sample weights** (the ``reweight`` form) are
  :func:`~dograph_jax.mixing.base.domain_to_sample_weights` of ``pi_t``, the
  policy meant to draw this batch; the paper's form is ``sample``: the trainer
  draws step ``t``'s batch with ``state.weights`` (= ``pi_t``).

Defaults: ``alpha = 0.9``, the code's ``data_sampling_smoothing_factor``
(``megatron/neox_arguments/neox_args.py``; some of the authors' scripts pass
0.5, e.g. ``scripts/train_1B_ema_0.5smoothing.sh``).

Shape legend: ``B`` batch, ``D`` (= ``K``) human domains.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dograph_jax.mixing.base import MixingInputs, OnlineMixer, domain_to_sample_weights

# Rewards L / pi are clipped to this magnitude (float32 max / 3e8), so R_hat,
# a convex combination of them, and eps * R_hat stay finite.
_MAX_REWARD = 1e30


class ODMState(NamedTuple):
  weights: jax.Array      # (D,) float32, pi_{t+1}: the policy that draws the next batch
  reward: jax.Array       # (D,) float32, R_hat: smoothed importance-weighted loss
  weights_sum: jax.Array  # (D,) float32, sum of `weights` over updates
  count: jax.Array        # () int32, number of updates


def exploration_rate(t, num_domains: int) -> jax.Array:
  """``eps_t = min(1/K, sqrt(ln K / (K t)))`` for a 1-based step ``t``
  (``t = 0`` gives ``eps_0 = 1/K``)."""
  t = jnp.asarray(t, jnp.float32)
  k = float(num_domains)
  rate = jnp.sqrt(math.log(k) / (k * jnp.maximum(t, 1.0)))
  return jnp.where(t > 0, jnp.minimum(1.0 / k, rate), 1.0 / k).astype(jnp.float32)


def odm_policy(reward_D: jax.Array, eps_prev, eps) -> jax.Array:
  """``pi = (1 - K eps) softmax(eps_prev R_hat) + eps`` (``(D,)``, sums to 1)."""
  num_domains = reward_D.shape[0]
  return (1.0 - num_domains * eps) * jax.nn.softmax(eps_prev * reward_D) + eps


def odm(num_domains: int, *, alpha=0.9, warmup_steps: int = 0,
        prior: tuple | None = None) -> OnlineMixer:
  """ODM (Albalak et al. 2023) as an :class:`OnlineMixer` in the ``sample`` form.

  Args:
    num_domains: ``K >= 2``.
    alpha: ``alpha``, the reward smoothing (weight of the old ``R_hat``; may
      be a traced scalar). Default 0.9 (the authors' code default).
    warmup_steps: steps drawn at ``prior`` before the bandit starts (static).
    prior: ``K`` positive numbers (normalised here), the proportions of the
      warm-up; ``None``: uniform.

  Returns:
    The mixer; ``update`` returns ``(B,)`` sample weights summing to 1.

  Raises:
    ValueError: ``num_domains < 2``, a negative ``warmup_steps``, or a bad
      ``prior``.

  References:
    Albalak, Pan, Raffel, Wang: "Efficient Online Data Mixing For Language
    Model Pre-Training", arXiv:2312.02406 (2023), Algorithm 1; code:
    github.com/alon-albalak/online-data-mixing,
    ``megatron/data/data_sampling_utils.py`` and ``megatron/training.py``.
  """
  if not isinstance(num_domains, int) or num_domains < 2:
    raise ValueError(f"odm needs num_domains >= 2, got {num_domains!r}")
  if not isinstance(warmup_steps, int) or warmup_steps < 0:
    raise ValueError(f"odm: warmup_steps must be a non-negative int, got {warmup_steps!r}")
  if prior is None:
    prior = (1.0,) * num_domains
  if len(prior) != num_domains or min(prior) <= 0:
    raise ValueError(f"odm: prior must hold {num_domains} positive numbers, got {prior}")
  prior_D = jnp.asarray(prior, jnp.float32) / sum(prior)

  def init():
    zeros = jnp.zeros((num_domains,), jnp.float32)
    return ODMState(weights=prior_D, reward=zeros, weights_sum=zeros,
                    count=jnp.zeros((), jnp.int32))

  def update(state: ODMState, inputs: MixingInputs):
    losses_B = jax.lax.stop_gradient(inputs.losses).astype(jnp.float32)
    domain_id = inputs.domain_id
    finite_B = jnp.isfinite(losses_B)
    sums_D = jnp.zeros((num_domains,), jnp.float32).at[domain_id].add(
        jnp.where(finite_B, losses_B, 0.0))
    finite_D = jnp.zeros((num_domains,), jnp.float32).at[domain_id].add(
        finite_B.astype(jnp.float32))
    pulled_D = finite_D > 0
    loss_D = sums_D / jnp.maximum(finite_D, 1.0)

    t = inputs.step.astype(jnp.int32) + 1           # this step, 1-based
    active = t > warmup_steps
    pi_t = state.weights                            # the policy that drew this batch
    reward_D = jnp.clip(loss_D / pi_t, -_MAX_REWARD, _MAX_REWARD)
    smoothed = jnp.clip(alpha * state.reward + (1.0 - alpha) * reward_D,
                        -_MAX_REWARD, _MAX_REWARD)
    r_hat = jnp.where(active & pulled_D, smoothed, state.reward)
    pi_next = odm_policy(r_hat, exploration_rate(t, num_domains),
                         exploration_rate(t + 1, num_domains))
    ok = jnp.all(jnp.isfinite(pi_next)) & jnp.all(jnp.isfinite(r_hat))
    weights = jnp.where(active & ok, pi_next, pi_t)
    r_hat = jnp.where(ok, r_hat, state.reward)

    sample_weights = domain_to_sample_weights(pi_t, domain_id)
    return sample_weights, ODMState(weights=weights, reward=r_hat,
                                    weights_sum=state.weights_sum + weights,
                                    count=state.count + 1)

  return OnlineMixer(init, update, form="sample")
