"""Uniform: the plain batch mean (every row weighs ``1/B``).

With natural sampling proportions this is the paper's Uniform baseline; with
``--proportions uniform`` (equal rows per domain, stratified by grain's mix)
it is the stratified variant.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dograph_jax.mixing.base import MixingInputs, OnlineMixer, mean_sample_weights


class UniformState(NamedTuple):
  weights: jax.Array      # (D,) float32, share of the last batch per domain
  weights_sum: jax.Array  # (D,) float32
  count: jax.Array        # () int32


def uniform(num_domains: int) -> OnlineMixer:
  """The batch mean as an :class:`OnlineMixer` (the reference point)."""

  def init():
    zeros = jnp.zeros((num_domains,), jnp.float32)
    return UniformState(zeros, zeros, jnp.zeros((), jnp.int32))

  def update(state, inputs: MixingInputs):
    w = jnp.full(inputs.losses.shape, 1.0 / inputs.losses.shape[0], jnp.float32)
    share = mean_sample_weights(w, inputs.domain_id, num_domains)
    return w, UniformState(share, state.weights_sum + share, state.count + 1)

  return OnlineMixer(init, update)
