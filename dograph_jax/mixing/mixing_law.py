"""Data Mixing Laws (Ye et al., 2024): fit the law, then optimise the mixture.

Per validation domain ``i`` the loss of a model trained on mixture ``r`` is

.. math::  L_i(r) = c_i + k_i \\exp\\Big(\\sum_j t_{ij} r_j\\Big),

fitted on proxy runs (mixtures ``r_n``, per-domain validation losses
``L_{n,i}``). The final mixture minimises the predicted total loss
``sum_i w_i L_i(r)`` over the simplex. ``dograph_jax/train/methods.py`` runs the
proxy trainings; this module is the pure, host-side (numpy/scipy) maths:
:func:`fit_mixing_law`, :func:`predict_losses`, :func:`optimal_mixture`.

The reference fits each domain's law separately (``law.py``, and
``mix_5_domains.ipynb``, "linear by domains") in the parameterisation
``(log c, log k, t)`` (so ``c, k > 0``), minimising the summed Huber loss
with torch L-BFGS from a grid of 6,000 starting points and keeping the one
with the lowest training Huber loss. Its final step (``pipeline/find_opt.py``)
searches a grid of mixtures.

Shape legend: ``N`` proxy runs, ``D`` training domains (mixture
coordinates), ``M`` validation domains (usually ``M = D``).

References:
  Ye, Liu, Sun, Zhou, Zhan, Qiu. "Data Mixing Laws: Optimizing Data Mixtures
  by Predicting Language Modeling Performance", ICLR 2025, arXiv:2403.16952.
  Code: github.com/yegcjs/mixinglaws.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import optimize

from dograph_jax.mixing.base import check_mixtures

# mix_5_domains.ipynb fits the per-domain laws with Huber delta 0.05 (law.py's
# default is 0.01, the two-domain notebooks use 0.02).
HUBER_DELTA = 0.05
RESTARTS = 64
# Starting-point ranges of the reference's param_genertor (mix_5_domains.ipynb).
LOG_C_RANGE = (-2.0, 1.5)
LOG_K_RANGE = (-10.0, 1.0)
OFF_DIAGONAL_T_MAX = 0.1
# Exponents are clipped here so a wild trial step cannot overflow to inf.
_MAX_EXPONENT = 300.0


class MixingLawParams(NamedTuple):
  """Parameters of ``L_i(r) = c_i + k_i exp(t_i . r)``."""
  c: np.ndarray  # (M,) float64, irreducible loss of validation domain i (> 0)
  k: np.ndarray  # (M,) float64, scale of the reducible part (> 0)
  t: np.ndarray  # (M, D) float64, t[i, j]: effect of proportion r_j on log(L_i - c_i)


def _check_params(params: MixingLawParams) -> MixingLawParams:
  c, k, t = (np.asarray(a, np.float64) for a in params)
  if c.ndim != 1 or k.shape != c.shape or t.ndim != 2 or t.shape[0] != c.shape[0]:
    raise ValueError(f"params must have c (M,), k (M,), t (M, D); got {c.shape}, {k.shape}, "
                     f"{t.shape}")
  if not (np.all(np.isfinite(c)) and np.all(np.isfinite(k)) and np.all(np.isfinite(t))):
    raise ValueError("params contain NaN or inf")
  return MixingLawParams(c, k, t)


def predict_losses(params: MixingLawParams, mixtures_NxD) -> np.ndarray:
  """Predicted per-domain losses ``L_i(r_n)``.

  Args:
    params: a fitted (or hand-made) :class:`MixingLawParams`.
    mixtures_NxD: ``(N, D)`` mixtures.

  Returns:
    ``(N, M)`` float64, ``c + k * exp(mixtures @ t.T)``.
  """
  c, k, t = _check_params(params)
  x = check_mixtures(mixtures_NxD, num_domains=t.shape[1])
  return c[None, :] + k[None, :] * np.exp(x @ t.T)


def huber(residuals, delta: float) -> np.ndarray:
  """Elementwise Huber loss, torch's ``huber_loss`` convention:
  ``0.5 e^2`` for ``|e| <= delta``, else ``delta (|e| - delta / 2)``."""
  a = np.abs(residuals)
  return np.where(a <= delta, 0.5 * a * a, delta * (a - 0.5 * delta))


def _unpack(theta):
  return theta[0], theta[1], theta[2:]


def _residuals(theta, x_NxD, y_N):
  log_c, log_k, t_D = _unpack(theta)
  e_N = np.exp(np.minimum(log_k + x_NxD @ t_D, _MAX_EXPONENT))
  return np.exp(log_c) + e_N - y_N


def _jacobian(theta, x_NxD, y_N):
  del y_N
  log_c, log_k, t_D = _unpack(theta)
  e_N = np.exp(np.minimum(log_k + x_NxD @ t_D, _MAX_EXPONENT))
  n = x_NxD.shape[0]
  return np.concatenate([np.full((n, 1), np.exp(log_c)), e_N[:, None], e_N[:, None] * x_NxD],
                        axis=1)


def _starts(rng: np.random.Generator, x_NxD: np.ndarray, y_N: np.ndarray, own: int | None,
            restarts: int, num_linearised: int) -> list[np.ndarray]:
  """Starting points for one domain's fit.

  * ``num_linearised`` data-driven starts: for a trial ``c`` below the
    smallest loss, ``log(L - c) = log k + r . t`` is linear, so least squares
    gives ``(log k, t)``; the trial ``c`` values with the best log-space fit
    (the two-domain notebooks pick ``c`` by the correlation of ``r`` and
    ``log(L - c)`` the same way) are kept. On noiseless data one of them is
    already close to the optimum.
  * ``restarts`` random starts from the reference's ranges: ``log c`` uniform
    in [-2, 1.5], ``log k`` in [-10, 1], ``t_j`` uniform in [0, 0.1] and, for
    the domain's own proportion, in [-1, 0]. (The reference generator has this
    own-domain rule, but its notebook passes ``idx=-1`` which matches no
    domain; we use the evident intent: more of a domain lowers its loss.)
  """
  n, d = x_NxD.shape
  starts = []
  if num_linearised > 0:
    y_min = y_N.min()
    design = np.concatenate([np.ones((n, 1)), x_NxD], axis=1)
    scored = []
    for q in np.linspace(0.0, 0.99, 34):
      c = max(q * y_min, 1e-6 * abs(y_min))
      if not c < y_min:
        continue
      target = np.log(y_N - c)
      coef, *_ = np.linalg.lstsq(design, target, rcond=None)
      rss = float(np.sum((design @ coef - target) ** 2))
      tss = float(np.sum((target - target.mean()) ** 2))
      score = rss / tss if tss > 0 else rss
      scored.append((score, np.concatenate([[np.log(c), coef[0]], coef[1:]])))
    scored.sort(key=lambda s: s[0])
    starts += [theta for _, theta in scored[:num_linearised]]
  for _ in range(restarts):
    t_D = rng.uniform(0.0, OFF_DIAGONAL_T_MAX, size=d)
    if own is not None:
      t_D[own] = -rng.uniform(0.0, 1.0)
    starts.append(np.concatenate([[rng.uniform(*LOG_C_RANGE), rng.uniform(*LOG_K_RANGE)], t_D]))
  return starts


def fit_mixing_law(mixtures_NxD, losses_NxM, *, restarts: int = RESTARTS, seed: int = 0,
                   huber_delta: float | None = HUBER_DELTA, num_linearised: int = 4,
                   max_nfev: int | None = None) -> MixingLawParams:
  """Fits one mixing law per validation domain, the reference's way.

  For each validation domain ``i`` it minimises
  ``sum_n huber(c_i + k_i exp(t_i . r_n) - L_{n,i}, delta)`` over
  ``(log c_i, log k_i, t_i)`` (``c, k > 0`` by construction) from several
  starts and keeps the start whose fit has the lowest training objective, as
  the reference does. Solver: :func:`scipy.optimize.least_squares` (trust
  region reflective, analytic Jacobian, ``loss="huber"`` with
  ``f_scale=huber_delta``, whose objective equals the summed torch Huber loss
  the reference minimises with L-BFGS). Starts: ``num_linearised``
  data-driven ones plus ``restarts`` random ones (see the module's
  ``_starts``); the reference's 6,000 L-BFGS starts are unaffordable and
  unnecessary with the data-driven starts.

  The parameters are not identifiable on the simplex (``log k + a`` with
  ``t - a`` gives the same law for any ``a``); the predictions are.

  Args:
    mixtures_NxD: ``(N, D)`` proxy mixtures (rows on the simplex).
    losses_NxM: ``(N, M)`` validation losses, column ``i`` for validation
      domain ``i`` (usually the ``M = D`` training domains; then column ``i``
      must be training domain ``i``, whose random starts get ``t_ii < 0``).
    restarts: random starts per domain.
    seed: seeds the random starts.
    huber_delta: Huber threshold in loss units (reference 0.05); ``None``
      gives plain least squares.
    num_linearised: data-driven starts per domain.
    max_nfev: function evaluations per start (scipy's default if ``None``).

  Returns:
    :class:`MixingLawParams` with ``c (M,)``, ``k (M,)``, ``t (M, D)``.

  Raises:
    ValueError: bad shapes, NaN/inf, a non-positive loss, or fewer than
      ``D + 1`` runs (the law has ``D + 1`` identifiable parameters per
      domain, so fewer runs leave it undetermined).
  """
  x = check_mixtures(mixtures_NxD)
  n, d = x.shape
  y = np.asarray(losses_NxM, np.float64)
  if y.ndim == 1:
    raise ValueError(f"losses_NxM must have shape ({n}, M); for one domain pass shape ({n}, 1)")
  if y.ndim != 2 or y.shape[0] != n or y.shape[1] < 1:
    raise ValueError(f"losses_NxM must have shape ({n}, M), got {y.shape}")
  if not np.all(np.isfinite(y)):
    raise ValueError("losses_NxM contains NaN or inf")
  if np.any(y <= 0):
    raise ValueError("losses must be > 0 (the law is c + k exp(.) with c, k > 0)")
  if n < d + 1:
    raise ValueError(f"need at least D + 1 = {d + 1} proxy runs to fit the law, got {n}")
  if huber_delta is not None and not huber_delta > 0:
    raise ValueError(f"huber_delta must be > 0 or None, got {huber_delta}")
  if restarts < 0 or num_linearised < 0 or restarts + num_linearised < 1:
    raise ValueError("need at least one start (restarts + num_linearised >= 1)")
  m = y.shape[1]
  rng = np.random.default_rng(seed)
  c_M, k_M, t_MxD = np.empty(m), np.empty(m), np.empty((m, d))
  for i in range(m):
    y_N = y[:, i]
    own = i if m == d else None
    best, best_obj = None, np.inf
    for theta0 in _starts(rng, x, y_N, own, restarts, num_linearised):
      if huber_delta is None:
        sol = optimize.least_squares(_residuals, theta0, jac=_jacobian, args=(x, y_N),
                                     method="trf", max_nfev=max_nfev)
      else:
        sol = optimize.least_squares(_residuals, theta0, jac=_jacobian, args=(x, y_N),
                                     method="trf", loss="huber", f_scale=huber_delta,
                                     max_nfev=max_nfev)
      res = _residuals(sol.x, x, y_N)
      obj = (0.5 * np.sum(res ** 2) if huber_delta is None
             else float(np.sum(huber(res, huber_delta))))
      if np.all(np.isfinite(sol.x)) and obj < best_obj:
        best, best_obj = sol.x, obj
    if best is None:
      raise ValueError(f"every start diverged for validation domain {i}")
    log_c, log_k, t_D = _unpack(best)
    c_M[i], k_M[i], t_MxD[i] = np.exp(log_c), np.exp(log_k), t_D
  return MixingLawParams(c_M, k_M, t_MxD)


def optimal_mixture(params: MixingLawParams, *, target_weights=None, upper_bounds=None,
                    seed: int = 0, num_random_starts: int = 4096) -> np.ndarray:
  """The mixture minimising the predicted total loss ``sum_i w_i L_i(r)``.

  Each ``L_i`` is ``c_i`` plus a positive multiple of the exponential of an
  affine function of ``r``, hence convex; with ``w >= 0`` the objective is
  convex on the simplex and a local solver finds the global minimum. Solver:
  :func:`scipy.optimize.minimize` with ``method="SLSQP"`` (analytic gradient,
  ``sum r = 1`` as an equality, ``0 <= r_j <= upper_j`` as bounds), started
  from the uniform mixture and from the best of ``num_random_starts`` flat
  Dirichlet draws; the best result is returned, clipped and renormalised.
  (The reference searches a grid of mixtures instead, ``find_opt.py``.)

  Args:
    params: the law, ``c (M,)``, ``k (M,)``, ``t (M, D)``.
    target_weights: ``(M,)`` non-negative weights of the validation domains
      in the target loss; default uniform ``1/M``.
    upper_bounds: optional ``(D,)`` caps on each proportion (e.g. data
      availability, like the reference's ``max_size``); must sum to >= 1.
    seed: seeds the random starts.
    num_random_starts: flat Dirichlet draws screened for the second start.

  Returns:
    ``(D,)`` float64 mixture (``>= 0``, sums to 1).
  """
  c, k, t = _check_params(params)
  if np.any(k < 0):
    raise ValueError("k must be >= 0 (a fitted law always has k > 0)")
  m, d = t.shape
  if target_weights is None:
    w_M = np.full(m, 1.0 / m)
  else:
    w_M = np.asarray(target_weights, np.float64)
    if w_M.shape != (m,):
      raise ValueError(f"target_weights must have shape ({m},), got {w_M.shape}")
    if not np.all(np.isfinite(w_M)) or np.any(w_M < 0) or not w_M.sum() > 0:
      raise ValueError("target_weights must be finite, >= 0 and not all 0")
  if upper_bounds is None:
    ub_D = np.ones(d)
  else:
    ub_D = np.asarray(upper_bounds, np.float64)
    if ub_D.shape != (d,) or not np.all(np.isfinite(ub_D)) or np.any(ub_D < 0):
      raise ValueError(f"upper_bounds must be ({d},), finite and >= 0")
    ub_D = np.minimum(ub_D, 1.0)
    if ub_D.sum() < 1.0:
      raise ValueError("upper_bounds sum to < 1: no feasible mixture")
  # Only the reducible part depends on r; c is a constant of the objective.
  wk_M = w_M * k
  scale = max(float(np.sum(wk_M)), 1e-300)  # keeps SLSQP's tolerances meaningful

  def objective(r_D):
    e_M = np.exp(np.minimum(t @ r_D, _MAX_EXPONENT))
    return float(wk_M @ e_M) / scale

  def gradient(r_D):
    e_M = np.exp(np.minimum(t @ r_D, _MAX_EXPONENT))
    return (wk_M * e_M) @ t / scale

  def project(r_D):
    r_D = np.clip(r_D, 0.0, ub_D)
    return r_D / r_D.sum()

  rng = np.random.default_rng(seed)
  uniform = project(np.minimum(np.full(d, 1.0 / d), ub_D))
  starts = [uniform]
  if num_random_starts > 0:
    cand = rng.dirichlet(np.ones(d), size=num_random_starts)
    cand = cand[np.all(cand <= ub_D, axis=1)]
    if cand.shape[0]:
      starts.append(cand[np.argmin(np.exp(np.minimum(cand @ t.T, _MAX_EXPONENT)) @ wk_M)])
  constraint = {"type": "eq", "fun": lambda r: np.sum(r) - 1.0, "jac": lambda r: np.ones_like(r)}
  best, best_obj = None, np.inf
  for r0 in starts:
    sol = optimize.minimize(objective, r0, jac=gradient, method="SLSQP",
                            bounds=list(zip(np.zeros(d), ub_D)), constraints=[constraint],
                            options={"ftol": 1e-15, "maxiter": 1000})
    r_D = project(sol.x) if np.all(np.isfinite(sol.x)) and sol.x.sum() > 0 else r0
    obj = objective(r_D)
    if obj < best_obj:
      best, best_obj = r_D, obj
  return best
