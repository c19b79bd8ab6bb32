"""Agreement between model-centric domains and human domain labels.

Used for analysis (docs/method.md §1, the paper's Figure 1/3): how far do the
clusters DoGraph finds coincide with the corpus's own domains? Host-side, on
label vectors of any length; the scores are scikit-learn's.

* :func:`contingency` — counts ``n_uv`` of (label u, cluster v) pairs, as a
  fixed-size table (empty labels and clusters keep their row/column).
* :func:`adjusted_rand_index` — Hubert & Arabie (1985): 1 for identical
  partitions, about 0 for independent ones.
* :func:`normalized_mutual_info` — mutual information over the arithmetic
  mean of the two entropies.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics
from sklearn.metrics.cluster import contingency_matrix


def contingency(labels: np.ndarray, clusters: np.ndarray, num_labels: int | None = None,
                num_clusters: int | None = None) -> np.ndarray:
  """``(U, V)`` int64 table of label/cluster co-occurrences.

  Unlike scikit-learn's ``contingency_matrix`` (rows and columns only for the
  values present), row ``u`` is always label ``u`` and column ``v`` cluster
  ``v``, so tables of different batches add up and an empty cluster shows as
  a zero column.

  Args:
    labels: ``(N,)`` integer labels in ``[0, U)``.
    clusters: ``(N,)`` integer clusters in ``[0, V)``.
    num_labels: ``U``; ``None``: ``max(labels) + 1`` (0 when ``N = 0``).
    num_clusters: ``V``; ``None``: ``max(clusters) + 1`` (0 when ``N = 0``).

  Raises:
    ValueError: the vectors are not 1-D of one length, or a value lies
      outside ``[0, U)`` / ``[0, V)``.
  """
  labels = np.asarray(labels, np.int64)
  clusters = np.asarray(clusters, np.int64)
  if labels.shape != clusters.shape or labels.ndim != 1:
    raise ValueError(f"contingency: need two 1-D label vectors of the same length, "
                     f"got {labels.shape} and {clusters.shape}.")
  u = num_labels if num_labels is not None else (labels.max() + 1 if labels.size else 0)
  v = num_clusters if num_clusters is not None else (clusters.max() + 1 if clusters.size else 0)
  table = np.zeros((u, v), np.int64)
  if labels.size == 0:
    return table
  # A negative value would silently index from the end of the table.
  for name, values, size in (("labels", labels, u), ("clusters", clusters, v)):
    if values.min() < 0 or values.max() >= size:
      raise ValueError(f"contingency: {name} must lie in [0, {size}), got values in "
                       f"[{values.min()}, {values.max()}].")
  # scikit-learn's table has one row per label present (sorted) and one
  # column per cluster present; put it at those rows and columns.
  present = contingency_matrix(labels, clusters)
  table[np.ix_(np.unique(labels), np.unique(clusters))] = present
  return table


def adjusted_rand_index(labels: np.ndarray, clusters: np.ndarray) -> float:
  """Adjusted Rand index of two partitions of the same samples.

  1.0 for identical partitions (up to renaming), including the degenerate
  cases where the index is 0/0: fewer than two samples, or both partitions
  one block, or both all singletons.
  """
  return float(metrics.adjusted_rand_score(labels, clusters))


def normalized_mutual_info(labels: np.ndarray, clusters: np.ndarray) -> float:
  """NMI with arithmetic-mean normalisation, ``I(U; V) / ((H(U) + H(V)) / 2)``.

  1.0 when both are one block (or empty), 0.0 when only one is: the
  mutual information is 0 then, whatever the other entropy.
  """
  return float(metrics.normalized_mutual_info_score(labels, clusters,
                                                    average_method="arithmetic"))
