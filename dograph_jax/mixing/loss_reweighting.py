"""Dynamic Loss-Based sample reweighting (Sow et al., ICLR 2025).

Each step, the batch's per-sequence losses are min-max normalised to
``[-delta, delta]``, passed through a strategy function ``f`` that says which
part of the loss range to favour, and turned into weights by a softmax with
temperature ``r``:

.. math::

  h_i = \\delta \\frac{2 l_i - l_{max} - l_{min}}{l_{max} - l_{min}}, \\qquad
  w = \\mathrm{softmax}(f(h) / r).

The strategies (``src/trainer.py`` of the authors' repository, ``F_FUNC_DIC``):

* ``"linupper"``: ``f(h) = min(h + delta, delta)``: the lower half of the loss
  range is down-weighted linearly, the upper half shares the top weight
  (the README's default; the paper's recommended choice);
* ``"mid"``: ``f(h) = 1 - h^2 / delta^2``: favours medium losses;
* ``"extremes"``: ``f(h) = |h|``: favours the easiest and the hardest;
* ``"upper"``: ``f(h) = (h + delta) / 2``: favours high losses, linearly.

For the first ``burn_in`` steps the weights are uniform (``1/B``), as in the
repository (``burnout_steps``): losses of an untrained model say little.

The method never looks at domain labels; the state's ``weights`` is only the
total weight that each human domain received in the last batch (for logging).

Shape legend: ``B`` batch, ``D`` human domains.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dograph_jax.mixing.base import MixingInputs, OnlineMixer, mean_sample_weights

STRATEGIES = ("linupper", "mid", "extremes", "upper")

# The repository divides by ``max(l_max - l_min, 1e-6)``; we keep its floor.
_MIN_RANGE = 1e-6
# A temperature of exactly 0 would divide by zero; below this it is the
# hard argmax anyway.
_MIN_TEMPERATURE = 1e-6


class LossReweightingState(NamedTuple):
  weights: jax.Array      # (D,) float32, total sample weight per domain in the last batch
  weights_sum: jax.Array  # (D,) float32, sum of `weights` over updates
  count: jax.Array        # () int32, number of updates


def normalize_losses(losses_B: jax.Array, delta) -> jax.Array:
  """Min-max normalises ``losses_B`` to ``[-delta, delta]`` (repo's ``h_func``).

  Written as ``delta * (2 l - l_max - l_min) / max(l_max - l_min, 1e-6)``,
  algebraically the repository's ``2 delta l / range - delta (l_max + l_min) /
  range``, but without the cancellation of two large terms when the range is
  tiny: all-equal losses map exactly to 0 (hence uniform weights), not to
  round-off noise amplified by ``1 / 1e-6``.

  Args:
    losses_B: ``(B,)`` per-sequence losses.
    delta: the half-width of the target interval (Python or traced scalar).

  Returns:
    ``(B,)`` float32 normalised losses in ``[-delta, delta]``.
  """
  losses_B = losses_B.astype(jnp.float32)
  l_min, l_max = jnp.min(losses_B), jnp.max(losses_B)
  span = jnp.maximum(l_max - l_min, _MIN_RANGE)
  return delta * (2.0 * losses_B - l_max - l_min) / span


def strategy_scores(h_B: jax.Array, delta, strategy: str) -> jax.Array:
  """The repository's ``f`` for ``strategy`` on normalised losses ``h_B``.

  Args:
    h_B: ``(B,)`` losses normalised to ``[-delta, delta]``.
    delta: the same ``delta`` as the normalisation.
    strategy: one of :data:`STRATEGIES`.

  Returns:
    ``(B,)`` float32 scores; the weights are ``softmax(scores / r)``.
  """
  if strategy == "linupper":
    return jnp.minimum(h_B + delta, delta)
  if strategy == "mid":
    # 1 - h^2 / delta^2; a zero delta (h = 0 too) would give 0/0, so the ratio
    # is formed with a guarded denominator (identical for delta > 0).
    safe_delta = jnp.where(delta == 0, 1.0, delta)
    return 1.0 - (h_B / safe_delta) ** 2
  if strategy == "extremes":
    return jnp.abs(h_B)
  if strategy == "upper":
    return 0.5 * h_B + 0.5 * delta
  raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")


def loss_reweighting(num_domains: int, *, strategy: str = "linupper", delta=1.0,
                     temperature=1.0, burn_in=1000) -> OnlineMixer:
  """Dynamic Loss-Based sample reweighting as an :class:`OnlineMixer`.

  Args:
    num_domains: ``D``, the number of human domains (for the logged weights
      only; the sample weights ignore domain labels).
    strategy: ``"linupper"`` (default, the repository README's), ``"mid"``,
      ``"extremes"`` or ``"upper"`` (static).
    delta: half-width of the normalised loss interval; the repository fixes
      ``delta=1``. Must be ``> 0``.
    temperature: ``r`` in ``softmax(f / r)``, the repository's ``kl_reg``
      (default 1.0, its ``FullTrainingArguments`` default; its GPT-2 Large
      configs use 0.4). Smaller is sharper.
    burn_in: steps (``inputs.step < burn_in``) at uniform weights, the
      repository's ``burnout_steps`` (default 1000).

  ``delta``, ``temperature`` and ``burn_in`` may be traced JAX scalars.

  Returns:
    An :class:`OnlineMixer` with ``needs = frozenset()`` (only ``losses``,
    ``domain_id`` and ``step``).

  References:
    Sow, Woisetschläger, Xu, Liang, Pham, Abdelzaher: "Dynamic Loss-Based
    Sample Reweighting for Improved Large Language Model Pretraining", ICLR
    2025; code: github.com/sowmaster/Sample-Level-Loss-Reweighting-ICLR-2025,
    ``src/trainer.py`` (``h_func``, ``f_func_*``, ``g_func``).
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")

  def init():
    zeros = jnp.zeros((num_domains,), jnp.float32)
    return LossReweightingState(zeros, zeros, jnp.zeros((), jnp.int32))

  def update(state: LossReweightingState, inputs: MixingInputs):
    losses_B = jax.lax.stop_gradient(inputs.losses)
    batch = losses_B.shape[0]
    h_B = normalize_losses(losses_B, delta)
    f_B = strategy_scores(h_B, delta, strategy)
    r = jnp.maximum(jnp.asarray(temperature, jnp.float32), _MIN_TEMPERATURE)
    # softmax subtracts the max score first, as the repository does
    # (``g_func(f - f.max(), r)``), so a small r cannot overflow.
    reweighted_B = jax.nn.softmax(f_B / r)
    uniform_B = jnp.full((batch,), 1.0 / batch, jnp.float32)
    w_B = jnp.where(inputs.step < burn_in, uniform_B, reweighted_B).astype(jnp.float32)
    share_D = mean_sample_weights(w_B, inputs.domain_id, num_domains)
    return w_B, LossReweightingState(share_D, state.weights_sum + share_D, state.count + 1)

  return OnlineMixer(init, update, form="per_sample")
