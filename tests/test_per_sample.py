"""per_sample_grads against a Python loop of jax.grad (the oracle)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dograph_jax as dg


def _mlp_params(key):
  k1, k2 = jax.random.split(key)
  return {"l1": {"w": jax.random.normal(k1, (4, 6)) * 0.5, "b": jnp.zeros(6)},
          "l2": {"w": jax.random.normal(k2, (6, 2)) * 0.5, "b": jnp.ones(2)}}


def _loss(params, example):
  x, y = example
  h = jnp.tanh(x @ params["l1"]["w"] + params["l1"]["b"])
  out = h @ params["l2"]["w"] + params["l2"]["b"]
  return jnp.sum((out - y) ** 2)


def _batch(key, b=10):
  kx, ky = jax.random.split(key)
  return jax.random.normal(kx, (b, 4)), jax.random.normal(ky, (b, 2))


@pytest.mark.parametrize("chunk_size", [None, 3, 10, 16])
def test_matches_python_loop(chunk_size):
  params = _mlp_params(jax.random.PRNGKey(0))
  x, y = _batch(jax.random.PRNGKey(1))
  losses, grads = dg.per_sample_loss_and_grads(_loss, params, (x, y),
                                               chunk_size=chunk_size)
  for i in range(x.shape[0]):
    li, gi = jax.value_and_grad(_loss)(params, (x[i], y[i]))
    np.testing.assert_allclose(losses[i], li, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[i], b, rtol=1e-5,
                                                         atol=1e-6), grads, gi)


def test_chunked_identical_under_jit():
  params = _mlp_params(jax.random.PRNGKey(0))
  batch = _batch(jax.random.PRNGKey(2), b=13)
  full = jax.jit(lambda p, b: dg.per_sample_grads(_loss, p, b))(params, batch)
  chunked = jax.jit(lambda p, b: dg.per_sample_grads(_loss, p, b, chunk_size=4))(
      params, batch)
  # Same math; XLA may fuse a batch of 4 and of 13 differently, so allow
  # float32 round-off (a few ulps) and nothing more.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-6),
               full, chunked)
  assert jax.tree.leaves(full)[0].shape[0] == 13


def test_bad_batch_raises():
  params = _mlp_params(jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="disagree"):
    dg.per_sample_grads(_loss, params, (jnp.ones((5, 4)), jnp.ones((6, 2))))
  with pytest.raises(ValueError, match="chunk_size"):
    dg.per_sample_grads(_loss, params, _batch(jax.random.PRNGKey(0)), chunk_size=0)
