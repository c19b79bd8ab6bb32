"""``skip_step``: applied steps equal the wrapped optax transformation run
alone; a non-finite or caller-skipped step changes nothing but the count."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dograph_jax.train.skip_step import skip_step


def _assert_same_state(a, b):
  """Counts exactly; floats to float32 rounding (jit vs eager: fused FMAs)."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if np.issubdtype(np.asarray(x).dtype, np.integer):
      np.testing.assert_array_equal(x, y)
    else:
      np.testing.assert_allclose(x, y, rtol=1e-6, atol=0)


def test_skip_step_follows_the_inner_transformation_and_leaves_out_bad_steps():
  params = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array(0.5)}
  grads = [{"w": jnp.array([0.1, 0.2, -0.3]), "b": jnp.array(1.0)},
           {"w": jnp.array([jnp.nan, 0.0, 0.0]), "b": jnp.array(0.0)},   # non-finite
           {"w": jnp.array([0.4, -0.1, 0.2]), "b": jnp.array(-1.0)},     # skipped by the caller
           {"w": jnp.array([-0.2, 0.3, 0.1]), "b": jnp.array(0.5)}]
  skips = [False, False, True, False]
  inner = optax.adamw(1e-2, weight_decay=0.1)
  wrapped = skip_step(inner)
  update = jax.jit(wrapped.update)  # skip is traced: one program for both values
  state = wrapped.init(params)
  oracle_state = inner.init(params)  # the oracle: adamw alone, on the applied steps only
  for g, skip in zip(grads, skips):
    updates, state = update(g, state, params, skip=jnp.asarray(skip))
    applied = bool(np.all(np.isfinite(g["w"]))) and not skip
    assert bool(state.applied) == applied
    assert bool(state.finite) == bool(np.all(np.isfinite(g["w"])))
    if applied:
      want, oracle_state = inner.update(g, oracle_state, params)
      for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
      np.testing.assert_allclose(state.norm, optax.tree.norm(want), rtol=1e-6)
    else:
      assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
    _assert_same_state(state.inner, oracle_state)  # adamw's moments and count: as if never run
  assert int(state.skipped) == 2
