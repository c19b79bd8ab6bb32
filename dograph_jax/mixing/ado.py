"""ADO: Adaptive Data Optimization, sampling by per-domain scaling laws fitted online.

Jiang, Zhou, Feng, Malladi, Kolter (ICLR 2025), "Adaptive Data Optimization:
Dynamic Sample Selection with Scaling Laws" (arXiv:2410.11820); the authors'
JAX code is github.com/yidingjiang/ado (``src/data_selectors/ado.py``,
``AdoSelector``; ``src/dataloader/adaptive_loader.py``; configs
``configs/loader/pile_ado.yaml``, ``configs/experiment/*_ado.yaml``). This
module follows that code (commit bc3d8d0, "Fixing update rule to the correct
version").

**Scaling laws.** For every domain ``k`` ADO fits

.. math:: \\hat L_k(n) = \\varepsilon_k + \\beta_k\\, n^{-\\alpha_k}

to its training loss, as the code does: in log space,
``log L_hat = logsumexp(a - alpha log n, e)`` with ``a = log beta``,
``e = log eps``, by minimising

.. math::

  \\sum_t \\mathrm{huber}_{10^{-3}}\\big(\\log y_t - \\log \\hat L(n_t)\\big)
  + (\\alpha - 0.8)_+ - \\min(\\alpha, 0.001) + (a - 6.5)_+ + (0.5 - e)_+

(``loss_fn``: soft bounds ``alpha in [0, 0.8]``, ``beta <= e^6.5``,
``eps >= e^0.5``) with L-BFGS (at most 200 iterations, gradient-norm tolerance
``1e-5``) from each point of the 8 x 8 x 8 grid ``a in {-2..5}``,
``e in {-2, -1.5, .., 1.5}``, ``alpha in {0, .1, .., .7}``, keeping the
start with the lowest final objective (``fit_scaling_law``). The data
``(n_t, y_t)``:

* ``y`` is the per-step mean training loss of the domain's rows (a domain
  absent from the batch repeats its previous value; at the first step the
  batch mean), smoothed by a Savitzky-Golay filter (window 101, order 3,
  scipy's ``mode="interp"``) along the steps, and subsampled to every 10th
  step from step ``ignore_steps`` on (``[ignore_steps::10]``);
* ``n`` is the number of samples seen: with the code's default
  ``use_same_step_size=True`` (``x_axis="total"``) every domain's ``n`` grows
  by the whole batch each step (``n_t = (t + 1) B``: the law is in total
  training samples, so that learning from other domains counts, and every
  domain's curve shares one axis); ``x_axis="domain"`` counts the domain's
  own rows (``use_same_step_size=False``).

The fit is refitted at steps ``t >= start_step`` with ``t % update_interval
== 0``; a fit with a NaN/inf parameter is discarded (``check_valid``).

**Policy.** From the first fit on, every step (after recording its losses):
the fitted learning speed ``-dL_hat_k/dn = alpha_k (L_hat_k(n) - eps_k) / n``
at the current ``n`` (the code bounds the exponent in this prefactor below by
0.05), the credit-assignment score ``lambda_k = h_k^s`` with ``h`` the
exponential moving average of the domains' observed shares of the batch
(``p_history``), and the prior ``mu`` (the natural proportions) give the
preference distribution

.. math::

  \\rho_k \\propto \\mu_k\\, h_k^{s}\\, \\max(\\alpha_k, 0.05)\\,
      \\frac{\\hat L_k(n_k) - \\varepsilon_k}{n_k},
  \\qquad h \\leftarrow (1 - \\gamma_1) h + \\gamma_1 \\frac{c}{\\sum c},

``c`` the step's rows per domain; ``rho`` is floored at ``delta_min`` and
renormalised (``clip_min_probability``), then smoothed in time:

.. math::

  \\pi(t) = (1 - \\gamma_2)\\, \\bar\\pi(t-1) + \\gamma_2 \\rho(t),
  \\qquad \\bar\\pi(t) = \\tfrac{t}{t+1} \\bar\\pi(t-1) + \\tfrac{1}{t+1} \\rho(t),

``bar pi`` the running average of ``rho`` (``t`` the 0-based step; ``h`` and
``bar pi`` start at ``mu``). ``pi(t)`` draws step ``t + 1``'s batch
(``state.weights``); before the first fit the batches are drawn at ``mu``.

**Mixed batches** are what the paper samples too (every row's domain drawn
from ``pi``): nothing to map.

Defaults (the authors' runs: ``pile_ado.yaml`` and the experiment configs):
``gamma1 = 0.1`` and ``gamma2 = 0.1`` (hard-coded as ``gamma = 0.9`` on the
old ``p_history`` and ``0.9 * p_avg + 0.1 * dist``), ``s = 0.5``,
``delta_min = 0.01``, ``update_interval = 1000`` (``AdoSelector``),
``ignore_steps = 1000`` (``pile_ado.yaml``), ``start_step = 500``
(``configs/experiment/*_ado.yaml``; with refits at multiples of 1000 the
first fit, and the first policy, come at step 1000). Those runs are 60k steps
of 256 or 2048 sequences of 1024 tokens on the 22 Pile domains; scale
``update_interval``/``ignore_steps``/``start_step`` with the run length.

Deviations (fixed shapes, no Python control flow on traced values):

* **Bounded history.** The code keeps every step's losses. Here a ring of
  the last ``savgol_window`` steps' losses gives the filter's values exactly
  (interior rows once their window is complete, the last ``window // 2`` rows
  at a refit by the same end-window polynomial as ``mode="interp"``), and the
  subsampled points are kept in ``(max_points, D)`` buffers; when they are
  full, every second point is dropped and the subsampling stride doubles
  (so the fit still spans the whole run, more coarsely). With the defaults
  this starts after ``ignore_steps + 10 * max_points`` steps.
* **Fewer than ``savgol_window`` steps** (a fit before step 100): the raw
  losses are used (scipy would raise).
* **L-BFGS** is written here (two-loop recursion, memory 10, a backtracking
  Armijo line search of at most 15 halvings; it stops when a line search
  finds no decrease) instead of ``jaxopt.LBFGS(tol=1e-5, maxiter=200)``
  (zoom line search, ``maxls=15``, history 10): jaxopt is kept behind
  :mod:`dograph_jax.simplex`, and optax's zoom line search compiles about 3x
  slower inside the step. On power-law curves with and without noise both
  reach the same objective to float32 precision (checked against optax's
  L-BFGS while writing this; the tests compare with scipy). ``init_grid`` may
  shrink the grid of starts (tests; not the published setting).
* **Robustness.** Non-finite losses are left out of the domain means (a
  domain whose rows are all non-finite counts as absent; at the first step,
  with no finite loss at all, it records 0 = unknown); non-finite or
  non-positive points are masked out of the fit; a domain with ``n = 0``
  (``x_axis="domain"``, never sampled) has learning speed 0; a ``rho`` that
  is not a finite distribution leaves the policy unchanged. The code would
  divide by zero or propagate NaN in these cases.
* **Sample weights** (the ``reweight`` form) are
  :func:`~dograph_jax.mixing.base.domain_to_sample_weights` of the policy
  that was meant to draw this batch (``state.weights`` before the update).

Shape legend: ``B`` batch, ``D`` human domains, ``P`` stored fit points,
``W`` the filter window, ``G`` L-BFGS starts.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dograph_jax.mixing.base import (MixingInputs, OnlineMixer, domain_counts,
                                     domain_to_sample_weights)

HUBER_DELTA = 1e-3      # loss_fn's Huber threshold (on log losses)
MIN_EXPONENT = 0.05     # curr_dist: "arbitrarily bound exponent to be >= 0.05"
LBFGS_TOL = 1e-5        # fit_scaling_law: LBFGS(tol=1e-5, maxiter=200)
LBFGS_MEMORY = 10       # jaxopt.LBFGS's history_size
LINESEARCH_STEPS = 15   # jaxopt.LBFGS's maxls
ARMIJO_C1 = 1e-4        # sufficient decrease of the line search
# fit_scaling_law's starts: a = log beta, e = log eps, alpha.
PUBLISHED_GRID = tuple(itertools.product(np.arange(-2, 6, 1.0).tolist(),
                                         np.arange(-2, 2, 0.5).tolist(),
                                         np.arange(0, 0.8, 0.1).tolist()))


class ADOState(NamedTuple):
  weights: jax.Array      # (D,) float32, pi: proportions that draw the next batch
  weights_sum: jax.Array  # (D,) float32, sum of `weights` over updates
  count: jax.Array        # () int32, number of updates (= rows recorded)
  history: jax.Array      # (D,) float32, h: EMA of the batches' domain shares (p_history)
  average: jax.Array      # (D,) float32, bar pi: running average of rho (p_avg)
  params: jax.Array       # (D, 3) float32, fitted (a, e, alpha): beta = e^a, eps = e^e
  fit_loss: jax.Array     # (D,) float32, the fit's objective at `params` (logged)
  fitted: jax.Array       # () int32, 1 once a valid fit exists
  seen: jax.Array         # (D,) float32, n: samples seen (the fit's x axis)
  last_loss: jax.Array    # (D,) float32, the last recorded loss (imputed when absent)
  ring_loss: jax.Array    # (W, D) float32, losses of the last W rows (row r at r % W)
  ring_seen: jax.Array    # (W, D) float32, n at those rows
  points_n: jax.Array     # (P, D) float32, fit points: n
  points_loss: jax.Array  # (P, D) float32, fit points: smoothed loss
  num_points: jax.Array   # () int32, points stored
  stride: jax.Array       # () int32, subsampling stride of the stored points


def scaling_law_objective(params_3: jax.Array, log_n_P: jax.Array, log_loss_P: jax.Array,
                          mask_P: jax.Array) -> jax.Array:
  """The code's ``loss_fn``: Huber(1e-3) on log losses over the masked points,
  plus the soft bounds on ``alpha``, ``a`` and ``e``."""
  a, e, alpha = params_3[0], params_3[1], params_3[2]
  pred = jnp.logaddexp(a - alpha * log_n_P, e)
  r = jnp.abs(log_loss_P - pred)
  huber = jnp.where(r > HUBER_DELTA, HUBER_DELTA * (r - 0.5 * HUBER_DELTA), 0.5 * r * r)
  data = jnp.sum(jnp.where(mask_P, huber, 0.0))
  return (data + jnp.maximum(alpha - 0.8, 0.0) - jnp.minimum(alpha, 0.001)
          + jnp.maximum(a - 6.5, 0.0) - jnp.minimum(e - 0.5, 0.0))


def _lbfgs(objective, params0: jax.Array, max_iter: int):
  """Minimises ``objective`` from ``params0`` (``(3,)``): L-BFGS (two-loop
  recursion over the last ``LBFGS_MEMORY`` pairs) with a backtracking Armijo
  line search, until the gradient's norm is at most ``LBFGS_TOL`` or
  ``max_iter`` iterations. Returns ``(params, objective(params))``."""
  value_and_grad = jax.value_and_grad(objective)
  memory = LBFGS_MEMORY

  def direction(grad, s_mem, y_mem, rho_mem, k):
    """``-H grad``, ``H`` the L-BFGS inverse-Hessian estimate (Nocedal &
    Wright, Algorithm 7.4); the pairs live in a ring, ``k`` stored so far."""
    used = jnp.minimum(k, memory)

    def newest_first(j, carry):
      q, alphas = carry
      idx = (k - 1 - j) % memory
      a = jnp.where(j < used, rho_mem[idx] * jnp.dot(s_mem[idx], q), 0.0)
      return q - a * y_mem[idx], alphas.at[idx].set(a)

    q, alphas = jax.lax.fori_loop(0, memory, newest_first,
                                  (grad, jnp.zeros((memory,), grad.dtype)))
    last = (k - 1) % memory
    gamma = jnp.where(k > 0, jnp.dot(s_mem[last], y_mem[last])
                      / jnp.dot(y_mem[last], y_mem[last]), 1.0)

    def oldest_first(j, r):
      idx = (k - used + j) % memory
      b = rho_mem[idx] * jnp.dot(y_mem[idx], r)
      return r + jnp.where(j < used, alphas[idx] - b, 0.0) * s_mem[idx]

    return -jax.lax.fori_loop(0, memory, oldest_first, gamma * q)

  def body(carry):
    params, value, grad, s_mem, y_mem, rho_mem, k, it = carry
    d = direction(grad, s_mem, y_mem, rho_mem, k)
    slope = jnp.dot(grad, d)
    # Not a descent direction (bad curvature pairs): restart from -grad.
    reset = ~(slope < 0) | ~jnp.all(jnp.isfinite(d))
    d = jnp.where(reset, -grad, d)
    slope = jnp.where(reset, -jnp.dot(grad, grad), slope)
    k = jnp.where(reset, 0, k)

    def armijo_fails(ls):
      step, trial, n = ls
      return (n < LINESEARCH_STEPS) & ~(trial <= value + ARMIJO_C1 * step * slope)

    def halve(ls):
      step, _, n = ls
      return 0.5 * step, objective(params + 0.5 * step * d), n + 1

    step, trial, _ = jax.lax.while_loop(
        armijo_fails, halve, (jnp.ones((), params.dtype), objective(params + d), 0))
    accepted = trial <= value + ARMIJO_C1 * step * slope
    new_params = jnp.where(accepted, params + step * d, params)
    new_value, new_grad = value_and_grad(new_params)
    s, y = new_params - params, new_grad - grad
    sy = jnp.dot(s, y)
    store = accepted & (sy > 1e-10)
    slot = k % memory
    s_mem = jnp.where(store, s_mem.at[slot].set(s), s_mem)
    y_mem = jnp.where(store, y_mem.at[slot].set(y), y_mem)
    rho_mem = jnp.where(store, rho_mem.at[slot].set(1.0 / jnp.where(store, sy, 1.0)), rho_mem)
    # No decrease along a descent direction: converged as far as float32 goes.
    it = jnp.where(accepted, it + 1, max_iter)
    return new_params, new_value, new_grad, s_mem, y_mem, rho_mem, k + store, it

  def cond(carry):
    return (carry[7] < max_iter) & (jnp.linalg.norm(carry[2]) > LBFGS_TOL)

  value0, grad0 = value_and_grad(params0)
  zeros = jnp.zeros((memory, params0.shape[0]), params0.dtype)
  init = (params0, value0, grad0, zeros, zeros, jnp.zeros((memory,), params0.dtype),
          jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
  params, value = jax.lax.while_loop(cond, body, init)[:2]
  return params, value


def fit_scaling_law(n_P: jax.Array, loss_P: jax.Array, mask_P: jax.Array | None = None, *,
                    grid=PUBLISHED_GRID, max_iter: int = 200) -> tuple[jax.Array, jax.Array]:
  """Fits ``L(n) = e^e + e^a n^(-alpha)`` to the masked points as the code's
  ``fit_scaling_law`` does (L-BFGS on ``scaling_law_objective`` from every
  start in ``grid``, the lowest final objective wins).

  Args:
    n_P: ``(P,)`` samples seen (> 0 where masked in).
    loss_P: ``(P,)`` losses (> 0 where masked in).
    mask_P: ``(P,)`` bool, the points to fit; ``None``: all.
    grid: ``(G, 3)`` starts ``(a, e, alpha)``.
    max_iter: L-BFGS iterations per start.

  Returns:
    ``(params (3,), objective ())``, float32; NaN if every start failed.
  """
  n_P = jnp.asarray(n_P, jnp.float32)
  loss_P = jnp.asarray(loss_P, jnp.float32)
  mask_P = jnp.ones(n_P.shape, bool) if mask_P is None else jnp.asarray(mask_P, bool)
  mask_P = mask_P & (n_P > 0) & (loss_P > 0) & jnp.isfinite(n_P) & jnp.isfinite(loss_P)
  log_n = jnp.log(jnp.where(mask_P, n_P, 1.0))
  log_loss = jnp.log(jnp.where(mask_P, loss_P, 1.0))
  objective = lambda p: scaling_law_objective(p, log_n, log_loss, mask_P)
  starts = jnp.asarray(grid, jnp.float32).reshape(-1, 3)
  params_G, values_G = jax.vmap(lambda p0: _lbfgs(objective, p0, max_iter))(starts)
  values_G = jnp.where(jnp.all(jnp.isfinite(params_G), axis=1), values_G, jnp.nan)
  best = jnp.nanargmin(values_G)
  return params_G[best], values_G[best]


def savgol_matrix(window: int, polyorder: int = 3) -> np.ndarray:
  """``(W, W)`` float64 ``E``: ``E @ y`` evaluates, at each of the window's
  ``W`` positions, the least-squares polynomial of order
  ``min(polyorder, W - 1)`` through ``y``. Row ``W // 2`` is the
  Savitzky-Golay smoothing kernel; the rows before/after it are scipy's
  ``mode="interp"`` values at the start/end of a series."""
  order = min(polyorder, window - 1)
  u = (np.arange(window) - window // 2) / max(window // 2, 1)
  vander = np.vander(u, order + 1, increasing=True)
  return vander @ np.linalg.pinv(vander)


def ado_preference(params_Dx3: jax.Array, n_D: jax.Array, prior_D: jax.Array,
                   history_D: jax.Array, s, delta_min) -> jax.Array:
  """``rho``: ``mu_k h_k^s max(alpha_k, .05) (L_hat_k(n_k) - eps_k) / n_k``
  normalised, floored at ``delta_min`` and renormalised (``(D,)``; NaN if no
  domain has a positive score)."""
  a, alpha = params_Dx3[:, 0], params_Dx3[:, 2]
  n_pos = n_D > 0
  log_n = jnp.log(jnp.where(n_pos, n_D, 1.0))
  # (L_hat - eps) / n = e^a n^(-alpha - 1), in log space (no underflow).
  log_speed = jnp.log(jnp.maximum(alpha, MIN_EXPONENT)) + a - (alpha + 1.0) * log_n
  log_speed = jnp.where(n_pos, log_speed, -jnp.inf)
  h_pos = history_D > 0
  log_credit = jnp.where(h_pos, s * jnp.log(jnp.where(h_pos, history_D, 1.0)),
                         jnp.where(s == 0, 0.0, -jnp.inf))
  rho = jax.nn.softmax(log_speed + jnp.log(prior_D) + log_credit)
  rho = jnp.maximum(rho, delta_min)
  return rho / jnp.sum(rho)


def ado(num_domains: int, *, gamma1=0.1, gamma2=0.1, s=0.5, delta_min=0.01,
        update_interval: int = 1000, start_step: int = 500, ignore_steps: int = 1000,
        subsample: int = 10, savgol_window: int = 101, max_points: int = 2048,
        max_iter: int = 200, x_axis: str = "total", prior: tuple | None = None,
        init_grid: tuple | None = None) -> OnlineMixer:
  """ADO (Jiang et al. 2025) as an :class:`OnlineMixer` in the ``sample`` form.

  Args:
    num_domains: ``D >= 2``.
    gamma1: weight of the step's domain shares in ``h`` (traced).
    gamma2: weight of ``rho`` in ``pi`` (traced).
    s: credit-assignment exponent, ``lambda = h^s`` (traced).
    delta_min: floor of ``rho`` before renormalising (traced).
    update_interval: refit at steps ``t % update_interval == 0``...
    start_step: ...with ``t >= start_step``; the policy moves from the first fit on.
    ignore_steps: rows before this are not fitted (they still enter the filter).
    subsample: fit every ``subsample``-th row.
    savgol_window: the filter's window (odd; 1 = no smoothing).
    max_points: fit points kept (``P``); more are decimated (see above).
    max_iter: L-BFGS iterations per start.
    x_axis: ``"total"`` (every domain's ``n`` is all samples seen) or
      ``"domain"`` (its own samples).
    prior: ``mu``, ``D`` positive numbers (normalised here), e.g. the natural
      proportions; ``None``: uniform.
    init_grid: L-BFGS starts ``((a, e, alpha), ...)``; ``None``: the code's
      8 x 8 x 8 grid.

  Returns:
    The mixer; ``update`` returns ``(B,)`` sample weights summing to 1.

  Raises:
    ValueError: on a bad static option.

  References:
    Jiang, Zhou, Feng, Malladi, Kolter: "Adaptive Data Optimization: Dynamic
    Sample Selection with Scaling Laws", ICLR 2025, arXiv:2410.11820,
    Algorithm 1; code: github.com/yidingjiang/ado, ``src/data_selectors/ado.py``.
  """
  if not isinstance(num_domains, int) or num_domains < 2:
    raise ValueError(f"ado needs num_domains >= 2, got {num_domains!r}")
  for name, value, low in (("update_interval", update_interval, 1), ("start_step", start_step, 0),
                           ("ignore_steps", ignore_steps, 0), ("subsample", subsample, 1),
                           ("max_points", max_points, 2), ("max_iter", max_iter, 1)):
    if not isinstance(value, int) or value < low:
      raise ValueError(f"ado: {name} must be an int >= {low}, got {value!r}")
  if not isinstance(savgol_window, int) or savgol_window < 1 or savgol_window % 2 == 0:
    raise ValueError(f"ado: savgol_window must be a positive odd int, got {savgol_window!r}")
  if x_axis not in ("total", "domain"):
    raise ValueError(f"ado: x_axis must be 'total' or 'domain', got {x_axis!r}")
  if prior is None:
    prior = (1.0,) * num_domains
  if len(prior) != num_domains or min(prior) <= 0:
    raise ValueError(f"ado: prior must hold {num_domains} positive numbers, got {prior}")
  grid = PUBLISHED_GRID if init_grid is None else init_grid
  grid_np = np.asarray(grid, np.float32).reshape(-1, 3)
  if grid_np.shape[0] < 1 or not np.all(np.isfinite(grid_np)):
    raise ValueError("ado: init_grid must hold at least one finite (a, e, alpha) start")
  prior_D = jnp.asarray(prior, jnp.float32) / sum(prior)
  window, half = savgol_window, savgol_window // 2
  smoother = jnp.asarray(savgol_matrix(window), jnp.float32)
  positions = jnp.arange(window)
  num_d, num_p = num_domains, max_points

  def init():
    zeros_d = jnp.zeros((num_d,), jnp.float32)
    return ADOState(
        weights=prior_D, weights_sum=zeros_d, count=jnp.zeros((), jnp.int32),
        history=prior_D, average=prior_D, params=jnp.zeros((num_d, 3), jnp.float32),
        fit_loss=zeros_d,
        fitted=jnp.zeros((), jnp.int32), seen=zeros_d, last_loss=zeros_d,
        ring_loss=jnp.zeros((window, num_d), jnp.float32),
        ring_seen=jnp.zeros((window, num_d), jnp.float32),
        points_n=jnp.zeros((num_p, num_d), jnp.float32),
        points_loss=jnp.zeros((num_p, num_d), jnp.float32),
        num_points=jnp.zeros((), jnp.int32), stride=jnp.asarray(subsample, jnp.int32))

  def fit_all(points_n_FxD, points_loss_FxD, mask_FxD):
    fit = lambda n, y, m: fit_scaling_law(n, y, m, grid=grid_np, max_iter=max_iter)
    return jax.vmap(fit, in_axes=1)(points_n_FxD, points_loss_FxD, mask_FxD)

  def record(state: ADOState, loss_D, seen_D):
    """Stores this row in the ring and the rows it completes as fit points;
    returns the new buffers and the fit data for a refit now."""
    row = state.count                                   # this row's index
    slot = row % window
    ring_loss = state.ring_loss.at[slot].set(loss_D)
    ring_seen = state.ring_seen.at[slot].set(seen_D)
    shift = -((row + 1) % window)
    win_loss = jnp.roll(ring_loss, shift, axis=0)       # (W, D): rows row-W+1 .. row
    win_seen = jnp.roll(ring_seen, shift, axis=0)
    rows = row - window + 1 + positions                  # (W,)
    full = row >= window - 1
    smooth = smoother @ win_loss                         # the filter at every window row

    def on_grid(stride):
      return (rows >= ignore_steps) & ((rows - ignore_steps) % stride == 0)

    # Rows final now: the window's centre; at the first full window also the
    # rows before it (the series' start, scipy's interp edge).
    final = full & ((positions == half) | ((row == window - 1) & (positions < half)))
    new = final & on_grid(state.stride)
    overflow = state.num_points + jnp.sum(new) > num_p
    keep = (num_p + 1) // 2
    thin = lambda x: jnp.zeros_like(x).at[:keep].set(x[0::2])
    points_n = jnp.where(overflow, thin(state.points_n), state.points_n)
    points_loss = jnp.where(overflow, thin(state.points_loss), state.points_loss)
    num_points = jnp.where(overflow, (state.num_points + 1) // 2, state.num_points)
    stride = jnp.where(overflow, 2 * state.stride, state.stride)
    new = final & on_grid(stride)
    slots = jnp.where(new, num_points + jnp.cumsum(new) - 1, num_p)
    points_n = points_n.at[slots].set(win_seen, mode="drop")
    points_loss = points_loss.at[slots].set(smooth, mode="drop")
    num_points = jnp.minimum(num_points + jnp.sum(new), num_p)
    # A refit also uses the rows not final yet: the end of the series (the
    # interp edge), or every row so far (raw) before the first full window.
    pending = jnp.where(full, positions > half, rows >= 0) & on_grid(stride)
    fit_n = jnp.concatenate([points_n, win_seen])
    fit_y = jnp.concatenate([points_loss, jnp.where(full, smooth, win_loss)])
    fit_mask = jnp.concatenate([jnp.arange(num_p) < num_points, pending])
    buffers = (ring_loss, ring_seen, points_n, points_loss, num_points, stride)
    return buffers, (fit_n, fit_y, fit_mask)

  def update(state: ADOState, inputs: MixingInputs):
    losses_B = jax.lax.stop_gradient(inputs.losses).astype(jnp.float32)
    domain_id = inputs.domain_id
    step = inputs.step.astype(jnp.int32)
    finite_B = jnp.isfinite(losses_B)
    kept_B = jnp.where(finite_B, losses_B, 0.0)
    sums_D = jnp.zeros((num_d,), jnp.float32).at[domain_id].add(kept_B)
    finite_D = jnp.zeros((num_d,), jnp.float32).at[domain_id].add(finite_B.astype(jnp.float32))
    num_finite = jnp.sum(finite_B)
    # 0 = no loss known yet (masked out of the fit: the fit needs y > 0).
    batch_mean = jnp.where(num_finite > 0, jnp.sum(kept_B) / jnp.maximum(num_finite, 1), 0.0)
    fallback = jnp.where(state.count == 0, batch_mean, state.last_loss)
    loss_D = jnp.where(finite_D > 0, sums_D / jnp.maximum(finite_D, 1.0), fallback)

    counts_D = domain_counts(domain_id, num_d).astype(jnp.float32)
    rows = jnp.sum(counts_D)
    seen_D = state.seen + (jnp.full((num_d,), rows) if x_axis == "total" else counts_D)
    history = (1.0 - gamma1) * state.history + gamma1 * counts_D / jnp.maximum(rows, 1.0)

    buffers, (fit_n, fit_y, fit_mask) = record(state, loss_D, seen_D)
    fit_mask = fit_mask[:, None] & jnp.isfinite(fit_y) & (fit_y > 0) & (fit_n > 0)
    refit = (step >= start_step) & (step % update_interval == 0) & jnp.all(jnp.any(fit_mask, 0))
    new_params, new_fit_loss = jax.lax.cond(
        refit, fit_all, lambda *_: (state.params, state.fit_loss), fit_n, fit_y, fit_mask)
    valid = refit & jnp.all(jnp.isfinite(new_params)) & jnp.all(jnp.isfinite(new_fit_loss))
    params = jnp.where(valid, new_params, state.params)
    fit_loss = jnp.where(valid, new_fit_loss, state.fit_loss)
    fitted = jnp.maximum(state.fitted, valid.astype(jnp.int32))

    rho = ado_preference(params, seen_D, prior_D, history, s, delta_min)
    move = (step >= start_step) & (fitted > 0) & jnp.all(jnp.isfinite(rho))
    pi = (1.0 - gamma2) * state.average + gamma2 * rho
    frac = 1.0 / (step.astype(jnp.float32) + 1.0)
    average = (1.0 - frac) * state.average + frac * rho
    weights = jnp.where(move, pi, state.weights)
    average = jnp.where(move, average, state.average)

    sample_weights = domain_to_sample_weights(state.weights, domain_id)
    ring_loss, ring_seen, points_n, points_loss, num_points, stride = buffers
    return sample_weights, ADOState(
        weights=weights, weights_sum=state.weights_sum + weights, count=state.count + 1,
        history=history, average=average, params=params, fit_loss=fit_loss, fitted=fitted,
        seen=seen_D, last_loss=loss_D, ring_loss=ring_loss, ring_seen=ring_seen, points_n=points_n,
        points_loss=points_loss, num_points=num_points, stride=stride)

  return OnlineMixer(init, update, form="sample")
