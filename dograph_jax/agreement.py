"""Agreement between model-centric domains and human domain labels.

Used for analysis (docs/method.md §1, the paper's Figure 1/3): how far do the
clusters DoGraph finds coincide with the corpus's own domains? Plain NumPy,
host-side, on label vectors of any length.

* :func:`contingency` — counts ``n_uv`` of (label u, cluster v) pairs.
* :func:`adjusted_rand_index` — Hubert & Arabie (1985): 1 for identical
  partitions, about 0 for independent ones.
* :func:`normalized_mutual_info` — mutual information over the arithmetic
  mean of the two entropies (scikit-learn's default normalisation).
"""

from __future__ import annotations

import numpy as np


def contingency(labels: np.ndarray, clusters: np.ndarray, num_labels: int | None = None,
                num_clusters: int | None = None) -> np.ndarray:
  """``(U, V)`` int64 table of label/cluster co-occurrences."""
  labels = np.asarray(labels, np.int64)
  clusters = np.asarray(clusters, np.int64)
  if labels.shape != clusters.shape or labels.ndim != 1:
    raise ValueError(f"contingency: need two 1-D label vectors of the same length, "
                     f"got {labels.shape} and {clusters.shape}.")
  u = num_labels if num_labels is not None else (labels.max() + 1 if labels.size else 0)
  v = num_clusters if num_clusters is not None else (clusters.max() + 1 if clusters.size else 0)
  table = np.zeros((u, v), np.int64)
  np.add.at(table, (labels, clusters), 1)
  return table


def _pairs(n):
  return n * (n - 1) / 2.0


def adjusted_rand_index(labels: np.ndarray, clusters: np.ndarray) -> float:
  """Adjusted Rand index of two partitions of the same samples."""
  table = contingency(labels, clusters).astype(np.float64)
  n = table.sum()
  if n < 2:
    return 1.0
  index = _pairs(table).sum()
  rows, cols = _pairs(table.sum(1)).sum(), _pairs(table.sum(0)).sum()
  expected = rows * cols / _pairs(n)
  maximum = 0.5 * (rows + cols)
  if maximum == expected:  # both partitions trivial (one block or all singletons)
    return 1.0
  return float((index - expected) / (maximum - expected))


def _entropy(counts):
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


def normalized_mutual_info(labels: np.ndarray, clusters: np.ndarray) -> float:
  """NMI with arithmetic-mean normalisation; 1 when both are one block."""
  table = contingency(labels, clusters).astype(np.float64)
  n = table.sum()
  if n == 0:
    return 1.0
  h_u, h_v = _entropy(table.sum(1)), _entropy(table.sum(0))
  if h_u == 0 and h_v == 0:
    return 1.0
  pu, pv = table.sum(1, keepdims=True) / n, table.sum(0, keepdims=True) / n
  nz = table > 0
  pij = table / n
  mi = float((pij[nz] * np.log(pij[nz] / (pu @ pv)[nz])).sum())
  denom = 0.5 * (h_u + h_v)
  return max(0.0, mi / denom) if denom > 0 else 0.0
