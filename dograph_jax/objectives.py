"""Domain weights on the simplex: the four objectives of docs/method.md §3.

``w`` lives on the simplex over the domains present in the batch (an empty
domain has no mean gradient, so it gets weight exactly 0); ``u`` is uniform on
those domains. Every objective can add the graph term
``lambda_graph * scale * w^T Lap w`` (similar domains get similar weights).
The Laplacian of the cosine graph is of order 1, so ``scale`` puts the term in
the objective's own units and makes ``lambda_graph`` comparable across models
and training time: the mean effective variance for ``"uncertainty"``, the
mean squared domain-gradient norm ``mean_j ||mu_j||^2`` for ``"variance"``,
and 1 for ``"robust"`` (losses in nats) and ``"alignment"`` (cosines).

* ``"uncertainty"`` (default, the paper's best):
  ``min sum_j w_j^2 (s2_j + eps_abs)``, closed form
  ``w_j ∝ 1 / (s2_j + eps_abs)``; with the graph term a convex QP.
  ``eps_abs = eps * mean_j s2_j``; domains with fewer than two samples have no
  variance of their own and use the batch's pooled within-domain variance.
* ``"variance"``: ``min sum_j (w_j a_j - mean_l w_l a_l)^2
  + lambda_dir ||g(w) - g_bar||^2``, ``a_j = ||mu_j||``, ``g(w) = sum_j w_j
  mu_j``; a convex QP.
* ``"robust"``: ``max sum_j w_j L_j - temperature * KL(w || u)``, closed form
  ``softmax(L / temperature)``; with the graph term it is solved by mirror
  descent (exponentiated gradient) with step ``1 / (temperature + 2
  lambda_graph ||Lap||)``, whose fixed point is the optimum.
* ``"alignment"``: ``max sum_j w_j cos(mu_j, g(w)) - lambda_align/2 ||w -
  u||^2``; non-convex. Solved by ``num_steps`` damped fixed-point steps
  ``w <- (w + P(u + grad h(w) / lambda_align)) / 2`` with ``h`` the objective
  without the proximity term and ``P`` the simplex projection: a projected
  gradient ascent step of size ``1/lambda_align``, whose fixed points are the
  objective's stationary points. When ``grad h`` is the vector of cosines
  (which it is up to the dependence of ``g(w)`` on ``w``) this moves ``w``
  toward the domains best aligned with the update, as docs/method.md §3 describes.

Priors. Every objective above is written against the uniform ``u``; given
a ``prior`` ``pi`` (persistent domains pass the running frequencies ``p``)
it is written against ``pi`` instead: ``"robust"`` maximises ``sum_j w_j L_j
- temperature * KL(w || pi)`` (closed form ``w ∝ pi exp(L / temperature)``),
``"uncertainty"`` minimises the variance of the combined domain means when
domain ``j`` supplies a share ``pi_j`` of the samples, ``sum_j w_j^2 s2_j /
(m pi_j)`` (closed form ``w ∝ pi / s2``), and ``"alignment"``'s proximity
term is ``||w - pi||^2``. ``"variance"`` has no reference distribution and
ignores the prior. With ``pi = u`` each reduces to the uniform form.

Quadratic programmes go through :mod:`dograph_jax.simplex` (jaxopt's
``ProjectedGradient`` + ``projection_simplex``, or the optax fallback).

Every hyperparameter may be a traced scalar (``optax.inject_hyperparams``):
no Python control flow depends on their values.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from dograph_jax import simplex
from dograph_jax.domains import DomainStats

Objective = Literal["uncertainty", "variance", "robust", "alignment"]
OBJECTIVES = ("uncertainty", "variance", "robust", "alignment")
_HI = jax.lax.Precision.HIGHEST
_TINY = 1e-30  # squared norms below this count as zero vectors


def uniform_on(mask_M):
  """Uniform on the present domains; uniform on all if none is present."""
  n = jnp.sum(mask_M)
  return jnp.where(n > 0, jnp.where(mask_M, 1.0, 0.0) / jnp.maximum(n, 1),
                   1.0 / mask_M.shape[0])


_uniform = uniform_on


def _masked_softmax(logits_M, mask_M):
  logits = jnp.where(mask_M, logits_M, -jnp.inf)
  top = jnp.max(logits)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  e = jnp.where(mask_M, jnp.exp(logits - top), 0.0)
  total = jnp.sum(e)
  return jnp.where(total > 0, e / jnp.where(total > 0, total, 1.0),
                   _uniform(mask_M))


def effective_variances(stats: DomainStats, eps=1e-6) -> jax.Array:
  """``s2_j + eps_abs`` as used by ``"uncertainty"`` (module docstring)."""
  present = stats.counts > 0
  s2 = jnp.where(stats.counts >= 2, stats.variances, stats.pooled_variance)
  s2 = jnp.where(present, s2, 0.0)
  mean = jnp.sum(s2) / jnp.maximum(jnp.sum(present), 1)
  # The tiny absolute term keeps 1/s2 finite when every variance is 0.
  return s2 + eps * mean + 1e-30


def _prior_on(prior_M, present):
  """The prior restricted to the present domains and renormalised (uniform if None)."""
  if prior_M is None:
    return _uniform(present)
  prior = jnp.where(present, jnp.maximum(jnp.asarray(prior_M, jnp.float32), 0.0), 0.0)
  total = jnp.sum(prior)
  ok = (total > 0) & jnp.all(jnp.where(present, prior > 0, True))
  return jnp.where(ok, prior / jnp.where(total > 0, total, 1.0), _uniform(present))


def _uncertainty(stats, lambda_graph, eps, num_steps, backend, prior_M=None):
  present = stats.counts > 0
  s2 = effective_variances(stats, eps)
  if prior_M is not None:
    # Domain j supplies a share pi_j of the samples, so the variance of its
    # mean is s2_j / (n pi_j): divide by m * pi_j (1 for a uniform prior).
    pi = _prior_on(prior_M, present)
    n_present = jnp.maximum(jnp.sum(present), 1)
    s2 = jnp.where(present, s2 / jnp.where(present, n_present * pi, 1.0), s2)

  def closed_form():
    inv = jnp.where(present, 1.0 / s2, 0.0)
    total = jnp.sum(inv)
    return jnp.where(total > 0, inv / jnp.where(total > 0, total, 1.0),
                     _uniform(present))

  def with_graph():
    scale = jnp.sum(jnp.where(present, s2, 0.0)) / jnp.maximum(jnp.sum(present), 1)
    q = 2.0 * (jnp.diag(s2) + lambda_graph * scale * stats.laplacian)
    return simplex.minimize_quadratic(q, jnp.zeros_like(s2), present,
                                      init=closed_form(), maxiter=num_steps,
                                      backend=backend)

  return jax.lax.cond(lambda_graph > 0, with_graph, closed_form)


def variance_qp(stats: DomainStats, lambda_dir=1.0, lambda_graph=0.0):
  """``(Q, c)`` of the ``"variance"`` objective as ``0.5 w^T Q w + c^T w``."""
  present = stats.counts > 0
  pf = present.astype(jnp.float32)
  a = jnp.sqrt(jnp.maximum(jnp.diag(stats.gram), 0.0)) * pf
  centering = jnp.diag(pf) - jnp.outer(pf, pf) / jnp.maximum(jnp.sum(pf), 1.0)
  q = 2.0 * (a[:, None] * centering * a[None, :])
  scale = jnp.sum(a**2) / jnp.maximum(jnp.sum(pf), 1.0)
  q = q + 2.0 * lambda_dir * stats.gram + 2.0 * lambda_graph * scale * stats.laplacian
  c = -2.0 * lambda_dir * jnp.dot(stats.means, stats.batch_mean, precision=_HI)
  return q, c


def _variance(stats, lambda_dir, lambda_graph, num_steps, backend):
  q, c = variance_qp(stats, lambda_dir, lambda_graph)
  return simplex.minimize_quadratic(q, c, stats.counts > 0,
                                    maxiter=num_steps, backend=backend)


def _robust(stats, temperature, lambda_graph, num_steps, prior_M=None):
  present = stats.counts > 0
  tau = jnp.maximum(temperature, 1e-6)
  log_pi = jnp.log(jnp.where(present, _prior_on(prior_M, present), 1.0))
  start = _masked_softmax(stats.losses / tau + log_pi, present)

  def with_graph():
    lap_norm = jnp.max(jnp.abs(jnp.linalg.eigvalsh(stats.laplacian)))
    eta = 1.0 / (tau + 2.0 * lambda_graph * lap_norm)

    def step(_, w):
      log_w = jnp.log(jnp.where(present, jnp.maximum(w, 1e-38), 1.0))
      grad = (-stats.losses + tau * (log_w - log_pi + 1.0)
              + 2.0 * lambda_graph * jnp.dot(stats.laplacian, w, precision=_HI))
      return _masked_softmax(log_w - eta * grad, present)

    return jax.lax.fori_loop(0, num_steps, step, start)

  return jax.lax.cond(lambda_graph > 0, with_graph, lambda: start)


def alignment_value(w_M, stats: DomainStats, lambda_align=1.0, lambda_graph=0.0,
                    prior=None):
  """The ``"alignment"`` objective (to maximise) at ``w``."""
  present = stats.counts > 0
  return (_alignment_h(w_M, stats, lambda_graph)
          - 0.5 * lambda_align * jnp.sum((w_M - _prior_on(prior, present))**2))


def _alignment_h(w_M, stats, lambda_graph):
  g_K = jnp.dot(w_M, stats.means, precision=_HI)
  # Double `where`: a zero vector has cosine 0 and a finite (zero) gradient.
  g2, mu2_M = jnp.sum(g_K**2), jnp.diag(stats.gram)
  ok_M = (stats.counts > 0) & (mu2_M > _TINY) & (g2 > _TINY)
  denom_M = jnp.sqrt(jnp.where(ok_M, mu2_M * g2, 1.0))
  cos_M = jnp.where(ok_M, jnp.dot(stats.means, g_K, precision=_HI) / denom_M, 0.0)
  return (jnp.dot(w_M, cos_M)
          - lambda_graph * jnp.dot(w_M, jnp.dot(stats.laplacian, w_M, precision=_HI)))


def _alignment(stats, lambda_align, lambda_graph, num_steps, backend, prior_M=None):
  present = stats.counts > 0
  u = _prior_on(prior_M, present)
  lam = jnp.maximum(lambda_align, 1e-6)
  grad_h = jax.grad(_alignment_h)

  def step(_, w):
    target = simplex.project_simplex(u + grad_h(w, stats, lambda_graph) / lam,
                                     present, backend)
    return 0.5 * (w + target)

  return jax.lax.fori_loop(0, num_steps, step, u)


def solve_weights(stats: DomainStats, objective: Objective = "uncertainty", *,
                  lambda_graph=0.0, temperature=1.0, lambda_dir=1.0,
                  lambda_align=1.0, eps=1e-6, num_steps: int = 200,
                  backend: simplex.Backend = "auto", prior=None) -> jax.Array:
  """One weight per model-centric domain, on the simplex (docs/method.md §3).

  Args:
    stats: :class:`~dograph_jax.domains.DomainStats` of the batch.
    objective: ``"uncertainty"``, ``"variance"``, ``"robust"`` or
      ``"alignment"`` (module docstring for the formulas).
    lambda_graph: weight of the Laplacian term ``w^T Lap w`` (all objectives),
      relative to the objective's own scale (module docstring).
    temperature: ``tau`` of ``"robust"``.
    lambda_dir: weight of the direction-keeping term of ``"variance"``.
    lambda_align: proximity-to-uniform weight of ``"alignment"``.
    eps: relative variance floor of ``"uncertainty"``.
    num_steps: iteration budget of the iterative solvers (static).
    backend: QP backend, see :mod:`dograph_jax.simplex`.
    prior: optional ``(M,)`` reference distribution ``pi`` in place of the
      uniform ``u`` (module docstring, "Priors"); None = uniform.

  Returns:
    ``weights_M``, float32, non-negative, summing to 1, zero on empty domains
    (uniform if every domain is empty). Statistics that overflowed (an
    infinite Gram matrix or variance from huge sketches) can make the
    objective non-finite; the weights are then the prior (uniform if none)
    on the present domains, never NaN.
  """
  if objective == "uncertainty":
    w = _uncertainty(stats, lambda_graph, eps, num_steps, backend, prior)
  elif objective == "variance":
    w = _variance(stats, lambda_dir, lambda_graph, num_steps, backend)
  elif objective == "robust":
    w = _robust(stats, temperature, lambda_graph, num_steps, prior)
  elif objective == "alignment":
    w = _alignment(stats, lambda_align, lambda_graph, num_steps, backend, prior)
  else:
    raise ValueError(
        f"solve_weights: unknown objective {objective!r}; choose one of {OBJECTIVES}.")
  present = stats.counts > 0
  if prior is None:
    fallback = uniform_on(present)
  else:
    pi = jnp.where(present & jnp.isfinite(prior), jnp.maximum(prior, 0.0), 0.0)
    fallback = jnp.where(jnp.sum(pi) > 0, pi / jnp.where(jnp.sum(pi) > 0, jnp.sum(pi), 1.0),
                         uniform_on(present))
  w = jnp.where(jnp.all(jnp.isfinite(w)), w, fallback)
  return w.astype(jnp.float32)
