"""Per-sample losses and gradients.

The reference path of DoGraph (docs/method.md §2): every sample's gradient ``g_i``,
stacked along a new leading axis ``B``. It is exact for any ``loss_fn`` and is
the oracle for the faster, factored path.

Shape legend: ``B`` batch size, ``P`` parameter shapes (a pytree like params).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any


def _batch_size(batch: PyTree) -> int:
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError("per_sample_grads: `batch` has no array leaves.")
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
  if None in sizes:
    raise ValueError(
        "per_sample_grads: every leaf of `batch` needs a leading batch axis; "
        "got a scalar leaf.")
  if len(sizes) != 1:
    raise ValueError(
        "per_sample_grads: leaves of `batch` disagree on the leading (batch) "
        f"axis: sizes {sorted(sizes)}.")
  return sizes.pop()


def per_sample_loss_and_grads(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    batch: PyTree,
    *,
    chunk_size: int | None = None,
) -> tuple[jax.Array, PyTree]:
  """Per-sample losses ``l_i`` and gradients ``g_i = grad l_i(params)``.

  Computed as ``jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0))``
  over the leading axis of every leaf of ``batch``.

  Args:
    loss_fn: ``loss_fn(params, example) -> scalar`` for ONE example, i.e. the
      leaves of ``example`` are those of ``batch`` without their leading axis.
    params: parameters (any pytree of arrays).
    batch: pytree of arrays, each with the same leading batch size ``B``.
    chunk_size: if given, the batch is processed ``chunk_size`` samples at a
      time in sequence (``jax.lax.map(..., batch_size=chunk_size)``), bounding
      the memory of the backward passes to one chunk; results are identical
      (``B`` need not be a multiple of ``chunk_size``).

  Returns:
    ``(losses_B, grads_BxP)``: float losses of shape ``(B,)`` and a pytree like
    ``params`` whose leaves have shape ``(B, *leaf.shape)``.
  """
  _batch_size(batch)  # validates the leading axis
  value_and_grad = jax.value_and_grad(loss_fn)
  if chunk_size is None:
    return jax.vmap(value_and_grad, in_axes=(None, 0))(params, batch)
  if chunk_size < 1:
    raise ValueError(f"per_sample_grads: chunk_size must be >= 1, got {chunk_size}.")
  return jax.lax.map(lambda ex: value_and_grad(params, ex), batch,
                     batch_size=chunk_size)


def per_sample_grads(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    batch: PyTree,
    *,
    chunk_size: int | None = None,
) -> PyTree:
  """Per-sample gradients ``g_i``, leaves of shape ``(B, *param.shape)``.

  See :func:`per_sample_loss_and_grads` (same arguments) for the losses too.
  """
  return per_sample_loss_and_grads(loss_fn, params, batch,
                                   chunk_size=chunk_size)[1]
