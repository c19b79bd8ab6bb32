"""Preparing the transform's input: sketches, kept samples, losses, update map.

``dograph_transform`` accepts two kinds of ``updates`` (docs/method.md §1, §7):
per-sample gradients (every leaf ``(B, *param.shape)``), which it sketches
itself, or a :class:`~dograph_jax.factored.FactoredGrads` from the factored
engine, which carries its own sketches and a map from coefficients to the
update. Both become one :class:`Prepared`, so that the later stages never ask
which kind they got.

Non-finite policy: a sample whose gradient (or loss, when given) has a
non-finite entry, or whose sketch has an entry beyond
:data:`MAX_SKETCH_ENTRY`, is not kept: its sketch row and loss are zeroed
here, and ``reduce`` leaves it out of the update.

Shape legend: ``B`` batch, ``K`` sketch dimension.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from dograph_jax.factored import FactoredGrads
from dograph_jax.projection import sketch
from dograph_jax.transform_stages.options import DoGraphOptions

PyTree = Any

# Largest sketch entry the transform uses: beyond it a sample is dropped and
# counted like a non-finite one. The running statistics hold sums of squared
# sketch entries over the recent history (``K * N_eff * z^2`` with
# ``N_eff = B / (1 - decay)``), which stay far inside float32 (3.4e38) at this
# bound for K up to 1e4 and N_eff up to 1e6; 1e12 is also far beyond any
# trainable per-sample gradient (one that large means the run has diverged).
MAX_SKETCH_ENTRY = 1e12


class Prepared(NamedTuple):
  """One step's input, whatever its kind."""
  z: jax.Array                   # (B, K) float32 sketches; rows not kept are 0
  kept: jax.Array                # (B,) bool, samples the step uses
  losses: jax.Array | None       # (B,) float32, 0 where not kept; None if not given
  # a_B (B,) -> sum_i a_i g_i, shaped like the parameters (a_i of a sample
  # not kept is ignored).
  reduce: Callable[[jax.Array], PyTree]


def projection_key(seed: int) -> jax.Array:
  """The key of the transform's projection ``R`` for ``seed`` (fixed for a run).

  A caller that sketches itself (the factored engine) must sketch with this
  key so that centroids and buffered sketches of earlier steps stay in the
  same space.
  """
  return jax.random.fold_in(jax.random.PRNGKey(seed), 0)


def usable_sketches(z_BxK: jax.Array) -> jax.Array:
  """``(B,)`` bool: the rows whose entries are finite and at most
  :data:`MAX_SKETCH_ENTRY` in magnitude (the samples the transform keeps)."""
  return jnp.all(jnp.abs(z_BxK) <= MAX_SKETCH_ENTRY, axis=1)  # False for NaN too


def prepare(updates: PyTree | FactoredGrads, params: PyTree | None,
            losses: jax.Array | None, opts: DoGraphOptions,
            proj_key: jax.Array) -> Prepared:
  """:func:`prepare_factored` or :func:`prepare_per_sample`, by the kind of ``updates``."""
  if isinstance(updates, FactoredGrads):
    return prepare_factored(updates, losses, opts)
  return prepare_per_sample(updates, params, losses, opts, proj_key)


def prepare_per_sample(grads: PyTree, params: PyTree | None, losses: jax.Array | None,
                       opts: DoGraphOptions, proj_key: jax.Array) -> Prepared:
  """Sketch per-sample gradients ``z_i = R g_i`` and apply the non-finite policy.

  Args:
    grads: per-sample gradients, every leaf ``(B, *param.shape)``.
    params: the parameters (only their shapes are read, to catch a mean
      gradient passed by mistake), or None.
    losses: optional ``(B,)`` per-sample losses.
    opts: the transform's options (sketch kind, dimension, batch size, ...).
    proj_key: :func:`projection_key` of ``opts.seed``.

  Returns:
    :class:`Prepared`; ``reduce(a_B)`` is ``sum_i a_i g_i`` over the kept
    samples, accumulated in float32 and cast to each gradient's dtype.
  """
  b = _check_per_sample(grads, params, opts.batch_size)
  losses = _check_losses(losses, b, opts)
  kept_B = _finite_mask(grads, losses)
  zero_dropped = lambda keep_B: jax.tree.map(
      lambda g: jnp.where(keep_B.reshape((b,) + (1,) * (g.ndim - 1)), g, 0), grads)
  z_BxK = sketch(zero_dropped(kept_B), proj_key, opts.sketch_dim, kind=opts.sketch_kind,
                 block_budget=opts.block_budget, normalize_blocks=opts.normalize_blocks)
  # A finite gradient can still have a sketch too large for the statistics.
  kept_B = kept_B & usable_sketches(z_BxK)
  z_BxK = jnp.where(kept_B[:, None], z_BxK, 0.0)
  clean = zero_dropped(kept_B)
  if losses is not None:
    losses = jnp.where(kept_B, losses, 0.0)

  def reduce(a_B):
    # sum_i a_i g_i, accumulated in float32 whatever the gradient dtype.
    return jax.tree.map(
        lambda g: jnp.tensordot(a_B.astype(g.dtype), g, axes=1,
                                preferred_element_type=jnp.float32).astype(g.dtype),
        clean)

  return Prepared(z_BxK, kept_B, losses, reduce)


def prepare_factored(fast: FactoredGrads, losses: jax.Array | None,
                     opts: DoGraphOptions) -> Prepared:
  """Take the factored engine's sketches and apply the non-finite policy.

  Args:
    fast: :class:`~dograph_jax.factored.FactoredGrads` (sketches made with
      :func:`projection_key`); its ``losses`` are used unless ``losses`` is
      given.
    losses: optional ``(B,)`` per-sample losses overriding ``fast.losses``.
    opts: the transform's options.

  Returns:
    :class:`Prepared`; ``reduce(a_B)`` asks ``fast.weighted_grad`` for the
    update, and on the second-backward path returns zeros if any sample was
    dropped (that pass cannot leave a sample out: ``0 * NaN`` is NaN in its
    residuals).
  """
  b = fast.sketches.shape[0]
  if fast.sketches.shape[1] != opts.sketch_dim:
    raise ValueError(f"dograph_transform: FactoredGrads sketches have dimension "
                     f"{fast.sketches.shape[1]}, the transform sketch_dim={opts.sketch_dim}.")
  if opts.batch_size is not None and b != opts.batch_size:
    raise ValueError(f"dograph_transform was built with batch_size={opts.batch_size} "
                     f"but got sketches for B={b}.")
  losses = _check_losses(fast.losses if losses is None else losses, b, opts)
  kept_B = usable_sketches(fast.sketches)
  if losses is not None:
    kept_B = kept_B & jnp.isfinite(losses)
  z_BxK = jnp.where(kept_B[:, None], fast.sketches, 0.0)
  if losses is not None:
    losses = jnp.where(kept_B, losses, 0.0)

  def reduce(a_B):
    # kept_B tells the map which samples to leave out (their stored tensors
    # may hold NaN); it skips that work when every sample is finite.
    out = fast.weighted_grad(a_B, kept_B)
    if fast.second_backward:
      ok = jnp.all(kept_B)
      out = jax.tree.map(lambda g: jnp.where(ok, g, jnp.zeros_like(g)), out)
    return out

  return Prepared(z_BxK, kept_B, losses, reduce)


def _check_losses(losses, b: int, opts: DoGraphOptions) -> jax.Array | None:
  """``losses`` as ``(B,)`` float32 (or None), after the objective's demands."""
  if opts.objective == "robust" and losses is None:
    raise ValueError("dograph_transform(objective='robust') needs per-sample "
                     "`losses=` (shape (B,)) in update().")
  if losses is None:
    return None
  losses = jnp.asarray(losses)
  if losses.shape != (b,):
    raise ValueError(f"dograph_transform: losses must have shape ({b},), "
                     f"got {losses.shape}.")
  return losses.astype(jnp.float32)


def _finite_mask(grads: PyTree, losses: jax.Array | None) -> jax.Array:
  """``(B,)`` bool: every entry of the sample's gradient (and loss) is finite."""
  ok = None
  for g in jax.tree.leaves(grads):
    leaf_ok = jnp.all(jnp.isfinite(g).reshape(g.shape[0], -1), axis=1)
    ok = leaf_ok if ok is None else ok & leaf_ok
  if losses is not None:
    ok = ok & jnp.isfinite(losses)
  return ok


def _check_per_sample(updates: PyTree, params: PyTree | None, batch_size: int | None) -> int:
  """``B``, after checking that ``updates`` are per-sample gradients of ``params``."""
  leaves = jax.tree.leaves(updates)
  if not leaves:
    raise ValueError("dograph_transform: `updates` has no leaves.")
  if any(x.ndim == 0 for x in leaves):
    raise ValueError(
        "dograph_transform expects per-sample gradients with a leading batch "
        "axis B; got a scalar leaf.")
  if params is not None:
    for g, p in zip(leaves, jax.tree.leaves(params)):
      if g.shape[1:] != jnp.shape(p):
        raise ValueError(
            "dograph_transform expects per-sample gradients (B, *param.shape); "
            f"got a leaf of shape {g.shape} for a parameter of shape "
            f"{jnp.shape(p)}. Did you pass the mean gradient, or put the batch "
            "axis elsewhere?")
  b = leaves[0].shape[0]
  if any(x.shape[0] != b for x in leaves):
    raise ValueError(
        "dograph_transform: per-sample gradient leaves disagree on the leading "
        f"batch axis: {sorted({x.shape[0] for x in leaves})}.")
  if batch_size is not None and b != batch_size:
    raise ValueError(
        f"dograph_transform was built with batch_size={batch_size} but got "
        f"per-sample gradients for B={b}.")
  return b
