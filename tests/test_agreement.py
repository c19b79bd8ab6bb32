"""ARI and NMI against scikit-learn (the oracle)."""

import numpy as np
import pytest
from sklearn import metrics

from dograph_jax import agreement


@pytest.mark.parametrize("seed", range(6))
def test_matches_sklearn(seed):
  rng = np.random.default_rng(seed)
  n = rng.integers(2, 300)
  a = rng.integers(0, rng.integers(1, 8), n)
  b = np.where(rng.uniform(size=n) < 0.6, a, rng.integers(0, 11, n))
  assert agreement.adjusted_rand_index(a, b) == pytest.approx(
      metrics.adjusted_rand_score(a, b), abs=1e-10)
  assert agreement.normalized_mutual_info(a, b) == pytest.approx(
      metrics.normalized_mutual_info_score(a, b), abs=1e-10)


def test_edge_cases_match_sklearn():
  for a, b in [([0, 0, 0], [1, 1, 1]), ([0, 1, 2], [0, 1, 2]), ([0, 1, 2], [2, 0, 1]),
               ([0, 0, 1, 1], [0, 1, 0, 1]), ([0, 0, 0, 0], [0, 1, 2, 3])]:
    assert agreement.adjusted_rand_index(a, b) == pytest.approx(
        metrics.adjusted_rand_score(a, b), abs=1e-10), (a, b)
    assert agreement.normalized_mutual_info(a, b) == pytest.approx(
        metrics.normalized_mutual_info_score(a, b), abs=1e-10), (a, b)


def test_contingency():
  t = agreement.contingency([0, 1, 1, 2], [1, 1, 0, 1], 3, 2)
  np.testing.assert_array_equal(t, [[0, 1], [1, 1], [0, 1]])
