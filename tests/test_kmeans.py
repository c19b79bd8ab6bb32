"""K-means against scikit-learn's Lloyd (the oracle) and its edge cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

import dograph_jax as dg
from dograph_jax.clustering import kmeans_plusplus


def _blobs(n=600, k=16, m=5, seed=0):
  x, y = make_blobs(n_samples=n, n_features=k, centers=m, cluster_std=1.0,
                    center_box=(-10, 10), random_state=seed)
  return x.astype(np.float32), y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_worse_than_sklearn_from_same_start(seed):
  x, _ = _blobs(seed=seed, m=8)
  # Start deliberately from a poor point (first 8 samples) so Lloyd has work.
  init = x[:8].copy()
  iters = 30
  ours = dg.kmeans(jnp.asarray(x), 8, jax.random.PRNGKey(0), iters=iters,
                   init_centroids=jnp.asarray(init))
  ref = KMeans(8, init=init, n_init=1, algorithm="lloyd", max_iter=iters,
               tol=0.0).fit(x)
  assert float(ours.inertia) <= ref.inertia_ * (1 + 1e-4)
  np.testing.assert_allclose(float(ours.inertia), ref.inertia_, rtol=1e-3)
  assert adjusted_rand_score(ref.labels_, np.asarray(ours.assignments)) > 0.999


def test_recovers_known_clusters():
  x, y = _blobs(seed=3)
  res = jax.jit(lambda x, k: dg.kmeans(x, 5, k, iters=20))(
      jnp.asarray(x), jax.random.PRNGKey(1))
  assert adjusted_rand_score(y, np.asarray(res.assignments)) > 0.99
  np.testing.assert_array_equal(np.asarray(res.counts),
                                np.bincount(np.asarray(res.assignments), minlength=5))
  # The inertia reported is the one of the returned assignments.
  d = np.sum((x - np.asarray(res.centroids)[np.asarray(res.assignments)]) ** 2)
  np.testing.assert_allclose(float(res.inertia), d, rtol=1e-4)


def test_kmeans_plusplus_picks_distinct_data_points():
  x, _ = _blobs(seed=4)
  c = np.asarray(kmeans_plusplus(jnp.asarray(x), 5, jax.random.PRNGKey(0)))
  rows = {r.tobytes() for r in x}
  assert all(r.tobytes() in rows for r in c)
  assert len({r.tobytes() for r in c}) == 5


def test_fewer_samples_than_clusters_and_duplicates():
  x = jnp.asarray([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
  res = dg.kmeans(x, 5, jax.random.PRNGKey(0), iters=5)
  assert np.all(np.isfinite(np.asarray(res.centroids)))
  assert int(res.counts.sum()) == 3
  assert int((res.counts > 0).sum()) == 2  # two distinct points, two clusters
  assert float(res.inertia) == 0.0


def test_empty_cluster_is_reseeded_at_farthest_point():
  x, _ = _blobs(n=300, m=3, seed=5)
  init = np.concatenate([x[:2], np.full((1, x.shape[1]), 1e4, np.float32)])
  res = dg.kmeans(jnp.asarray(x), 3, jax.random.PRNGKey(0), iters=20,
                  init_centroids=jnp.asarray(init))
  ref = KMeans(3, init=init, n_init=1, algorithm="lloyd", max_iter=20, tol=0).fit(x)
  assert np.all(np.asarray(res.counts) > 0)
  assert float(res.inertia) <= ref.inertia_ * (1 + 1e-4)


def test_all_identical_points():
  x = jnp.ones((10, 4))
  res = dg.kmeans(x, 3, jax.random.PRNGKey(0), iters=3)
  assert np.all(np.isfinite(np.asarray(res.centroids)))
  assert int(res.counts.sum()) == 10 and float(res.inertia) == 0.0


def test_mask_equals_dropping_rows():
  x, _ = _blobs(n=200, m=4, seed=6)
  x_bad = x.copy()
  x_bad[::7] = 1e6  # outliers that would wreck the clustering if used
  mask = np.ones(len(x), bool)
  mask[::7] = False
  init = x[mask][:4]
  with_mask = dg.kmeans(jnp.asarray(x_bad), 4, jax.random.PRNGKey(0), iters=15,
                        init_centroids=jnp.asarray(init), sample_mask=jnp.asarray(mask))
  dropped = dg.kmeans(jnp.asarray(x[mask]), 4, jax.random.PRNGKey(0), iters=15,
                      init_centroids=jnp.asarray(init))
  np.testing.assert_allclose(with_mask.centroids, dropped.centroids, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(with_mask.counts, dropped.counts)
  np.testing.assert_allclose(with_mask.inertia, dropped.inertia, rtol=1e-4)


def test_cosine_distance_clusters_directions():
  rng = np.random.default_rng(0)
  dirs = np.eye(6)[:3] * 5
  y = rng.integers(0, 3, 300)
  # Same direction, very different lengths: Euclidean K-means would split by
  # length, spherical K-means by direction.
  scale = rng.choice([0.1, 10.0], size=300)[:, None]
  x = (dirs[y] + 0.3 * rng.normal(size=(300, 6))) * scale
  res = dg.kmeans(jnp.asarray(x, jnp.float32), 3, jax.random.PRNGKey(0),
                  iters=20, distance="cosine")
  assert adjusted_rand_score(y, np.asarray(res.assignments)) > 0.95
  np.testing.assert_allclose(np.linalg.norm(res.centroids, axis=1), 1.0, rtol=1e-5)


def test_compiles_once_per_shape():
  traces = []

  @jax.jit
  def run(x, key):
    traces.append(1)
    return dg.kmeans(x, 4, key, iters=5)

  for seed in range(3):
    x, _ = _blobs(n=100, m=4, seed=seed)
    jax.block_until_ready(run(jnp.asarray(x), jax.random.PRNGKey(seed)))
  assert len(traces) == 1


def test_bad_arguments():
  with pytest.raises(ValueError, match="num_clusters"):
    dg.kmeans(jnp.ones((4, 2)), 0, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=r"\(B, K\)"):
    dg.kmeans(jnp.ones((4,)), 2, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="init_centroids"):
    dg.kmeans(jnp.ones((4, 2)), 2, jax.random.PRNGKey(0), init_centroids=jnp.ones((3, 2)))
