"""R&B's *Regroup* step: documents -> embeddings -> K-means, ``k`` by silhouette.

Ge et al. (2025), "R&B: Domain Regrouping and Data Mixture Balancing for
Efficient Foundation Model Training" (arXiv 2505.00358) re-partition the
training corpus once, before training, into semantically coherent clusters:
sentence embeddings of the documents, K-means, and ``k`` chosen by the
silhouette score within a range. The clusters replace the human domains as
the units of the mixture (:func:`dograph_jax.mixing.rnb`).

Embedders (pluggable: any ``texts -> (N, E)`` callable):

* :class:`TfidfSvdEmbedder` — the offline default: scikit-learn's TF-IDF
  (sublinear term frequencies, word unigrams and bigrams) reduced by a
  truncated SVD (latent semantic analysis) and L2-normalised. Needs nothing
  but the corpus, so it runs on a machine without internet.
* :class:`LocalModelEmbedder` — a sentence-embedding model directory the
  user has (a HuggingFace encoder such as ``all-MiniLM-L6-v2`` saved
  locally; read with ``local_files_only``, mean-pooled over the attention
  mask, L2-normalised, as sentence-transformers does for these models).

The silhouette score is scikit-learn's ``silhouette_score`` (Euclidean) on a
seeded subsample of at most ``silhouette_sample`` points, the same for every
``k``: the mean over points of ``(b - a) / max(a, b)`` with ``a`` the mean
distance to the point's own cluster and ``b`` to the nearest other cluster
(Rousseeuw 1987; 0 for a point alone in its cluster). K-means is
scikit-learn's (k-means++, ``n_init=4``, seeded).

Host-side: this runs once, before training.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

Embedder = Callable[[Sequence[str]], np.ndarray]


class TfidfSvdEmbedder:
  """TF-IDF + truncated SVD, fitted on the first texts it embeds (``fit``).

  ``dim`` is capped by the vocabulary (SVD needs ``dim <`` features).
  """

  def __init__(self, dim: int = 64, max_features: int = 50_000, seed: int = 0):
    self.dim, self.max_features, self.seed = dim, max_features, seed
    self._vectorizer = self._svd = None

  def fit(self, texts: Sequence[str]) -> TfidfSvdEmbedder:
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer
    self._vectorizer = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2),
                                       max_features=self.max_features, min_df=2,
                                       token_pattern=r"(?u)\b\w\w+\b|[^\w\s]")
    x = self._vectorizer.fit_transform(texts)
    dim = max(1, min(self.dim, x.shape[1] - 1, x.shape[0] - 1))
    self._svd = TruncatedSVD(n_components=dim, random_state=self.seed).fit(x)
    return self

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    if self._vectorizer is None:
      self.fit(texts)
    z = self._svd.transform(self._vectorizer.transform(texts))
    return _unit_rows(z)


class LocalModelEmbedder:
  """Mean-pooled, L2-normalised states of a local HuggingFace encoder (torch)."""

  def __init__(self, model_dir: str | Path, batch_size: int = 32, max_length: int = 256):
    from transformers import AutoModel, AutoTokenizer
    path = Path(model_dir)
    if not (path / "config.json").exists():
      raise ValueError(f"embedding model directory {path} has no config.json (a locally "
                       "saved HuggingFace encoder is needed; nothing is downloaded)")
    self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    self.model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
    self.batch_size, self.max_length = batch_size, max_length

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    import torch
    out = []
    with torch.no_grad():
      for start in range(0, len(texts), self.batch_size):
        enc = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True,
                             truncation=True, max_length=self.max_length, return_tensors="pt")
        states = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(states.dtype)
        out.append(((states * mask).sum(1) / mask.sum(1).clamp(min=1)).float().numpy())
    return _unit_rows(np.concatenate(out))


def make_embedder(spec: str, seed: int = 0) -> Embedder:
  """``"tfidf"`` (or ``"tfidf:DIM"``) or a local model directory."""
  if spec == "tfidf" or spec.startswith("tfidf:"):
    dim = int(spec.split(":", 1)[1]) if ":" in spec else 64
    return TfidfSvdEmbedder(dim=dim, seed=seed)
  return LocalModelEmbedder(spec)


def _unit_rows(z: np.ndarray) -> np.ndarray:
  z = np.asarray(z, np.float64)
  norms = np.linalg.norm(z, axis=1, keepdims=True)
  return z / np.where(norms > 0, norms, 1.0)


def silhouette(x_NxE: np.ndarray, labels_N: np.ndarray) -> float:
  """Mean silhouette coefficient (Euclidean) of a labelling; needs 2..N-1 labels.

  scikit-learn's ``silhouette_score`` on all the given points (the caller
  subsamples); a point alone in its cluster scores 0.

  Raises:
    ValueError: fewer than 2 or more than ``N - 1`` distinct labels.
  """
  from sklearn.metrics import silhouette_score
  x = np.asarray(x_NxE, np.float64)
  labels = np.asarray(labels_N)
  k = np.unique(labels).size
  # Checked here (scikit-learn raises too) for a message that names the rule.
  if not 2 <= k <= x.shape[0] - 1:
    raise ValueError(f"silhouette needs 2 <= clusters <= N - 1, got {k} for N={x.shape[0]}")
  return float(silhouette_score(x, labels, metric="euclidean"))


@dataclasses.dataclass
class Regrouping:
  """The chosen clustering: ``labels (N,)``, ``centroids (k, E)``, and the
  silhouette of every ``k`` tried."""
  k: int
  labels: np.ndarray
  centroids: np.ndarray
  scores: dict[int, float]

  def assign(self, z_MxE: np.ndarray) -> np.ndarray:
    """Nearest centroid of each embedded row (held-out documents)."""
    z = np.asarray(z_MxE, np.float64)
    d = (np.sum(z * z, 1)[:, None] - 2.0 * z @ self.centroids.T
         + np.sum(self.centroids ** 2, 1)[None])
    return np.argmin(d, axis=1)


def choose_k(x_NxE: np.ndarray, k_values: Sequence[int], seed: int = 0,
             silhouette_sample: int = 2000) -> Regrouping:
  """K-means for each ``k`` in ``k_values``; the one with the highest
  silhouette (ties: the smaller ``k``).

  Raises:
    ValueError: no ``k`` in ``[2, N - 1]``.
  """
  from sklearn.cluster import KMeans
  x = np.asarray(x_NxE, np.float64)
  ks = sorted({int(k) for k in k_values if 2 <= int(k) <= x.shape[0] - 1})
  if not ks:
    raise ValueError(f"choose_k: no k of {list(k_values)} lies in [2, N - 1] for N={x.shape[0]}")
  rng = np.random.default_rng(seed)
  sample = (rng.choice(x.shape[0], silhouette_sample, replace=False)
            if x.shape[0] > silhouette_sample else np.arange(x.shape[0]))
  best, scores = None, {}
  for k in ks:
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(x)
    labels = km.labels_
    if np.unique(labels[sample]).size < 2:
      scores[k] = -1.0
      continue
    scores[k] = silhouette(x[sample], labels[sample])
    if best is None or scores[k] > scores[best.k]:
      best = Regrouping(k=k, labels=labels.copy(), centroids=km.cluster_centers_.copy(),
                        scores=scores)
  if best is None:
    raise ValueError("choose_k: every clustering put the sample in one cluster")
  best.scores = scores
  return best
