"""Data-mixing methods behind one interface (see :mod:`dograph_jax.mixing.base`)."""

from dograph_jax.mixing.base import (MixingInputs, OnlineMixer, domain_counts, domain_means,
                                     domain_to_sample_weights, mean_sample_weights)

__all__ = ["MixingInputs", "OnlineMixer", "domain_counts", "domain_means",
           "domain_to_sample_weights", "mean_sample_weights"]
