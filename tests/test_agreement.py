"""ARI, NMI and the contingency table on cases with hand-computed answers.

The scores are scikit-learn's; these tests pin what the wrappers must return
(the definition of NMI's normalisation, the degenerate cases, the table's
fixed layout), not scikit-learn's arithmetic against itself.
"""

import math

import numpy as np
import pytest

from dograph_jax import agreement

# labels (0,0,0,1,1,1) vs clusters (0,0,1,1,2,2): contingency [[2,1,0],[0,1,2]].
# ARI: sum_ij C(n_ij, 2) = 2, rows 2 C(3,2) = 6, columns 3 C(2,2) = 3,
#   C(6,2) = 15, expected 6 * 3 / 15 = 1.2, maximum (6 + 3) / 2 = 4.5,
#   ARI = (2 - 1.2) / (4.5 - 1.2) = 8/33.
# NMI: H(U) = ln 2, H(V) = ln 3, I = 2 * (1/3) ln((1/3) / (1/2 * 1/3)) = (2/3) ln 2,
#   arithmetic mean: I / ((ln 2 + ln 3) / 2) = (4/3) ln 2 / ln 6.
SPLIT_LABELS = [0, 0, 0, 1, 1, 1]
SPLIT_CLUSTERS = [0, 0, 1, 1, 2, 2]
SPLIT_ARI = 8.0 / 33.0
SPLIT_NMI = (4.0 / 3.0) * math.log(2.0) / math.log(6.0)


def test_hand_computed_case():
  assert agreement.adjusted_rand_index(SPLIT_LABELS, SPLIT_CLUSTERS) == pytest.approx(
      SPLIT_ARI, abs=1e-12)
  nmi = agreement.normalized_mutual_info(SPLIT_LABELS, SPLIT_CLUSTERS)
  assert nmi == pytest.approx(SPLIT_NMI, abs=1e-12)
  # The normalisation is the arithmetic mean of the entropies, not the
  # geometric one (I / sqrt(H(U) H(V))), nor the max or min.
  geometric = (2.0 / 3.0) * math.log(2.0) / math.sqrt(math.log(2.0) * math.log(3.0))
  assert abs(nmi - geometric) > 1e-3


@pytest.mark.parametrize("a, b, ari, nmi", [
    ([0, 0, 0], [1, 1, 1], 1.0, 1.0),              # both one block: identical partitions
    ([0, 1, 2], [0, 1, 2], 1.0, 1.0),              # both all singletons
    ([0, 1, 2], [2, 0, 1], 1.0, 1.0),              # the same partition, renamed
    ([0, 0, 1, 1], [0, 1, 0, 1], -0.5, 0.0),       # crossed: I = 0, ARI below chance
    ([0, 0, 0, 0], [0, 1, 2, 3], 0.0, 0.0),        # one block vs singletons: I = 0
    ([5], [2], 1.0, 1.0),                          # one sample
    ([], [], 1.0, 1.0),                            # no samples
])
def test_edge_cases(a, b, ari, nmi):
  assert agreement.adjusted_rand_index(a, b) == pytest.approx(ari, abs=1e-12), (a, b)
  assert agreement.normalized_mutual_info(a, b) == pytest.approx(nmi, abs=1e-12), (a, b)
  assert isinstance(agreement.adjusted_rand_index(a, b), float)
  assert isinstance(agreement.normalized_mutual_info(a, b), float)


@pytest.mark.parametrize("seed", range(3))
def test_invariances(seed):
  """Symmetric, blind to label names, within range; identical partitions score 1."""
  rng = np.random.default_rng(seed)
  n = rng.integers(2, 300)
  a = rng.integers(0, rng.integers(2, 8), n)
  b = np.where(rng.uniform(size=n) < 0.6, a, rng.integers(0, 11, n))
  ari, nmi = agreement.adjusted_rand_index(a, b), agreement.normalized_mutual_info(a, b)
  assert ari <= 1.0 and 0.0 <= nmi <= 1.0
  renamed = rng.permutation(20)[b] + 100   # a bijection of the cluster names
  assert agreement.adjusted_rand_index(a, renamed) == pytest.approx(ari, abs=1e-12)
  assert agreement.normalized_mutual_info(a, renamed) == pytest.approx(nmi, abs=1e-12)
  assert agreement.adjusted_rand_index(b, a) == pytest.approx(ari, abs=1e-12)
  assert agreement.normalized_mutual_info(b, a) == pytest.approx(nmi, abs=1e-12)
  assert agreement.adjusted_rand_index(a, a) == 1.0
  assert agreement.normalized_mutual_info(a, a) == pytest.approx(1.0, abs=1e-12)


def test_contingency():
  t = agreement.contingency([0, 1, 1, 2], [1, 1, 0, 1], 3, 2)
  np.testing.assert_array_equal(t, [[0, 1], [1, 1], [0, 1]])
  assert t.dtype == np.int64


def test_contingency_keeps_empty_rows_and_columns():
  # Labels 1 and 3, clusters 0 and 3 never occur: their rows/columns stay, zero.
  t = agreement.contingency([0, 2, 2, 0, 2], [1, 2, 2, 4, 1], 4, 5)
  np.testing.assert_array_equal(t, [[0, 1, 0, 0, 1],
                                    [0, 0, 0, 0, 0],
                                    [0, 1, 2, 0, 0],
                                    [0, 0, 0, 0, 0]])
  # Without sizes: max + 1 rows and columns.
  assert agreement.contingency([0, 2], [3, 0]).shape == (3, 4)
  # No samples: an all-zero table of the given size, or (0, 0).
  np.testing.assert_array_equal(agreement.contingency([], [], 2, 3), np.zeros((2, 3)))
  assert agreement.contingency([], []).shape == (0, 0)


def test_contingency_rejects_bad_input():
  with pytest.raises(ValueError, match="same length"):
    agreement.contingency([0, 1], [0])
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
    agreement.contingency([0, 2], [0, 0], 2, 1)
  with pytest.raises(ValueError, match=r"clusters must lie in \[0, 3\)"):
    agreement.contingency([0, 1], [-1, 0], 2, 3)
