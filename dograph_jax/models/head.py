"""The tied output layer's product ``logits = h W^T``, with a weight-gradient
layout that XLA:CPU multiplies fast.

``jax.grad`` of ``einsum("btd,vd->btv", h, W)`` transposes the product into
``dW = einsum("btv,btd->vd", g, h)``; XLA:CPU picks a ``(V, D)`` output
layout for it that multiplies about 2.6x slower than the ``(D, V)`` one
(BENCHMARKS.md, issue 4: the plain step's head weight gradient alone took
38.6 ms at ``mini`` B48 T128). :func:`tied_logits` computes exactly the same values with
a custom VJP that forms ``dW^T = einsum("btd,btv->dv", h, g)`` and transposes
it after an ``optimization_barrier`` (so XLA cannot fold the transpose back
into the product), as the factored engine's book-keeping update does for the
same gradient. The input gradient is JAX's own transpose rule. Dtypes as in
the plain product: inputs in the compute dtype, accumulation and logits in
float32, each cotangent returned in its input's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def tied_logits(h_BxTxD: jax.Array, w_VxD: jax.Array) -> jax.Array:
  """``einsum("btd,vd->btv", h, w)`` accumulated and returned in float32."""
  return jnp.einsum("btd,vd->btv", h_BxTxD, w_VxD, preferred_element_type=jnp.float32)


def _fwd(h_BxTxD, w_VxD):
  return tied_logits(h_BxTxD, w_VxD), (h_BxTxD, w_VxD)


def _bwd(residuals, g_BxTxV):
  h_BxTxD, w_VxD = residuals
  # d/dh: g W (the same contraction JAX's transpose of the product takes)
  dh = jnp.einsum("btv,vd->btd", g_BxTxV, w_VxD,
                  preferred_element_type=h_BxTxD.dtype).astype(h_BxTxD.dtype)
  # d/dW: formed as (D, V), transposed after a barrier (see the module docstring)
  dw_DxV = jax.lax.optimization_barrier(
      jnp.einsum("btd,btv->dv", h_BxTxD, g_BxTxV, preferred_element_type=w_VxD.dtype))
  return dh, dw_DxV.T.astype(w_VxD.dtype)


tied_logits.defvjp(_fwd, _bwd)
