"""``skip_step``: an optax wrapper that leaves a step out whole.

The trainer's failure policy (docs/method.md §4) wraps the clip + AdamW
part of its optimizer with it: a step whose update comes out non-finite, or
that the caller marks ``skip=True`` (DoGraph kept no sample, or a second
backward could not leave a dropped sample out), returns a zero update and
keeps the inner state as it was — no momentum, no weight decay, no count.
Compare ``optax.apply_if_finite`` (which zeroes non-finite updates but keeps
no caller-driven skip) and levanter's ``skipstep`` (which skips on a loss
spike); this one has both triggers and records what it did, so the trainer
can log and stop.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class SkipStepState(NamedTuple):
  """State of :func:`skip_step`."""
  inner: Any            # the wrapped transformation's state (as of the last applied step)
  applied: jax.Array    # () bool, the last update was applied
  finite: jax.Array     # () bool, the last update the inner transformation computed was finite
  norm: jax.Array       # () float32, global norm of that update (applied or not)
  skipped: jax.Array    # () int32, steps left out since init (either trigger)


def all_finite(tree) -> jax.Array:
  """Whether every entry of ``tree`` is finite (True for an empty tree)."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.asarray(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def skip_step(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """``inner``, except that a step with a non-finite update or ``skip=True``
  is left out: the update is zero and ``inner``'s state does not move.

  ``update(updates, state, params=None, *, skip=False, **extra_args)``;
  ``skip`` may be traced. Other extra arguments go to ``inner``.
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return SkipStepState(inner=inner.init(params), applied=jnp.asarray(True),
                         finite=jnp.asarray(True), norm=jnp.zeros((), jnp.float32),
                         skipped=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, *, skip=False, **extra_args):
    new_updates, new_inner = inner.update(updates, state.inner, params, **extra_args)
    finite = all_finite(new_updates)
    apply = finite & ~jnp.asarray(skip, bool)
    keep = lambda new, old: jnp.where(apply, new, old)
    out = jax.tree.map(lambda u: jnp.where(apply, u, jnp.zeros_like(u)), new_updates)
    return out, SkipStepState(inner=jax.tree.map(keep, new_inner, state.inner), applied=apply,
                              finite=finite,
                              norm=optax.tree.norm(new_updates).astype(jnp.float32),
                              skipped=state.skipped + (~apply).astype(jnp.int32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
