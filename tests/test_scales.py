"""The transform from tiny to huge sketches (1e-30 .. 1e30), every objective,
with and without the graph term, in both domain modes: weights always on the
simplex, finite coefficients and update; within the usable range the
clustering does not depend on the scale; beyond ``MAX_SKETCH_ENTRY`` the
samples are dropped and counted, never turned into NaN."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dograph_jax as dg

B, K, M, P = 24, 16, 4, 5
SCALES = [1e-30, 1e-10, 1.0, 1e6, 1e11, 1e20, 1e30]


def _sketches(step):
  """Four well-separated blobs of ``B`` sketches (entries up to about 15) and losses."""
  rng = np.random.default_rng(step)
  centres = np.random.default_rng(99).normal(size=(M, K)) * 4
  z = centres[np.arange(B) % M] + rng.normal(size=(B, K)) * 0.3
  return z.astype(np.float32), rng.uniform(1, 3, size=B).astype(np.float32)


def _fake(sketches, losses):
  """FactoredGrads whose update map is ``sum_i a_i * e_i`` (finite, checkable)."""
  def weighted_grad(a_B, keep_B=None):
    return {"w": jnp.zeros((P,)) + jnp.sum(jnp.where(keep_B, a_B, 0.0))}
  return dg.FactoredGrads(jnp.asarray(losses), jnp.asarray(sketches), weighted_grad, False, None)


@functools.lru_cache(maxsize=None)
def _compiled(objective, lambda_graph, domains):
  """``(initial state, jitted update)`` of one configuration, built once:
  the scale is in the inputs, so every scale runs the same executable."""
  tx = dg.dograph_transform(M, K, objective, domains=domains, batch_size=B,
                            lambda_graph=lambda_graph, distance="euclidean")
  params = {"w": jnp.zeros((P,))}
  return tx.init(params), jax.jit(lambda z, losses, s: tx.update(_fake(z, losses), s, params))


def _run(scale, objective, lambda_graph, domains, steps=3, huge_rows=None):
  state, update = _compiled(objective, lambda_graph, domains)
  history = []
  for t in range(steps):
    z, losses = _sketches(t)
    z = z * np.float32(scale) if huge_rows is None else np.where(
        huge_rows[:, None], z * np.float32(scale), z).astype(np.float32)
    out, state = update(z, losses, state)
    history.append((out, state))
  return history


def _on_simplex(w):
  w = np.asarray(w)
  return np.all(np.isfinite(w)) and np.all(w >= 0) and abs(w.sum() - 1) < 1e-5


@pytest.mark.parametrize("domains", ["persistent", "batch"])
@pytest.mark.parametrize("lambda_graph", [0.0, 0.5])
@pytest.mark.parametrize("objective", dg.OBJECTIVES)
def test_every_scale_gives_simplex_weights(objective, lambda_graph, domains):
  reference = _run(1.0, objective, lambda_graph, domains)
  for scale in SCALES:
    history = _run(scale, objective, lambda_graph, domains)
    for out, state in history:
      assert _on_simplex(state.raw_weights), scale
      # Applied weights are zero off the present domains: with none present
      # (every sample dropped; persistent: none ever kept) they are all zero
      # and the update is zero; else they are on the simplex.
      present = np.asarray(state.frequencies if domains == "persistent" else state.counts)
      assert (not np.asarray(state.applied_weights).any() if not present.any()
              else _on_simplex(state.applied_weights)), scale
      assert np.all(np.isfinite(np.asarray(state.coefficients))), scale
      assert np.all(np.isfinite(np.asarray(out["w"]))), scale
      assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state)), scale
    usable = scale * 20 <= dg.MAX_SKETCH_ENTRY  # |entries| reach ~15 at scale 1
    if usable:
      assert int(state.nonfinite_total) == 0, scale
      if scale >= 1e-10:  # 1e-30 squares underflow: distances are all zero there
        for (_, s), (_, r) in zip(history, reference):
          np.testing.assert_array_equal(s.assignments, r.assignments, err_msg=str(scale))
    elif scale >= 1e20:
      assert int(state.nonfinite) == B and int(state.nonfinite_total) == 3 * B, scale
      assert not np.asarray(state.kept).any() and float(np.asarray(out["w"])[0]) == 0.0


@pytest.mark.parametrize("objective", dg.OBJECTIVES)
def test_huge_rows_among_normal_ones_are_dropped_and_counted(objective):
  huge = np.arange(B) % 6 == 0  # 4 rows of 24 at 1e30
  mixed = _run(1e30, objective, 0.5, "persistent", huge_rows=huge)
  for out, state in mixed:
    assert int(state.nonfinite) == huge.sum()
    np.testing.assert_array_equal(np.asarray(state.kept), ~huge)
    assert _on_simplex(state.applied_weights)
    a = np.asarray(state.coefficients)
    assert np.all(a[huge] == 0) and abs(a.sum() - 1) < 1e-5
  assert int(mixed[-1][1].nonfinite_total) == 3 * huge.sum()


def test_usable_sketches():
  z = jnp.array([[1.0, -dg.MAX_SKETCH_ENTRY], [1.0, 2e12], [jnp.nan, 0.0], [jnp.inf, 0.0],
                 [0.0, 0.0]])
  np.testing.assert_array_equal(dg.usable_sketches(z), [True, False, False, False, True])
