"""DoReMi's proxy run: Group DRO on the excess loss over a reference model.

Xie et al. (NeurIPS 2023), Algorithm 1. A small proxy model is trained with
domain weights ``alpha`` that chase the domains where it still lags a fixed
reference model (trained beforehand on the uniform/natural mixture). At each
step, with ``B_d`` the batch rows of domain ``d`` and ``|B_d|`` their token
count,

.. math::

  \\lambda_d = \\frac{1}{|B_d|} \\sum_{x \\in B_d} \\sum_j
      \\max(\\ell_{\\theta,j}(x) - \\ell_{\\mathrm{ref},j}(x), 0),
  \\qquad
  \\alpha \\leftarrow (1 - c)\\,
      \\mathrm{softmax}(\\log \\alpha + \\eta \\lambda) + c / D,

then the proxy takes one optimizer step on ``sum_d alpha_d L_d(theta)`` with
the *new* ``alpha`` (Algorithm 1 updates ``alpha_t`` before the step on
``L(theta_{t-1}, alpha_t)``; the official ``doremi/trainer.py``
``training_step`` calls ``update_domain_weights`` before ``read_weights``, and
levanter's ``doremi_step`` does the same). The method's output, the weights
for the final run, is the time average ``weights_sum / count``.

Choices where the references differ (official: ``sangmichaelxie/doremi``,
``doremi/trainer.py``; levanter at commit 83f3f346,
``src/levanter/doremi.py``):

* **Token averaging.** ``lambda_d`` is the mean of the clipped per-token
  excess over *all* of domain ``d``'s tokens in the batch (the official
  ``torch.clip(scores[domain_mask][mask], min=0).mean()``, the paper's
  formula). Levanter's ``_compute_per_domain_losses`` instead divides the sum
  by the number of tokens whose clipped excess is non-zero (its ``losses !=
  0`` doubles as a padding mask), i.e. it averages over the tokens where the
  proxy is behind only, which inflates ``lambda`` for domains where the proxy
  is ahead on most tokens. We follow the official code. The inputs carry no
  token mask: every one of the ``T`` token losses of a row must be a real
  token (packed sequences, as the data layer produces); with a fixed ``T``
  the token mean over a domain is the mean over its rows of the row means.
* **Absent domains reuse their last lambda** (official: ``curr_domain_scores
  = self.model.perdomain_scores[domain_id]`` when the domain has no rows), so
  a domain the proxy lagged on keeps gaining weight while unsampled. Before a
  domain is ever seen its lambda is ``initial_excess`` (official:
  ``log(vocab_size)``, an upper bound on the excess loss, set in
  ``doremi/train.py``; our default 0 knows no vocabulary). Levanter instead
  gives an absent domain ``lambda = 0`` (its per-domain sum is 0), so it
  shrinks relative to the present ones.
* **Model loss.** Per-sample weights are
  :func:`~dograph_jax.mixing.base.domain_to_sample_weights` of the new
  ``alpha``: ``w_i = alpha_{d(i)} / n_{d(i)}`` renormalised over the present
  domains, so the step is on ``sum_d alpha_d L_d`` with ``L_d`` the domain's
  token-mean loss: Algorithm 1's objective and levanter's
  ``_domain_weighted_loss``. The official code weights each *token* by
  ``alpha_d / s_d`` (``s`` the sampling proportions) and normalises by the sum
  of those weights over the batch's tokens, a ratio estimator of the same
  objective whose per-domain share ``alpha_d n_d / sum_e alpha_e n_e`` moves
  with the batch's domain counts ``n``. The in-batch form gives each present
  domain exactly its weight whatever the sampling proportions (so no ``s``
  is needed) and is the convention every mixer here shares. The reference
  loss is a constant in ``theta``: stepping on the excess (levanter) or on
  the proxy loss (official) gives the same gradient.
* **Time average.** ``weights_sum / count`` averages the ``alpha`` of the
  ``count`` updates. Both references also fold the initial (uniform) ``alpha``
  into the average (as if ``count + 1`` terms), a ``1/(count+1)`` difference.

Defaults: ``eta = 1`` (paper section 2; official ``reweight_eta``; levanter
``domain_weight_step_size``), ``c = 1e-3`` (paper; the official run script
``scripts/runs/run_pile_doremi120M.sh`` passes ``--reweight_eps 1e-3``, whose
dataclass default is 1e-4; levanter ``smoothing``).

Shape legend: ``B`` batch, ``T`` tokens per sequence, ``D`` human domains.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dograph_jax.mixing.base import (MixingInputs, OnlineMixer, domain_counts, domain_means,
                                     domain_to_sample_weights)


class DoReMiState(NamedTuple):
  weights: jax.Array      # (D,) float32, alpha after the last update (on the simplex)
  excess: jax.Array       # (D,) float32, last lambda per domain (reused while absent)
  weights_sum: jax.Array  # (D,) float32, sum of alpha over updates
  count: jax.Array        # () int32, number of updates


def domain_excess_loss(token_losses_BxT: jax.Array, ref_token_losses_BxT: jax.Array,
                       domain_id_B: jax.Array, num_domains: int) -> jax.Array:
  """``(D,)`` per-domain token mean of the clipped excess loss (0 if absent).

  ``lambda_d = sum_{rows of d} sum_t max(l - l_ref, 0) / (n_d T)``.

  Args:
    token_losses_BxT: the proxy's per-token losses.
    ref_token_losses_BxT: the reference model's, on the same tokens.
    domain_id_B: ``(B,)`` int32.
    num_domains: ``D``.

  Returns:
    ``(D,)`` float32 ``lambda``; 0 for domains absent from the batch.
  """
  excess_BxT = token_losses_BxT.astype(jnp.float32) - ref_token_losses_BxT.astype(jnp.float32)
  clipped_B = jnp.mean(jnp.maximum(excess_BxT, 0.0), axis=-1)
  return domain_means(clipped_B, domain_id_B, num_domains)


def exponentiated_weight_step(alpha_D: jax.Array, excess_D: jax.Array, step_size,
                              smoothing) -> jax.Array:
  """``(1 - c) softmax(log alpha + eta lambda) + c / D``.

  Args:
    alpha_D: ``(D,)`` current domain weights (on the simplex).
    excess_D: ``(D,)`` ``lambda``, non-negative.
    step_size: ``eta`` (Python or traced scalar).
    smoothing: ``c`` in ``[0, 1]`` (Python or traced scalar).

  Returns:
    ``(D,)`` the new weights, on the simplex, never NaN for finite inputs.
  """
  num_domains = alpha_D.shape[0]
  # With c = 0 a weight can underflow to 0; the floor keeps log finite so a
  # later large lambda can still revive it (and -inf - -inf never occurs).
  tiny = jnp.finfo(jnp.float32).tiny
  logits_D = jnp.log(jnp.maximum(alpha_D, tiny)) + step_size * excess_D
  # A lambda near float32's max (or eta * lambda overflowing) becomes inf;
  # softmax of inf - inf would be NaN. Clamping to the largest finite value
  # keeps the ordering that matters: the huge domain takes (almost) all mass.
  big = jnp.finfo(jnp.float32).max
  logits_D = jnp.nan_to_num(logits_D, nan=0.0, posinf=big, neginf=-big)
  alpha_D = jax.nn.softmax(logits_D)
  return (1.0 - smoothing) * alpha_D + smoothing / num_domains


def doremi(num_domains: int, *, step_size=1.0, smoothing=1e-3,
           initial_excess=0.0) -> OnlineMixer:
  """DoReMi's proxy-model run as an :class:`OnlineMixer`.

  Args:
    num_domains: ``D``.
    step_size: ``eta``, the exponentiated-gradient step on ``alpha`` (may be a
      traced scalar). Default 1 (paper; official ``reweight_eta``).
    smoothing: ``c``, the mixing toward uniform after each step (may be
      traced). Default ``1e-3`` (paper; official run script; levanter).
    initial_excess: the ``lambda`` of a domain absent from every batch so far
      (may be traced). The official code starts at ``log(vocab_size)``.

  Returns:
    An :class:`OnlineMixer` with ``needs = {"token_losses",
    "ref_token_losses"}``; its state is :class:`DoReMiState`, whose
    ``weights_sum / count`` is DoReMi's output.

  References:
    Xie, Pham, Dong, Du, Liu, Lu, Liang, Le, Ma, Yu: "DoReMi: Optimizing Data
    Mixtures Speeds Up Language Model Pretraining", NeurIPS 2023,
    Algorithm 1; code: github.com/sangmichaelxie/doremi,
    ``doremi/trainer.py`` (``update_domain_weights``, ``training_step``);
    levanter ``src/levanter/doremi.py`` at commit 83f3f346.
  """

  def init():
    alpha_D = jnp.full((num_domains,), 1.0 / num_domains, jnp.float32)
    excess_D = jnp.full((num_domains,), initial_excess, jnp.float32)
    return DoReMiState(alpha_D, excess_D, jnp.zeros((num_domains,), jnp.float32),
                       jnp.zeros((), jnp.int32))

  def update(state: DoReMiState, inputs: MixingInputs):
    if inputs.token_losses is None or inputs.ref_token_losses is None:
      raise ValueError("doremi needs MixingInputs.token_losses and ref_token_losses")
    token_losses_BxT = jax.lax.stop_gradient(inputs.token_losses)
    ref_BxT = jax.lax.stop_gradient(inputs.ref_token_losses)
    present_D = domain_counts(inputs.domain_id, num_domains) > 0
    batch_excess_D = domain_excess_loss(token_losses_BxT, ref_BxT, inputs.domain_id,
                                        num_domains)
    excess_D = jnp.where(present_D, batch_excess_D, state.excess)
    alpha_D = exponentiated_weight_step(state.weights, excess_D, step_size, smoothing)
    w_B = domain_to_sample_weights(alpha_D, inputs.domain_id)
    return w_B, DoReMiState(alpha_D, excess_D, state.weights_sum + alpha_D, state.count + 1)

  return OnlineMixer(init, update, frozenset({"token_losses", "ref_token_losses"}))
