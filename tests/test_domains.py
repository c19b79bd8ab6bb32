"""domain_stats against direct NumPy computation from the definitions."""

import jax.numpy as jnp
import numpy as np

import dograph_jax as dg


def test_matches_definitions():
  rng = np.random.default_rng(0)
  b, k, m = 40, 12, 6
  z = rng.normal(size=(b, k)).astype(np.float32)
  assign = rng.integers(0, 4, b)  # domains 4 and 5 empty
  assign[0] = 3
  assign[assign == 3] = 2
  assign[0] = 3  # domain 3 is a singleton
  losses = rng.uniform(1, 3, b).astype(np.float32)
  mask = np.ones(b, bool)
  mask[5] = False
  z[5] = np.nan  # masked garbage must not leak anywhere
  s = dg.domain_stats(jnp.asarray(z), jnp.asarray(assign), m, jnp.asarray(losses),
                      sample_mask=jnp.asarray(mask))
  zz, aa, ll = z[mask], assign[mask], losses[mask]
  for j in range(m):
    rows = zz[aa == j]
    assert s.counts[j] == len(rows)
    if len(rows):
      mu = rows.mean(0)
      np.testing.assert_allclose(s.means[j], mu, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(s.variances[j], np.mean(np.sum((rows - mu) ** 2, 1)),
                                 rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(s.losses[j], ll[aa == j].mean(), rtol=1e-6)
    else:
      assert float(s.variances[j]) == 0 and np.all(np.asarray(s.means[j]) == 0)
  assert float(s.variances[3]) == 0.0
  nu = np.asarray(s.means)
  np.testing.assert_allclose(s.gram, nu @ nu.T, rtol=1e-5, atol=1e-6)
  a = np.zeros((m, m))
  for i in range(m):
    for j in range(m):
      ni, nj = np.linalg.norm(nu[i]), np.linalg.norm(nu[j])
      if i != j and ni > 0 and nj > 0:
        a[i, j] = max(0.0, nu[i] @ nu[j] / (ni * nj))
  np.testing.assert_allclose(s.adjacency, a, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(s.laplacian, np.diag(a.sum(1)) - a, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(s.laplacian).sum(1), 0, atol=1e-5)
  np.testing.assert_allclose(s.batch_mean, zz.mean(0), rtol=1e-5, atol=1e-6)
  ss = sum(np.sum((zz[aa == j] - zz[aa == j].mean(0)) ** 2) for j in range(4))
  np.testing.assert_allclose(s.pooled_variance, ss / (len(zz) - 4), rtol=1e-5)
  assert list(np.asarray(s.present)) == [True, True, True, True, False, False]
  assert all(np.all(np.isfinite(np.asarray(x))) for x in s)


def test_no_losses_gives_zero_domain_losses():
  z = jnp.ones((4, 3))
  s = dg.domain_stats(z, jnp.asarray([0, 0, 1, 1]), 3)
  np.testing.assert_array_equal(s.losses, 0.0)
  np.testing.assert_array_equal(s.variances, 0.0)
  np.testing.assert_array_equal(s.counts, [2, 2, 0])
