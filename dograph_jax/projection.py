"""Random projections ("sketches") of per-sample gradients.

docs/method.md §2: ``z_i = R g_i`` with ``R`` a ``k x P`` random matrix whose entries
have variance ``1/k``, so that ``E ||z_i||^2 = ||g_i||^2`` and, by the
Johnson–Lindenstrauss lemma, pairwise distances and inner products between
gradients are kept up to a relative error of order ``1/sqrt(k)``.

``R`` is never stored: it is regenerated inside jit from a PRNG key, one
independent block per parameter leaf (the leaf's index in flatten order is
folded into the key), so the same key always gives the same map.

Two kinds of map:

* ``"gaussian"``: a dense Gaussian block per leaf, generated ``block_budget``
  numbers at a time (rows of the block are produced in chunks and consumed at
  once), so no ``dim x leaf_size`` matrix larger than the budget ever exists.
* ``"kronecker"``: for a leaf with two or more axes, reshaped to a matrix
  ``G`` (``in x out``, ``in`` its first axis), the sketch is
  ``P_in^T G P_out`` with Gaussian factors ``P_in`` (``in x k_in``, variance
  ``1/k_in``) and ``P_out`` (``out x k_out``, variance ``1/k_out``),
  ``k_in * k_out = dim``. A linear layer's bias (a ``bias`` leaf beside a
  ``kernel`` matrix with as many columns) is folded in as one more row,
  ``G = [W; b]`` (``(in + 1) x out``), the way the factored engine sees it
  (``[X, 1]^T D``), and is keyed by the kernel; other leaves with fewer than
  two axes (LayerNorm scales and biases) get a dense Gaussian block. It is
  the map that the factored engine (docs/method.md §7) computes from layer inputs
  and output-gradients without forming ``G``; here it is applied to
  materialised gradients, as that engine's oracle. It is unbiased too
  (``E[R^T R] = I``) but, its error falling more slowly than ``K^-1/2``,
  needs 3-4 times the dimension of the dense map for the same distortion
  (``benchmarks/sketch_distortion.py``: pairwise-distance RMS error 0.04-0.045
  for Kronecker at 1024 and dense at 256 on two small GPT-2s), hence the
  defaults: 256 for the dense map, 1024 for the Kronecker map.

Shape legend: ``B`` batch, ``K`` sketch dimension (``dim``), ``N`` flattened
leaf size.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import jax
import jax.numpy as jnp

PyTree = Any
SketchKind = Literal["gaussian", "kronecker"]

# Largest random block (in float32 numbers) generated at once: 4M = 16 MiB.
DEFAULT_BLOCK_BUDGET = 1 << 22

# Sub-streams folded into a leaf's key, so the kinds never share numbers.
_DENSE, _KRON_IN, _KRON_OUT = 0, 1, 2


def leaf_key(key: jax.Array, leaf_index: int) -> jax.Array:
  """The key of parameter leaf ``leaf_index`` (its flatten-order position)."""
  return jax.random.fold_in(key, leaf_index)


def kronecker_dims(dim: int) -> tuple[int, int]:
  """Factor ``dim = k_in * k_out`` as close to square as possible (k_in <= k_out)."""
  if dim < 1:
    raise ValueError(f"sketch dim must be >= 1, got {dim}.")
  k_in = max(d for d in range(1, math.isqrt(dim) + 1) if dim % d == 0)
  return k_in, dim // k_in


def kronecker_factors(key: jax.Array, rows: int, cols: int,
                      dim: int) -> tuple[jax.Array, jax.Array]:
  """Gaussian factors ``(P_in (rows, k_in), P_out (cols, k_out))`` of one leaf.

  Entries are N(0, 1/k_in) and N(0, 1/k_out), so ``P_in ⊗ P_out`` has
  entries of variance ``1/dim``. ``key`` is the leaf's key (:func:`leaf_key`).
  """
  k_in, k_out = kronecker_dims(dim)
  p_in = jax.random.normal(jax.random.fold_in(key, _KRON_IN), (rows, k_in),
                           jnp.float32) / math.sqrt(k_in)
  p_out = jax.random.normal(jax.random.fold_in(key, _KRON_OUT), (cols, k_out),
                            jnp.float32) / math.sqrt(k_out)
  return p_in, p_out


def _dense_block_rows(dim: int, block_budget: int) -> int:
  return max(1, block_budget // dim)


def dense_sketch_leaf(g_BxN: jax.Array, key: jax.Array, dim: int,
                      block_budget: int = DEFAULT_BLOCK_BUDGET) -> jax.Array:
  """``g_BxN @ R_NxK`` with ``R`` N(0, 1/dim), generated in row blocks.

  Row block ``j`` of ``R`` (``block_rows = block_budget // dim`` rows) is drawn
  from ``fold_in(fold_in(key, 0), j)``: the map depends on ``(key, dim,
  block_budget)`` only, never on the batch.
  """
  batch, n = g_BxN.shape
  rows = _dense_block_rows(dim, block_budget)
  key = jax.random.fold_in(key, _DENSE)
  scale = 1.0 / math.sqrt(dim)

  def block(j, start, size):
    r_SxK = jax.random.normal(jax.random.fold_in(key, j), (size, dim),
                              jnp.float32)
    g_BxS = jax.lax.dynamic_slice_in_dim(g_BxN, start, size, axis=1)
    return jnp.dot(g_BxS.astype(jnp.float32), r_SxK,
                   precision=jax.lax.Precision.HIGHEST)

  num_full, rem = divmod(n, rows)
  z_BxK = jnp.zeros((batch, dim), jnp.float32)
  if num_full == 1:
    z_BxK = block(0, 0, rows)
  elif num_full > 1:
    z_BxK = jax.lax.fori_loop(
        0, num_full, lambda j, z: z + block(j, j * rows, rows), z_BxK)
  if rem:
    z_BxK = z_BxK + block(num_full, num_full * rows, rem)
  return z_BxK * scale


def kronecker_sketch_leaf(g_BxIxO: jax.Array, key: jax.Array,
                          dim: int) -> jax.Array:
  """``vec(P_in^T G_i P_out)`` for each sample's matrix gradient ``G_i``.

  Flattening is row-major over ``(k_in, k_out)``.
  """
  batch, rows, cols = g_BxIxO.shape
  p_in, p_out = kronecker_factors(key, rows, cols, dim)
  hi = jax.lax.Precision.HIGHEST
  # Contract the larger side first so the intermediate is the smaller one.
  g = g_BxIxO.astype(jnp.float32)
  if rows >= cols:
    t_BxAxO = jnp.einsum("bio,ia->bao", g, p_in, precision=hi)
    z = jnp.einsum("bao,oc->bac", t_BxAxO, p_out, precision=hi)
  else:
    t_BxIxC = jnp.einsum("bio,oc->bic", g, p_out, precision=hi)
    z = jnp.einsum("bic,ia->bac", t_BxIxC, p_in, precision=hi)
  return z.reshape(batch, dim)


def sketch(grads: PyTree, key: jax.Array, dim: int, *,
           kind: SketchKind = "gaussian",
           block_budget: int = DEFAULT_BLOCK_BUDGET,
           normalize_blocks: bool = False) -> jax.Array:
  """Project per-sample gradients to ``dim`` dimensions: ``z_i = R g_i``.

  Args:
    grads: pytree of per-sample gradients, every leaf ``(B, *param_shape)``.
    key: PRNG key that defines ``R`` (same key, same map).
    dim: sketch dimension ``K``.
    kind: ``"gaussian"`` (dense JL map) or ``"kronecker"`` (factored map of
      docs/method.md §7); see the module docstring.
    block_budget: most random numbers generated at once by a dense block.
    normalize_blocks: scale each block's sketch of each sample to unit norm
      before summing (:func:`unit_rows`): every parameter block (a leaf; with
      ``"kronecker"`` a linear layer's kernel and bias together) then counts
      equally, however large its gradients. Default ``False``.

  Returns:
    ``z_BxK``, float32. Scaling: each entry of ``R`` has variance ``1/K``, so
    ``E ||z_i||^2 = ||g_i||^2`` and ``E <z_i, z_j> = <g_i, g_j>`` (without
    ``normalize_blocks``).
  """
  if not isinstance(dim, int) or dim < 1:
    raise ValueError(f"sketch: dim must be an int >= 1, got {dim!r}.")
  if kind not in ("gaussian", "kronecker"):
    raise ValueError(f"sketch: unknown kind {kind!r}; use 'gaussian' or 'kronecker'.")
  leaves = jax.tree.leaves(grads)
  if not leaves:
    raise ValueError("sketch: `grads` has no leaves.")
  batch = leaves[0].shape[0] if leaves[0].ndim else None
  if batch is None or any(x.ndim == 0 or x.shape[0] != batch for x in leaves):
    raise ValueError(
        "sketch: every gradient leaf needs the same leading batch axis; got "
        f"shapes {[x.shape for x in leaves]}.")
  z_BxK = jnp.zeros((batch, dim), jnp.float32)
  folded = folded_biases(grads, batched=True) if kind == "kronecker" else {}
  for index, g in enumerate(leaves):
    if index in folded.values():
      continue  # a linear layer's bias: sketched with its kernel
    k = leaf_key(key, index)
    if kind == "kronecker" and g.ndim >= 3:
      g = g.reshape(batch, g.shape[1], -1)
      if index in folded:  # the bias as one more input row: [W; b]
        g = jnp.concatenate([g, leaves[folded[index]][:, None, :].astype(g.dtype)], 1)
      z_block = kronecker_sketch_leaf(g, k, dim)
    else:
      z_block = dense_sketch_leaf(g.reshape(batch, -1), k, dim, block_budget)
    z_BxK = z_BxK + (unit_rows(z_block) if normalize_blocks else z_block)
  return z_BxK


def unit_rows(z_BxK: jax.Array) -> jax.Array:
  """Each row scaled to unit L2 norm; an all-zero row stays zero and a
  non-finite one stays non-finite (so that the transform still counts it)."""
  z_BxK = z_BxK.astype(jnp.float32)
  # Divide by the largest entry first: squaring a row of 1e-30s (or 1e30s)
  # would underflow (overflow) in float32.
  peak_B = jnp.max(jnp.abs(z_BxK), axis=1, keepdims=True)
  live_B = peak_B > 0  # False for an all-zero row, and for NaN
  scaled = z_BxK / jnp.where(live_B, peak_B, 1.0)
  norm_B = jnp.sqrt(jnp.sum(jnp.square(scaled), axis=1, keepdims=True))
  return jnp.where(live_B, scaled / jnp.where(live_B, norm_B, 1.0), z_BxK * 0.0)


def folded_biases(tree: PyTree, *, batched: bool = False) -> dict[int, int]:
  """``{kernel leaf index: bias leaf index}`` of the linear layers in ``tree``.

  A linear layer is a pair of sibling leaves named ``kernel`` (a matrix
  ``(in, out)``) and ``bias`` (``(out,)``), as flax's ``Linear`` stores them.
  Indices are positions in ``jax.tree.leaves(tree)``. ``batched``: leaves
  carry a leading batch axis.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  lead = 1 if batched else 0
  index = {tuple(path): i for i, (path, _) in enumerate(flat)}
  out = {}
  for i, (path, leaf) in enumerate(flat):
    if not path or getattr(path[-1], "key", None) != "kernel" or jnp.ndim(leaf) != 2 + lead:
      continue
    j = index.get(tuple(path[:-1]) + (jax.tree_util.DictKey("bias"),))
    if j is not None and jnp.shape(flat[j][1])[lead:] == (jnp.shape(leaf)[-1],):
      out[i] = j
  return out
