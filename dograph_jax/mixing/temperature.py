"""Temperature sampling: ``p_d ∝ n_d^(1/T)``, optionally with an epoch cap.

The standard mixture of multilingual pretraining (Arivazhagan et al. 2019,
"Massively Multilingual Neural Machine Translation in the Wild"; XLM-R, mT5):
``n_d`` is domain ``d``'s size (here its training rows), ``T = 1`` gives the
natural proportions, ``T -> infinity`` the uniform (stratified) ones, and
``0 < T < 1`` sharpens toward the largest domains.

The epoch cap follows UniMax (Chung et al. 2023, "UniMax: Fairer and More
Effective Language Sampling for Large-Scale Multilingual Pretraining"): no
domain may be repeated more than ``max_epochs`` times within the training
budget of ``budget`` rows, i.e. ``p_d <= max_epochs * n_d / budget``. UniMax
fills the budget uniformly up to the caps; here the *temperature*
proportions are filled up to the caps instead (``T = inf`` is UniMax
itself): the capped domains sit at their cap and the remaining mass is
shared among the others in proportion to ``n_d^(1/T)``, repeated until no
share exceeds its cap (water-filling, at most ``D`` rounds).

Host-side numpy: the proportions are fixed before the run (an offline method).
"""

from __future__ import annotations

import math

import numpy as np


def temperature_proportions(sizes_D, T: float = 1.0, max_epochs: float = 0.0,
                            budget: float | None = None) -> np.ndarray:
  """``(D,)`` float64 sampling proportions ``∝ sizes^(1/T)``, capped.

  Args:
    sizes_D: ``(D,)`` positive domain sizes (rows or tokens).
    T: temperature, ``> 0``; ``math.inf`` gives the uniform mixture.
    max_epochs: ``0`` for no cap; otherwise each domain's share is at most
      ``max_epochs * size / budget`` (UniMax's cap on repetitions).
    budget: what the run consumes, in the unit of ``sizes_D`` (needed with
      a cap).

  Raises:
    ValueError: a non-positive size or temperature, a negative cap, a cap
      without a budget, or caps that cannot hold the budget
      (``max_epochs * sum(sizes) < budget``).
  """
  sizes = np.asarray(sizes_D, np.float64)
  if sizes.ndim != 1 or sizes.size < 1 or not np.all(np.isfinite(sizes)) or np.any(sizes <= 0):
    raise ValueError(f"temperature sampling needs positive finite domain sizes, got {sizes_D}")
  if not T > 0:
    raise ValueError(f"temperature T must be > 0, got {T}")
  if max_epochs < 0:
    raise ValueError(f"max_epochs must be >= 0 (0 = no cap), got {max_epochs}")
  # In logs, so that large sizes at small T do not overflow.
  logits = np.zeros_like(sizes) if math.isinf(T) else np.log(sizes) / T
  base = np.exp(logits - logits.max())
  base /= base.sum()
  if max_epochs == 0:
    return base
  if budget is None or not budget > 0:
    raise ValueError(f"an epoch cap needs the run's budget (> 0), got {budget}")
  cap = max_epochs * sizes / budget
  if cap.sum() < 1.0 - 1e-12:
    raise ValueError(f"max_epochs={max_epochs}: the domains hold {sizes.sum():g} and the run "
                     f"needs {budget:g}; even at the cap every domain would be repeated more "
                     f"than {max_epochs} times (raise max_epochs or use more data)")
  capped = np.zeros(sizes.shape, bool)
  p = base
  for _ in range(sizes.size):
    over = (p > cap + 1e-15) & ~capped
    if not over.any():
      break
    capped |= over
    free = 1.0 - cap[capped].sum()
    rest = np.where(capped, 0.0, base)
    p = np.where(capped, cap, free * rest / rest.sum() if rest.sum() > 0 else 0.0)
  return p
