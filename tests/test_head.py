"""models/head.tied_logits: the same values and gradients as the plain tied
product (jax.grad of the einsum), in float32 and bfloat16, with the weight
gradient formed as (D, V) behind a barrier."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dograph_jax.models.head import tied_logits


def _plain(h, w):
  return jnp.einsum("btd,vd->btv", h, w, preferred_element_type=jnp.float32)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_values_and_gradients_equal_the_plain_product(dtype, tol):
  kh, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
  h = jax.random.normal(kh, (3, 5, 16)).astype(dtype)
  w = jax.random.normal(kw, (37, 16)).astype(dtype)
  g = jax.random.normal(kg, (3, 5, 37))  # a float32 cotangent, as the loss gives
  np.testing.assert_allclose(tied_logits(h, w), _plain(h, w), rtol=1e-6)
  ours = jax.vjp(tied_logits, h, w)[1](g)
  want = jax.vjp(_plain, h, w)[1](g)
  for a, b in zip(ours, want):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=tol, atol=tol * float(jnp.max(jnp.abs(b.astype(jnp.float32)))))
  # per-sample gradients through it too (the reference engine's vmap(grad))
  per = jax.vmap(jax.grad(lambda w, h: jnp.sum(tied_logits(h[None], w) ** 2)), (None, 0))(w, h)
  ref = jax.vmap(jax.grad(lambda w, h: jnp.sum(_plain(h[None], w) ** 2)), (None, 0))(w, h)
  np.testing.assert_allclose(np.asarray(per, np.float32), np.asarray(ref, np.float32),
                             rtol=tol, atol=tol * float(jnp.max(jnp.abs(ref.astype(jnp.float32)))))


def test_weight_gradient_is_formed_as_d_by_v_behind_a_barrier():
  h = jnp.ones((2, 4, 8))
  w = jnp.ones((11, 8))
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda w: jnp.sum(tied_logits(h, w))))(w))
  assert "optimization_barrier" in jaxpr
  assert "f32[8,11]" in jaxpr  # the (D, V) product, transposed after
