"""dograph_jax: DoGraph data mixing for language-model pretraining, in JAX.

The public surface (optax-style facade over one-concern modules):

* :func:`per_sample_grads`, :func:`per_sample_loss_and_grads` — ``g_i``;
* :func:`sketch` — random projections ``z_i = R g_i``;
* :func:`kmeans` — jit-stable Lloyd's K-means;
* :func:`domain_stats` — per-domain statistics and the similarity graph;
* :func:`solve_weights` — one weight per domain on the simplex;
* :func:`dograph_transform` — all of it as an optax transformation;
* :func:`sample_coefficients` — ``a_i`` for the weighted-loss form;
* :func:`factored_grads` — sketches and update in one pass (the fast path).
"""

from dograph_jax.domains import DomainStats, domain_stats
from dograph_jax.factored import FactoredGrads, factored_grads
from dograph_jax.clustering import KMeansResult, kmeans
from dograph_jax.objectives import OBJECTIVES, solve_weights
from dograph_jax.per_sample import per_sample_grads, per_sample_loss_and_grads
from dograph_jax.projection import sketch
from dograph_jax.transform import (STATIC_ARGS, DoGraphState, dograph_transform,
                                   projection_key, sample_coefficients)

__version__ = "0.1.0"

__all__ = [
    "DoGraphState", "DomainStats", "FactoredGrads", "KMeansResult", "OBJECTIVES", "STATIC_ARGS",
    "domain_stats", "dograph_transform", "factored_grads", "kmeans", "per_sample_grads",
    "per_sample_loss_and_grads", "projection_key", "sample_coefficients", "sketch",
    "solve_weights",
]
