"""dograph_jax: DoGraph data mixing for language-model pretraining, in JAX.

The public surface (optax-style facade over one-concern modules):

* :func:`per_sample_grads`, :func:`per_sample_loss_and_grads` — ``g_i``;
* :func:`sketch` — random projections ``z_i = R g_i``;
* :func:`kmeans` — jit-stable Lloyd's K-means; :func:`streaming_kmeans_update`
  — persistent centroids refined by every batch (mini-batch K-means);
* :func:`domain_stats` — per-domain statistics and the similarity graph;
  :func:`running_domain_stats` — the same from decayed sums over steps;
* :func:`solve_weights` — one weight per domain on the simplex;
* :func:`dograph_transform` — all of it as an optax transformation;
* :func:`sample_coefficients`, :func:`frequency_coefficients` — ``a_i`` for
  the weighted-loss form (per-batch and persistent domains);
* :func:`factored_grads` — sketches and update in one pass (the fast path);
  :class:`LaggedGrads` — the same over micro-batches, each weighted as it
  comes with the previous step's weights (docs/method.md §7b (c)).
"""

from dograph_jax.clustering import (KMeansResult, StreamingKMeans, kmeans,
                                    streaming_kmeans_update)
from dograph_jax.domains import (DomainStats, RunningSums, domain_stats, running_domain_stats,
                                 update_running_sums)
from dograph_jax.factored import FactoredGrads, LaggedGrads, LaggedPass, factored_grads
from dograph_jax.objectives import OBJECTIVES, solve_weights
from dograph_jax.per_sample import per_sample_grads, per_sample_loss_and_grads
from dograph_jax.projection import sketch
from dograph_jax.transform import (MAX_SKETCH_ENTRY, STATIC_ARGS, DoGraphState,
                                   anchored_weights, dograph_transform, frequency_coefficients,
                                   projection_key, sample_coefficients, usable_sketches)

__version__ = "0.3.0"

__all__ = [
    "DoGraphState", "DomainStats", "FactoredGrads", "KMeansResult", "LaggedGrads", "LaggedPass",
    "MAX_SKETCH_ENTRY",
    "OBJECTIVES", "RunningSums",
    "STATIC_ARGS", "StreamingKMeans", "anchored_weights", "domain_stats", "dograph_transform",
    "factored_grads", "frequency_coefficients", "kmeans", "per_sample_grads",
    "per_sample_loss_and_grads", "projection_key", "running_domain_stats",
    "sample_coefficients", "sketch", "solve_weights", "streaming_kmeans_update",
    "update_running_sums", "usable_sketches",
]
