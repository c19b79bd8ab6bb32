"""RegMix: data mixture as regression (Liu et al., 2024), the fitting half.

RegMix trains many small proxy models, each on a randomly drawn mixture,
regresses a validation loss on the mixture, and picks the final mixture by
simulation: predict the loss of many random candidate mixtures and average the
``top_k`` best. This module holds the three pure, host-side (numpy) steps;
``dograph_jax/train/methods.py`` runs the proxy trainings between them:

1. :func:`sample_mixtures` draws the proxy mixtures
   (``mixture_config/synthesize_mixture.py`` in the reference repository);
2. :func:`fit_regression` fits ``loss ~ f(mixture)`` (``regression.ipynb``,
   "Fitting");
3. :func:`top_k_mixture` simulates and averages the best candidates
   (``regression.ipynb``, "Simulate").

Dependencies: RegMix uses LightGBM, which is not installed here. ``"gbm"`` is
scikit-learn's :class:`~sklearn.ensemble.HistGradientBoostingRegressor`, the
histogram GBDT of the LightGBM family, configured like the repository's
LightGBM call (see :func:`fit_regression`); ``"linear"`` is scikit-learn's
ordinary least squares :class:`~sklearn.linear_model.LinearRegression` (the
paper's linear-regression variant).

Shape legend: ``N`` proxy runs (mixtures), ``D`` training domains, ``C``
candidate mixtures, ``S`` Dirichlet concentration scales.

References:
  Liu, Zheng, Muennighoff, Zeng, Dou, Pang, Jiang, Lin. "RegMix: Data Mixture
  as Regression for Language Model Pre-training", ICLR 2025, arXiv:2407.01492.
  Code: github.com/sail-sg/regmix.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import numpy as np
import threadpoolctl

from dograph_jax.mixing.base import check_mixtures

# Reference defaults (sail-sg/regmix, mixture_config/synthesize_mixture.py).
TEMPERATURE = 0.5        # the proposal is centred on prior**0.5 (renormalised)
MIN_STRENGTH = 0.1       # smallest Dirichlet concentration scale
MAX_STRENGTH = 5.0       # largest
NUM_STRENGTHS = 15       # log-spaced scales between the two
MINIMUM = 2e-4           # weights below this are zeroed; the rest rounded to this grid
MAX_USAGE = 15.0         # a domain may not be repeated more than this many epochs
SAMPLE_MULTIPLIER = 100  # proposals drawn per requested mixture (rejection, dedup)
# Reference defaults of the simulation step (regression.ipynb).
NUM_CANDIDATES = 100_000
TOP_K = 128
# LightGBM's call in regression.ipynb: gbdt, L2 objective, 1000 rounds, lr 0.01,
# seed 42, early stopping after 3 rounds without improvement on a held-out set;
# LightGBM defaults num_leaves 31, min_data_in_leaf 20, max_bin 255.
GBM_DEFAULTS = dict(loss="squared_error", learning_rate=1e-2, max_iter=1000,
                    max_leaf_nodes=31, max_bins=255, l2_regularization=0.0)
GBM_PATIENCE = 3


def _rng(key_or_seed) -> np.random.Generator:
  """A numpy ``Generator`` from an int seed, a numpy ``Generator`` (used as
  is, so it advances) or a JAX PRNG key (raw ``uint32`` or typed)."""
  if isinstance(key_or_seed, np.random.Generator):
    return key_or_seed
  if isinstance(key_or_seed, (int, np.integer)) and not isinstance(key_or_seed, bool):
    if key_or_seed < 0:
      raise ValueError(f"seed must be non-negative, got {key_or_seed}")
    return np.random.default_rng(int(key_or_seed))
  try:
    import jax  # pylint: disable=import-outside-toplevel
    if jax.dtypes.issubdtype(key_or_seed.dtype, jax.dtypes.prng_key):
      key_or_seed = jax.random.key_data(key_or_seed)
  except (ImportError, AttributeError):
    pass
  words = np.asarray(key_or_seed)
  if words.dtype != np.uint32 or words.ndim != 1:
    raise ValueError("key_or_seed must be an int seed, a numpy Generator or a "
                     f"JAX PRNG key; got {type(key_or_seed).__name__} {words.dtype}")
  return np.random.default_rng([int(w) for w in words])


def _check_prior(prior_D) -> np.ndarray:
  prior_D = np.asarray(prior_D, np.float64)
  if prior_D.ndim != 1 or prior_D.shape[0] < 2:
    raise ValueError(f"prior_D must have shape (D,) with D >= 2, got {prior_D.shape}")
  if not np.all(np.isfinite(prior_D)) or np.any(prior_D <= 0):
    # A zero prior gives a zero Dirichlet concentration (undefined).
    raise ValueError(f"prior_D must be finite and > 0, got {prior_D}")
  return prior_D / prior_D.sum()


def _check_losses(losses_N, n: int) -> np.ndarray:
  y = np.asarray(losses_N, np.float64)
  if y.shape != (n,):
    raise ValueError(f"losses_N must have shape ({n},), got {y.shape}")
  if not np.all(np.isfinite(y)):
    raise ValueError("losses_N contains NaN or inf")
  return y


def _round_to_grid(x_NxD: np.ndarray, units: int) -> np.ndarray:
  """Integer units ``(N, D)`` summing to ``units`` per row: largest-remainder
  rounding of ``x * units`` (the repository rounds each weight to the nearest
  grid point, so its rows can miss a sum of 1 by up to ``D/2`` grid steps;
  this rounding keeps the grid and the sum exactly)."""
  scaled = x_NxD * units
  base = np.floor(scaled + 1e-9).astype(np.int64)  # +1e-9: 0.9999999 of a unit is a unit
  remainder = scaled - base
  deficit = units - base.sum(axis=1)               # in [0, D) by construction
  order = np.argsort(-remainder, axis=1, kind="stable")
  rank = np.argsort(order, axis=1, kind="stable")
  return base + (rank < deficit[:, None])


def _proposals(rng: np.random.Generator, prior_D: np.ndarray, num: int, *, temperature: float,
               min_strength: float, max_strength: float, num_strengths: int,
               minimum: float, max_usage: float | None) -> tuple[np.ndarray, np.ndarray]:
  """``num`` processed Dirichlet proposals ``(num, D)`` and their accept mask.

  One proposal: pick a concentration scale ``s`` uniformly among
  ``num_strengths`` log-spaced values in ``[min_strength, max_strength]``,
  draw ``Dirichlet(s * prior**temperature / Z)``, reject it if a weight
  exceeds ``min(max_usage * prior, 1)``, zero weights below ``minimum``,
  renormalise and round to the ``minimum`` grid. (The repository draws one
  sample at each of the 15 scales and keeps one at random: the same
  distribution.)
  """
  centre_D = prior_D ** temperature
  centre_D = centre_D / centre_D.sum()
  if min_strength == max_strength:
    strengths_S = np.array([min_strength])
  else:
    strengths_S = np.logspace(np.log10(min_strength), np.log10(max_strength), num_strengths)
  which_N = rng.integers(0, strengths_S.shape[0], size=num)
  x = np.empty((num, prior_D.shape[0]))
  for s, strength in enumerate(strengths_S):
    rows = np.flatnonzero(which_N == s)
    # numpy's dirichlet switches to a stick-breaking sampler for tiny
    # concentrations (prior 3% x scale 0.1), where gamma draws underflow.
    x[rows] = rng.dirichlet(strength * centre_D, size=rows.shape[0])
  accept = np.all(np.isfinite(x), axis=1)
  x = np.where(np.isfinite(x), x, 0.0)
  # The bound uses the raw (untempered) prior, as the repository does: it is
  # about how many tokens a domain really has.
  bound_D = np.ones_like(prior_D) if max_usage is None else np.minimum(prior_D * max_usage, 1.0)
  accept &= np.all(x <= bound_D, axis=1)
  if minimum > 0:
    x = np.where(x < minimum, 0.0, x)
    total = x.sum(axis=1, keepdims=True)
    accept &= total[:, 0] > 0
    x = x / np.where(total > 0, total, 1.0)
    units = int(round(1.0 / minimum))
    x = _round_to_grid(x, units) / units
    # Zeroing small weights inflates the others; keep the bound a guarantee.
    accept &= np.all(x <= bound_D + 1e-12, axis=1)
  return x, accept


def _check_sampler_args(temperature, min_strength, max_strength, num_strengths, minimum,
                        max_usage, prior_D):
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  if not 0 < min_strength <= max_strength:
    raise ValueError(f"need 0 < min_strength <= max_strength, got {min_strength}, {max_strength}")
  if num_strengths < 1:
    raise ValueError(f"num_strengths must be >= 1, got {num_strengths}")
  if minimum < 0 or minimum >= 1.0 / prior_D.shape[0]:
    raise ValueError(f"minimum must be in [0, 1/D), got {minimum}")
  if minimum > 0 and abs(1.0 / minimum - round(1.0 / minimum)) > 1e-6 * (1.0 / minimum):
    raise ValueError(f"1/minimum must be an integer (it sets the rounding grid), got {minimum}")
  if max_usage is not None:
    if not max_usage > 0:
      raise ValueError(f"max_usage must be > 0 or None, got {max_usage}")
    if np.minimum(prior_D * max_usage, 1.0).sum() < 1.0:
      raise ValueError(f"max_usage={max_usage} leaves no feasible mixture "
                       "(the per-domain caps min(max_usage * prior, 1) sum to < 1)")


def sample_mixtures(key_or_seed, prior_D, num_mixtures: int, *,
                    temperature: float = TEMPERATURE,
                    min_strength: float = MIN_STRENGTH,
                    max_strength: float = MAX_STRENGTH,
                    num_strengths: int = NUM_STRENGTHS,
                    minimum: float = MINIMUM,
                    max_usage: float | None = MAX_USAGE,
                    sample_multiplier: int = SAMPLE_MULTIPLIER) -> np.ndarray:
  """Draws ``num_mixtures`` distinct proxy-training mixtures, RegMix's way.

  The reference's ``generate_weights_dirichlet``, step by step:

  1. centre: ``p = prior**temperature / Z`` (``temperature=0.5`` flattens a
     skewed token prior);
  2. draw ``num_mixtures * sample_multiplier`` proposals
     ``Dirichlet(s * p)``, ``s`` uniform over ``num_strengths`` log-spaced
     scales in ``[min_strength, max_strength]`` (small ``s``: near-vertex
     mixtures, large ``s``: close to ``p``);
  3. reject a proposal if any weight exceeds ``min(max_usage * prior, 1)``
     (no domain repeated more than ``max_usage`` epochs when the final run
     has as many tokens as the prior was measured on);
  4. zero weights below ``minimum``, renormalise, round to multiples of
     ``minimum``;
  5. deduplicate, then keep ``num_mixtures`` at random.

  Every Dirichlet proposal has mean ``p`` whatever its scale, so without the
  bound and the rounding the mixtures are centred on ``prior**temperature``;
  the bound (which cuts the large-weight tail of the small domains) and the
  zeroing pull the mean away from ``p`` a little.

  Differences from the reference, all small: rounding is largest-remainder
  (rows sum to exactly 1; the reference's nearest-grid rounding does not
  renormalise), the bound is also re-checked after rounding, deduplication is
  exact on the grid (the reference compares neighbours after a lexicographic
  sort, L1 < 1e-5), and ``temperature`` applies whatever its value (the
  reference applies its module constant only when the argument is < 1).

  Args:
    key_or_seed: int seed, numpy ``Generator`` or JAX PRNG key; the same
      value gives the same mixtures.
    prior_D: ``(D,)`` positive token shares of the domains (any scale).
    num_mixtures: how many mixtures (proxy runs); reference 512.
    temperature: exponent on the prior before centring; reference 0.5.
    min_strength, max_strength, num_strengths: Dirichlet scale range;
      reference 0.1, 5.0, 15.
    minimum: smallest non-zero weight and rounding grid (``1/minimum`` must be
      an integer); 0 disables zeroing and rounding. Reference 2e-4.
    max_usage: epoch cap behind the rejection bound; ``None`` disables it.
      Reference 15.
    sample_multiplier: proposals per requested mixture; reference 100.

  Returns:
    ``(num_mixtures, D)`` float64, every row ``>= 0`` summing to 1, no two rows
    equal.

  Raises:
    ValueError: bad arguments, or fewer distinct accepted proposals than
      ``num_mixtures`` (raise ``sample_multiplier`` or loosen the bound).
  """
  prior_D = _check_prior(prior_D)
  _check_sampler_args(temperature, min_strength, max_strength, num_strengths, minimum,
                      max_usage, prior_D)
  if num_mixtures < 1 or sample_multiplier < 1:
    raise ValueError(f"num_mixtures and sample_multiplier must be >= 1, got "
                     f"{num_mixtures}, {sample_multiplier}")
  rng = _rng(key_or_seed)
  x, accept = _proposals(rng, prior_D, num_mixtures * sample_multiplier,
                         temperature=temperature, min_strength=min_strength,
                         max_strength=max_strength, num_strengths=num_strengths,
                         minimum=minimum, max_usage=max_usage)
  x = x[accept]
  if minimum > 0:
    # Rows are exact multiples of 1/units: deduplicate on the integers.
    units = int(round(1.0 / minimum))
    _, first = np.unique(np.rint(x * units).astype(np.int64), axis=0, return_index=True)
  else:
    _, first = np.unique(x, axis=0, return_index=True)
  unique_UxD = x[np.sort(first)]
  if unique_UxD.shape[0] < num_mixtures:
    raise ValueError(f"only {unique_UxD.shape[0]} distinct accepted mixtures out of "
                     f"{num_mixtures * sample_multiplier} proposals, {num_mixtures} asked; "
                     "raise sample_multiplier or max_usage")
  pick = rng.choice(unique_UxD.shape[0], size=num_mixtures, replace=False)
  return unique_UxD[pick]


@dataclasses.dataclass(frozen=True)
class RegressionPredictor:
  """A fitted ``loss ~ f(mixture)`` regression.

  Attributes:
    model: the fitted scikit-learn estimator.
    kind: ``"linear"`` or ``"gbm"``.
    num_domains: ``D``, checked on every prediction.
    num_threads: OpenMP threads for the GBM's ``predict`` (``None``:
      scikit-learn's default).
  """
  model: Any
  kind: str
  num_domains: int
  num_threads: int | None = 1

  def predict(self, mixtures_NxD) -> np.ndarray:
    """``(N,)`` predicted losses of ``mixtures_NxD (N, D)``."""
    x = check_mixtures(mixtures_NxD, num_domains=self.num_domains)
    with threadpoolctl.threadpool_limits(limits=self.num_threads, user_api="openmp"):
      return np.asarray(self.model.predict(x), np.float64)

  __call__ = predict


def fit_regression(mixtures_NxD, losses_N, *, model: str = "linear",
                   eval_set: tuple[Any, Any] | None = None, seed: int = 42,
                   num_threads: int | None = 1, **gbm_kwargs) -> RegressionPredictor:
  """Fits RegMix's regression of a validation loss on the mixture.

  ``"linear"``: :class:`sklearn.linear_model.LinearRegression` (ordinary least
  squares with an intercept). The features sum to 1, so the intercept and the
  coefficients are not separately identifiable; predictions on the simplex
  are, and equal the least-squares projection.

  ``"gbm"``: :class:`sklearn.ensemble.HistGradientBoostingRegressor` standing
  in for the reference's ``lightgbm.LGBMRegressor`` (not installed here),
  with the reference's settings: squared-error objective, learning rate 0.01,
  1000 rounds, 31 leaves, 255 bins, seed 42; with ``eval_set`` it stops after
  3 rounds without improvement of the L2 loss on that set (the reference
  early-stops on its held-out mixtures), without it all 1000 rounds run.
  LightGBM's ``min_data_in_leaf=20`` was tuned for 512 proxy runs; below 200
  runs the default here is ``max(2, N // 10)`` so that trees can split at all
  (a leaf of 20 needs 40 runs for one split). Any of these can be overridden
  through ``gbm_kwargs``. A GBM on a handful of runs is weak; prefer
  ``"linear"`` when ``N`` is small.

  Args:
    mixtures_NxD: ``(N, D)`` proxy mixtures (rows on the simplex).
    losses_N: ``(N,)`` the target: one validation loss per proxy run (the
      caller chooses which, e.g. the mean of per-domain losses).
    model: ``"linear"`` or ``"gbm"``.
    eval_set: optional ``(mixtures_MxD, losses_M)`` held-out runs for the
      GBM's early stopping (needs scikit-learn >= 1.7).
    seed: GBM random state (reference 42).
    num_threads: OpenMP threads for the GBM's fit and predict. Default 1: on
      a few hundred rows threads only add synchronisation, and on a shared
      host scikit-learn's default threading made the fit 17x and the
      prediction of 4,000 candidates 40x slower than one thread. ``None``
      keeps scikit-learn's default.
    **gbm_kwargs: overrides of the ``HistGradientBoostingRegressor`` settings.

  Returns:
    A :class:`RegressionPredictor`; ``predictor.predict(mixtures) -> (N,)``.
  """
  x = check_mixtures(mixtures_NxD)
  n, d = x.shape
  y = _check_losses(losses_N, n)
  if n < 2:
    raise ValueError(f"need at least 2 proxy runs to fit, got {n}")
  if model == "linear":
    if gbm_kwargs or eval_set is not None:
      raise ValueError("eval_set and gbm_kwargs apply to model='gbm' only")
    from sklearn.linear_model import LinearRegression  # pylint: disable=import-outside-toplevel
    est = LinearRegression(fit_intercept=True).fit(x, y)
    return RegressionPredictor(est, "linear", d)
  if model != "gbm":
    raise ValueError(f"model must be 'linear' or 'gbm', got {model!r}")
  from sklearn.ensemble import HistGradientBoostingRegressor  # pylint: disable=import-outside-toplevel
  settings = dict(GBM_DEFAULTS, min_samples_leaf=min(20, max(2, n // 10)), random_state=seed)
  fit_kwargs = {}
  if eval_set is not None:
    x_val = check_mixtures(eval_set[0], "eval_set mixtures", num_domains=d)
    y_val = _check_losses(eval_set[1], x_val.shape[0])
    if "X_val" not in inspect.signature(HistGradientBoostingRegressor.fit).parameters:
      raise ValueError("eval_set needs scikit-learn >= 1.7 (fit(..., X_val, y_val))")
    settings.update(early_stopping=True, n_iter_no_change=GBM_PATIENCE, scoring="loss")
    fit_kwargs = dict(X_val=x_val, y_val=y_val)
  else:
    settings.update(early_stopping=False)
  settings.update(gbm_kwargs)
  with threadpoolctl.threadpool_limits(limits=num_threads, user_api="openmp"):
    est = HistGradientBoostingRegressor(**settings).fit(x, y, **fit_kwargs)
  return RegressionPredictor(est, "gbm", d, num_threads)


def _candidates(rng: np.random.Generator, prior_D: np.ndarray, num: int, scheme: str,
                sampler_kwargs: dict) -> np.ndarray:
  if scheme == "notebook":
    # regression.ipynb: np.random.dirichlet(prior_dist * 1, 100000) on the
    # raw (untempered) prior, no bound, no rounding.
    x = rng.dirichlet(prior_D, size=num)
    return x[np.all(np.isfinite(x), axis=1)]
  chunks, have = [], 0
  for _ in range(1000):  # rejection rounds; the acceptance rate is checked below
    x, accept = _proposals(rng, prior_D, max(num - have, 1024), **sampler_kwargs)
    chunks.append(x[accept])
    have += int(accept.sum())
    if have >= num:
      return np.concatenate(chunks)[:num]
  raise ValueError(f"only {have} of {num} candidates accepted after 1000 rounds; "
                   "the max_usage bound rejects almost every proposal")


def top_k_mixture(predictor: Any | Callable[[np.ndarray], np.ndarray], key_or_seed, prior_D, *,
                  num_candidates: int = NUM_CANDIDATES, top_k: int = TOP_K,
                  candidates: str = "proposal",
                  temperature: float = TEMPERATURE,
                  min_strength: float = MIN_STRENGTH,
                  max_strength: float = MAX_STRENGTH,
                  num_strengths: int = NUM_STRENGTHS,
                  minimum: float = MINIMUM,
                  max_usage: float | None = MAX_USAGE,
                  chunk_size: int = 65_536) -> np.ndarray:
  """RegMix's final step: the mean of the ``top_k`` best predicted candidates.

  Draws ``num_candidates`` random mixtures, predicts their loss, and averages
  the ``top_k`` lowest (averaging smooths the regressor's noise: a single
  argmin would chase it). The reference notebook uses 100,000 candidates and
  ``k = 128``; these are the defaults (no rescaling needed: predicting
  100,000 candidates takes milliseconds with the linear model and a few
  seconds with a 1,000-tree GBM on one thread).

  Candidates: ``"proposal"`` (default) draws them exactly like
  :func:`sample_mixtures` (tempered prior, scale range, bound, rounding, no
  deduplication), so they lie where the regressor saw training data;
  ``"notebook"`` reproduces the reference notebook's simulation,
  ``Dirichlet(prior)`` on the raw prior at scale 1 with no bound.

  Args:
    predictor: a :class:`RegressionPredictor`, anything with
      ``predict(mixtures_CxD) -> (C,)``, or such a callable.
    key_or_seed: int seed, numpy ``Generator`` or JAX PRNG key.
    prior_D: ``(D,)`` positive token shares of the domains.
    num_candidates: candidates to simulate; reference 100,000.
    top_k: how many of the best to average; reference 128.
    candidates: ``"proposal"`` or ``"notebook"``.
    temperature, min_strength, max_strength, num_strengths, minimum,
      max_usage: as in :func:`sample_mixtures` (``"proposal"`` only).
    chunk_size: candidates per ``predict`` call (bounds memory).

  Returns:
    ``(D,)`` float64 mixture (``>= 0``, sums to 1).
  """
  prior_D = _check_prior(prior_D)
  _check_sampler_args(temperature, min_strength, max_strength, num_strengths, minimum,
                      max_usage, prior_D)
  if not 1 <= top_k <= num_candidates:
    raise ValueError(f"need 1 <= top_k <= num_candidates, got {top_k}, {num_candidates}")
  if candidates not in ("proposal", "notebook"):
    raise ValueError(f"candidates must be 'proposal' or 'notebook', got {candidates!r}")
  predict = predictor.predict if hasattr(predictor, "predict") else predictor
  if not callable(predict):
    raise ValueError("predictor must have .predict(mixtures) or be callable")
  rng = _rng(key_or_seed)
  cand_CxD = _candidates(rng, prior_D, num_candidates, candidates,
                         dict(temperature=temperature, min_strength=min_strength,
                              max_strength=max_strength, num_strengths=num_strengths,
                              minimum=minimum, max_usage=max_usage))
  if cand_CxD.shape[0] < top_k:
    raise ValueError(f"only {cand_CxD.shape[0]} valid candidates for top_k={top_k}")
  pred_C = np.concatenate([
      np.asarray(predict(cand_CxD[i:i + chunk_size]), np.float64).reshape(-1)
      for i in range(0, cand_CxD.shape[0], chunk_size)])
  if pred_C.shape != (cand_CxD.shape[0],):
    raise ValueError(f"predictor returned shape {pred_C.shape}, expected ({cand_CxD.shape[0]},)")
  if not np.all(np.isfinite(pred_C)):
    raise ValueError("predictor returned NaN or inf")
  best = np.argsort(pred_C, kind="stable")[:top_k]
  mixture_D = cand_CxD[best].mean(axis=0)
  return mixture_D / mixture_D.sum()
