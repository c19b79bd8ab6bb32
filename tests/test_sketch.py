"""Sketches: JL statistics, determinism, independence of blocks, kinds."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dograph_jax as dg
from dograph_jax import projection as sk


def _grads(key, b=32):
  k1, k2, k3 = jax.random.split(key, 3)
  return {"a": jax.random.normal(k1, (b, 40, 30)),
          "b": jax.random.normal(k2, (b, 50)),
          "c": jax.random.normal(k3, (b, 7, 3, 5))}


def _flat(grads):
  return np.concatenate([np.asarray(x).reshape(x.shape[0], -1)
                         for x in jax.tree.leaves(grads)], 1)


def _recover_matrix(shapes, key, dim, **kw):
  """R^T (P x K), read off by sketching the standard basis, leaf by leaf."""
  cols = []
  for index, shape in enumerate(shapes):
    n = math.prod(shape)
    basis = [jnp.zeros((n,) + shape) for _ in shapes]
    basis[index] = jnp.eye(n).reshape((n,) + shape)
    cols.append(np.asarray(dg.sketch(basis, key, dim, **kw)))
  return np.concatenate(cols, 0)


@pytest.mark.parametrize("kind", ["gaussian", "kronecker"])
def test_same_key_same_map_and_linear(kind):
  g = _grads(jax.random.PRNGKey(0))
  h = _grads(jax.random.PRNGKey(1))
  key = jax.random.PRNGKey(7)
  z1 = dg.sketch(g, key, 64, kind=kind)
  z2 = jax.jit(lambda g: dg.sketch(g, key, 64, kind=kind))(g)
  np.testing.assert_allclose(z1, z2, rtol=1e-5, atol=1e-5)
  assert z1.dtype == jnp.float32 and z1.shape == (32, 64)
  zsum = dg.sketch(jax.tree.map(lambda a, b: 2.0 * a - b, g, h), key, 64, kind=kind)
  np.testing.assert_allclose(zsum, 2.0 * z1 - dg.sketch(h, key, 64, kind=kind),
                             rtol=1e-4, atol=1e-4)
  z3 = dg.sketch(g, jax.random.PRNGKey(8), 64, kind=kind)
  assert not np.allclose(z1, z3)


def test_dense_map_entries_and_block_independence():
  """The recovered R has N(0, 1/K) entries, blocks differ across leaves and
  row-chunks, and a tiny budget (many chunks + a remainder) is still one
  consistent linear map."""
  shapes = [(13, 11), (13, 11)]  # two identical leaves must get different blocks
  key, dim = jax.random.PRNGKey(3), 32
  budget = 5 * dim  # 5 rows per block: 143 = 28 * 5 + 3
  r_PxK = _recover_matrix(shapes, key, dim, block_budget=budget)
  assert r_PxK.shape == (2 * 143, dim)
  # Variance 1/K: K * mean(r^2) ~ chi2 with P*K dof / (P*K).
  n = r_PxK.size
  assert abs(dim * np.mean(r_PxK**2) - 1.0) < 5 * math.sqrt(2.0 / n)
  assert abs(np.mean(r_PxK)) < 5 / math.sqrt(n * dim)
  # Distinct leaves and distinct row blocks: no two rows equal, and the two
  # leaves' blocks are uncorrelated.
  assert len({row.tobytes() for row in r_PxK}) == r_PxK.shape[0]
  corr = np.corrcoef(r_PxK[:143].ravel(), r_PxK[143:].ravel())[0, 1]
  assert abs(corr) < 5 / math.sqrt(143 * dim)
  # The sketch is g @ R for arbitrary g.
  g = [jax.random.normal(jax.random.PRNGKey(9), (4,) + s) for s in shapes]
  z = dg.sketch(g, key, dim, block_budget=budget)
  np.testing.assert_allclose(z, _flat(g) @ r_PxK, rtol=1e-4, atol=1e-4)


def test_kronecker_is_kron_of_factors():
  key, dim = jax.random.PRNGKey(4), 24
  k_in, k_out = sk.kronecker_dims(dim)
  assert (k_in, k_out) == (4, 6)
  g = {"m": jax.random.normal(jax.random.PRNGKey(5), (3, 9, 7)),
       "v": jax.random.normal(jax.random.PRNGKey(6), (3, 5))}
  z = dg.sketch(g, key, dim, kind="kronecker")
  p_in, p_out = sk.kronecker_factors(sk.leaf_key(key, 0), 9, 7, dim)
  kron = np.kron(np.asarray(p_in), np.asarray(p_out))  # (9*7, k_in*k_out)
  dense_v = dg.sketch({"m": jnp.zeros_like(g["m"]), "v": g["v"]}, key, dim,
                      kind="kronecker")
  expected = np.asarray(g["m"]).reshape(3, -1) @ kron + np.asarray(dense_v)
  np.testing.assert_allclose(z, expected, rtol=1e-4, atol=1e-4)
  # The 1-D leaf goes through the same dense block as the gaussian kind.
  np.testing.assert_allclose(
      dense_v, dg.sketch({"m": jnp.zeros_like(g["m"]), "v": g["v"]}, key, dim),
      rtol=1e-6)


def predicted_rel_sd(leaves, kind, dim):
  """Exact std of ||R v||^2 / ||v||^2 for each row v (a list of leaf arrays).

  Dense Gaussian map: Var = 2 ||v||^4 / K. Kronecker block of a matrix G
  (entries of P_in ~ N(0, 1/k_in), P_out ~ N(0, 1/k_out)), with
  t = ||G||_F^2 and rho = ||G^T G||_F^2 / t^2, by Isserlis' theorem:
  Var = t^2 (2/K + 2 rho (1 + 1/k_out) / k_in + 2 rho / k_out).
  Blocks of different leaves are independent, so variances add.
  """
  k_in, k_out = sk.kronecker_dims(dim)
  var, total = 0.0, 0.0
  for leaf in leaves:
    leaf = np.asarray(leaf, np.float64)
    t = np.sum(leaf.reshape(leaf.shape[0], -1) ** 2, 1)
    total = total + t
    if kind == "kronecker" and leaf.ndim >= 3:
      m = leaf.reshape(leaf.shape[0], leaf.shape[1], -1)
      gtg = np.einsum("bio,bip->bop", m, m)
      rho = np.sum(gtg**2, (1, 2)) / t**2
      var = var + t**2 * (2 / dim + 2 * rho * (1 + 1 / k_out) / k_in + 2 * rho / k_out)
    else:
      var = var + 2 * t**2 / dim
  return np.sqrt(var) / total


@pytest.mark.parametrize("kind,dim", [("gaussian", 512), ("kronecker", 1024)])
def test_johnson_lindenstrauss(kind, dim):
  """Norms and pairwise distances within 5 predicted standard deviations,
  unbiased on average, and with a spread of the predicted size."""
  g = _grads(jax.random.PRNGKey(10), b=24)
  leaves = jax.tree.leaves(g)
  flat = _flat(g)
  z = np.asarray(dg.sketch(g, jax.random.PRNGKey(11), dim, kind=kind))
  ratio = np.sum(z**2, 1) / np.sum(flat**2, 1)
  sd = predicted_rel_sd(leaves, kind, dim)
  assert np.all(np.abs(ratio - 1) < 5 * sd), (ratio, sd)
  i, j = np.triu_indices(flat.shape[0], 1)
  rel = np.sum((z[i] - z[j]) ** 2, 1) / np.sum((flat[i] - flat[j]) ** 2, 1) - 1
  sd_pair = predicted_rel_sd([np.asarray(x)[i] - np.asarray(x)[j] for x in leaves],
                             kind, dim)
  assert np.all(np.abs(rel) < 5 * sd_pair)
  assert 0.3 < np.sqrt(np.mean(rel**2)) / np.sqrt(np.mean(sd_pair**2)) < 2.0


@pytest.mark.parametrize("kind", ["gaussian", "kronecker"])
def test_unbiased_with_predicted_variance_over_keys(kind):
  """Over 400 independent maps: E||Rg||^2 = ||g||^2 and the variance is the
  predicted one (this catches wrong scaling, correlated or reused blocks)."""
  g = {"m": jax.random.normal(jax.random.PRNGKey(0), (1, 20, 10)),
       "v": jax.random.normal(jax.random.PRNGKey(1), (1, 30))}
  norm2 = float(np.sum(_flat(g) ** 2))
  keys = jax.random.split(jax.random.PRNGKey(2), 400)
  z = jax.vmap(lambda k: dg.sketch(g, k, 16, kind=kind))(keys)
  r = np.sum(np.asarray(z) ** 2, -1)[:, 0] / norm2
  sd = float(predicted_rel_sd(jax.tree.leaves(g), kind, 16)[0])
  assert abs(np.mean(r) - 1) < 5 * sd / np.sqrt(len(r)), (np.mean(r), sd)
  # Sample std of 400 draws: relative error about 1/sqrt(2*400) * kurtosis
  # factor; 25% is over 3 of those standard errors.
  assert abs(np.std(r) / sd - 1) < 0.25, (np.std(r), sd)


def test_bad_arguments():
  g = _grads(jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="dim"):
    dg.sketch(g, jax.random.PRNGKey(0), 0)
  with pytest.raises(ValueError, match="kind"):
    dg.sketch(g, jax.random.PRNGKey(0), 8, kind="dense")
  with pytest.raises(ValueError, match="leading batch"):
    dg.sketch({"a": jnp.ones((3, 2)), "b": jnp.ones((4, 2))}, jax.random.PRNGKey(0), 8)
