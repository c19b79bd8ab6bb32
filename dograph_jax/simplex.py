"""Quadratic programmes on the probability simplex.

The only module that imports jaxopt (archived upstream; it warns on import).
``minimize_quadratic`` solves

.. math:: \\min_{w \\in \\Delta_S} \\tfrac12 w^T Q w + c^T w

where ``Delta_S`` is the simplex restricted to the coordinates ``S`` selected
by ``mask`` (the others are held at 0), by accelerated projected gradient
(FISTA) with step ``1/L``, ``L`` the largest eigenvalue of ``Q``. The
``"jaxopt"`` backend uses ``jaxopt.ProjectedGradient`` with
``jaxopt.projection.projection_simplex``; the ``"optax"`` backend is a
maintained fallback, the same algorithm written here on
``optax.projections.projection_simplex``. ``"auto"`` picks jaxopt when it can
be imported.
"""

from __future__ import annotations

import warnings
from typing import Callable, Literal

import jax
import jax.numpy as jnp
import optax

try:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import jaxopt
  from jaxopt.projection import projection_simplex as _jaxopt_projection_simplex
except ImportError:  # pragma: no cover - exercised only where jaxopt is absent
  jaxopt = None
  _jaxopt_projection_simplex = None

Backend = Literal["auto", "jaxopt", "optax"]
HAS_JAXOPT = jaxopt is not None
_HI = jax.lax.Precision.HIGHEST


def masked_projection(project: Callable[[jax.Array], jax.Array],
                      v: jax.Array, mask: jax.Array) -> jax.Array:
  """Euclidean projection onto ``{w in simplex, w_j = 0 where not mask}``.

  The projection onto the simplex is ``w_j = max(v_j - theta, 0)`` with a
  threshold ``theta >= max(v) - 1``; moving the masked coordinates to
  ``max(v[mask]) - 2`` puts them below any such threshold, so they come out
  exactly 0 and the others are the projection onto the sub-simplex. An empty
  mask returns the uniform vector (there is nothing to weight).
  """
  any_present = jnp.any(mask)
  top = jnp.max(jnp.where(mask, v, -jnp.inf))
  top = jnp.where(any_present, top, 0.0)
  w = project(jnp.where(mask, v, top - 2.0))
  w = jnp.where(mask, w, 0.0)
  return jnp.where(any_present, w, jnp.full_like(v, 1.0 / v.shape[0]))


def project_simplex(v: jax.Array, mask: jax.Array,
                    backend: Backend = "auto") -> jax.Array:
  """Masked simplex projection with the chosen backend's primitive."""
  if _resolve(backend) == "jaxopt":
    return masked_projection(_jaxopt_projection_simplex, v, mask)
  return masked_projection(optax.projections.projection_simplex, v, mask)


def _resolve(backend: Backend) -> str:
  if backend == "auto":
    return "jaxopt" if HAS_JAXOPT else "optax"
  if backend == "jaxopt" and not HAS_JAXOPT:
    raise ImportError("simplex backend 'jaxopt' requested but jaxopt is not installed.")
  if backend not in ("jaxopt", "optax"):
    raise ValueError(f"unknown simplex backend {backend!r}.")
  return backend


def _normalise(q_MxM, c_M, mask_M):
  """Rescale so the gradient is 1-Lipschitz on the masked coordinates."""
  mm = mask_M[:, None] & mask_M[None, :]
  q = jnp.where(mm, q_MxM, 0.0)
  q = 0.5 * (q + q.T)
  lip = jnp.max(jnp.linalg.eigvalsh(q))
  cmax = jnp.max(jnp.where(mask_M, jnp.abs(c_M), 0.0))
  # A linear (or zero) objective has no curvature: any positive scale works.
  scale = jnp.where(lip > 1e-30, lip, jnp.maximum(cmax, 1e-30))
  return q / scale, jnp.where(mask_M, c_M, 0.0) / scale


def _fista(q, c, mask, init, maxiter, tol):
  """Accelerated projected gradient, step 1 (``q`` is 1-smooth), fixed budget."""
  def body(_, carry):
    w, y, t, done = carry
    w_next = project_simplex(y - (jnp.dot(q, y, precision=_HI) + c), mask,
                             "optax")
    t_next = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
    y_next = w_next + ((t - 1.0) / t_next) * (w_next - w)
    small = jnp.linalg.norm(w_next - w) <= tol
    # Once converged, freeze (keeps the loop shape fixed without a while).
    w_next = jnp.where(done, w, w_next)
    y_next = jnp.where(done, y, y_next)
    return w_next, y_next, t_next, done | small
  w, *_ = jax.lax.fori_loop(0, maxiter, body,
                            (init, init, jnp.ones(()), jnp.zeros((), bool)))
  return w


def minimize_quadratic(q_MxM: jax.Array, c_M: jax.Array, mask_M: jax.Array,
                       *, init: jax.Array | None = None, maxiter: int = 500,
                       tol: float = 1e-7, backend: Backend = "auto") -> jax.Array:
  """``argmin_{w in simplex, w[~mask] = 0} 0.5 w^T Q w + c^T w``.

  Args:
    q_MxM: symmetric positive semi-definite ``Q``.
    c_M: linear term.
    mask_M: bool, coordinates allowed to be non-zero.
    init: starting point (projected first); uniform over ``mask`` if None.
    maxiter: iteration budget; tol: stop when an iterate moves less than this.
    backend: ``"jaxopt"``, ``"optax"`` or ``"auto"`` (module docstring).

  Returns:
    ``(M,)`` float32 weights on the masked simplex.
  """
  mask_M = jnp.asarray(mask_M, bool)
  q, c = _normalise(q_MxM.astype(jnp.float32), c_M.astype(jnp.float32), mask_M)
  if init is None:
    init = jnp.where(mask_M, 1.0, 0.0) / jnp.maximum(jnp.sum(mask_M), 1)
  init = project_simplex(jnp.asarray(init, jnp.float32), mask_M, "optax")
  if _resolve(backend) == "jaxopt":
    solver = jaxopt.ProjectedGradient(
        fun=lambda w, q, c: 0.5 * jnp.dot(w, jnp.dot(q, w, precision=_HI)) + jnp.dot(c, w),
        projection=lambda v, mask: project_simplex(v, mask, "jaxopt"),
        stepsize=1.0, maxiter=maxiter, tol=tol, acceleration=True,
        implicit_diff=False, jit=True)
    return solver.run(init, mask_M, q=q, c=c).params
  return _fista(q, c, mask_M, init, maxiter, tol)
