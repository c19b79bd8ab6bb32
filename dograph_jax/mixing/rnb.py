"""R&B's *Balance* step: round-wise proportions from a Gram matrix of cluster gradients.

Ge, Huang, Cooper, Trost, Chu, Namburi, Cai, Park, Roberts, Sala (2025),
"R&B: Domain Regrouping and Data Mixture Balancing for Efficient Foundation
Model Training" (arXiv 2505.00358). R&B first *regroups* the corpus into
``k`` semantic clusters (:mod:`dograph_jax.mixing.regroup`: embeddings +
K-means, ``k`` by silhouette; run as a stage by ``dograph_jax/train/offline.py``);
the clusters are then this mixer's domains. During
training, in rounds of ``round_steps`` steps, it accumulates each cluster's
gradient of the **final layer** (the output projection to the vocabulary)
and its sample count,

.. math::

  S_i = \\sum_{x \\in \\text{cluster } i,\\ \\text{this round}} \\nabla_W \\ell(x),
  \\qquad G_{ij} = \\frac{\\langle S_i, S_j \\rangle}{|S_i|\\,|S_j|},

and at the end of the round sets the proportions of the next one to

.. math::

  p \\leftarrow \\mathrm{softmax}\\big(\\lambda\\, G q / \\lVert G q \\rVert\\big),

where ``q`` are the *evaluation proportions* of the clusters (how much each
cluster weighs in what the run is judged on). Per-sample final-layer
gradients come from the forward pass the step already makes: for the output
layer ``logits = h W^T`` the gradient of sample ``b`` is
``sum_t d_logits[b, t]^T h[b, t]`` (the outer products of the layer's input
and output-gradient), formed for all samples at once by
:func:`domain_head_grads` — no per-sample gradient of the whole model.

Choices where the method leaves room (or where we had to choose):

* **Proportions are sampled (the paper's form) or weighted.** R&B changes
  the *sampling* distribution: by default (``--apply_weights paper``, the
  mixer's ``form="sample"``) the trainer draws each batch with the round's
  ``p`` (:class:`~dograph_jax.data.DynamicMixIterator`, ``proportions``
  hook below) and steps on the batch mean. ``--apply_weights reweight``
  keeps the form of the versions before the sampler: ``p`` as levanter-style
  domain weights on a batch drawn at the run's proportions
  (:func:`~dograph_jax.mixing.base.domain_to_sample_weights`:
  ``sum_c p_c mean_{i in c} grad l_i``), the same gradient in expectation.
  Until the first round has ended the step is the plain batch mean at the
  run's proportions in both forms.
* **Never NaN weights.** A round whose sums are not finite (a diverged
  sample) leaves the proportions and ``G`` as they were.
* **A cluster absent from a round** has ``|S_i| = 0``: its row and column of
  ``G`` are zero (no division by zero), so it scores 0 and keeps a softmax
  share ``exp(0)``; if ``G q = 0`` altogether the proportions are uniform.
* **Sketched final-layer gradients** (``sketch_dim > 0``, default 1024): the
  ``(k, V, D)`` sums of an exact accumulation cost ``k`` times the output
  layer's weight gradient per step and ``k V D`` floats of state (1.5 GB for
  GPT-2 with k = 10). With ``sketch_dim = K`` each sample's gradient is
  Kronecker-sketched as ``P_in^T G_b P_out`` (``dograph_jax.projection``,
  entries of variance ``1/K``), which is linear, so the cluster sums are
  sums of sketches and ``G`` is a Johnson–Lindenstrauss estimate (relative
  error ~ ``1/sqrt(K)`` of the norms) at ``O(B T (V + D) sqrt(K))`` per step.
  ``sketch_dim = 0`` accumulates exactly.
* **``lambda``** (``lam``, default 1.0): the softmax's inverse temperature on
  the unit vector ``G q / ||G q||``; with ``k`` clusters its entries are of
  order ``1/sqrt(k)``, so ``lam = 1`` moves proportions by factors of about
  ``exp(2/sqrt(k))`` and larger values concentrate them. Traced: changing it
  does not recompile.
* **``target``** (``q``): given by the pipeline (each cluster's share of the
  validation split, every human domain weighted equally, as the reported
  average perplexity weights them); ``None`` means uniform ``1/k``.

State (fixed shapes): ``weights (k,)`` current proportions (in the first
round the observed cluster shares), ``grad_sum (k, F)``
and ``sample_count (k,)`` of the current round, ``round_step ()``,
``rounds ()`` completed, ``gram (k, k)`` of the last completed round, and
``weights_sum``/``count`` for the time average.

Shape legend: ``B`` batch, ``T`` tokens, ``V`` vocabulary, ``D`` model width
(``Dm`` below), ``k`` clusters, ``F`` ``V * Dm`` or ``sketch_dim``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dograph_jax import projection
from dograph_jax.mixing.base import MixingInputs, OnlineMixer, domain_to_sample_weights

# The projection key of the sketched final-layer gradients (fixed: the map
# must be the same in every step of a run for the round sums to add up).
SKETCH_SEED = 20250501


class RnBState(NamedTuple):
  weights: jax.Array        # (k,) proportions in use
  grad_sum: jax.Array       # (k, F) this round's summed final-layer gradients
  sample_count: jax.Array   # (k,) this round's samples per cluster
  round_step: jax.Array     # () steps taken in this round
  rounds: jax.Array         # () rounds completed
  gram: jax.Array           # (k, k) the last completed round's G
  weights_sum: jax.Array    # (k,)
  count: jax.Array          # ()


def domain_head_grads(h_BxTxD: jax.Array, d_logits_BxTxV: jax.Array, domain_id_B: jax.Array,
                      num_domains: int, sketch_dim: int = 0) -> jax.Array:
  """Per-domain sums of per-sample final-layer weight gradients.

  For ``logits = h W^T`` (``W (V, Dm)``) sample ``b``'s gradient is
  ``G_b = sum_t d_logits[b, t] h[b, t]^T`` with ``d_logits = dloss_b/dlogits``.

  Args:
    h_BxTxD: the output layer's input.
    d_logits_BxTxV: each sample's own loss gradient w.r.t. its logits.
    domain_id_B: int32 in ``[0, num_domains)``.
    num_domains: ``k``.
    sketch_dim: ``0``: the exact sums ``(k, V * Dm)`` (row-major ``(V, Dm)``);
      ``K > 0``: the sums of the Kronecker sketches ``vec(P_in^T G_b P_out)``,
      ``(k, K)``, with the factors of
      ``projection.kronecker_factors(PRNGKey(SKETCH_SEED), V, Dm, K)``.

  Returns:
    ``(k, F)`` float32.
  """
  hi = jax.lax.Precision.HIGHEST
  h = h_BxTxD.astype(jnp.float32)
  d = d_logits_BxTxV.astype(jnp.float32)
  onehot_BxK = jax.nn.one_hot(domain_id_B, num_domains, dtype=jnp.float32)
  vocab, width = d.shape[-1], h.shape[-1]
  if sketch_dim == 0:
    # Scale the narrow operand (h) by the cluster indicator: k (V, Dm) sums.
    h_KxBxTxD = onehot_BxK.T[:, :, None, None] * h[None]
    return jnp.einsum("btv,kbtd->kvd", d, h_KxBxTxD, precision=hi).reshape(
        num_domains, vocab * width)
  p_in, p_out = projection.kronecker_factors(jax.random.PRNGKey(SKETCH_SEED), vocab, width,
                                             sketch_dim)
  dp_BxTxA = jnp.einsum("btv,va->bta", d, p_in, precision=hi)
  hp_BxTxC = jnp.einsum("btd,dc->btc", h, p_out, precision=hi)
  z_BxAxC = jnp.einsum("bta,btc->bac", dp_BxTxA, hp_BxTxC, precision=hi)
  return onehot_BxK.T @ z_BxAxC.reshape(z_BxAxC.shape[0], sketch_dim)


def round_proportions(grad_sum_KxF: jax.Array, sample_count_K: jax.Array, target_K: jax.Array,
                      lam) -> tuple[jax.Array, jax.Array]:
  """``(p, G)``: R&B's proportions ``softmax(lam G q / ||G q||)`` and ``G``.

  ``G_ij = <S_i, S_j> / (n_i n_j)``; a cluster with ``n_i = 0`` has a zero
  row and column; ``G q = 0`` gives the uniform mixture.
  """
  n = sample_count_K.astype(jnp.float32)
  present = n > 0
  mean_KxF = jnp.where(present[:, None], grad_sum_KxF / jnp.where(present, n, 1.0)[:, None], 0.0)
  gram = jnp.matmul(mean_KxF, mean_KxF.T, precision=jax.lax.Precision.HIGHEST)
  v = gram @ target_K
  norm = jnp.linalg.norm(v)
  scores = jnp.where(norm > 0, v / jnp.where(norm > 0, norm, 1.0), 0.0)
  return jax.nn.softmax(lam * scores), gram


def rnb(num_domains: int, target: tuple | None = None, round_steps: int = 50,
        lam: float = 1.0, sketch_dim: int = 1024) -> OnlineMixer:
  """R&B's round rule as an :class:`OnlineMixer` over ``num_domains`` clusters.

  Args:
    num_domains: ``k``, the regrouped clusters (the batch's ``domain_id``).
    target: ``q``, the clusters' evaluation proportions (``k`` non-negative
      numbers, normalised here); ``None``: uniform.
    round_steps: steps per round (static).
    lam: ``lambda``, the softmax's inverse temperature (may be traced).
    sketch_dim: ``0`` exact final-layer gradients, ``K`` Kronecker-sketched.

  Raises:
    ValueError: a bad ``round_steps``/``sketch_dim``, or a ``target`` of the
      wrong length, negative or summing to zero.
  """
  if round_steps < 1:
    raise ValueError(f"rnb: round_steps must be >= 1, got {round_steps}")
  if sketch_dim < 0:
    raise ValueError(f"rnb: sketch_dim must be >= 0 (0 = exact), got {sketch_dim}")
  if target is None:
    target = (1.0,) * num_domains
  if len(target) != num_domains or min(target) < 0 or sum(target) <= 0:
    raise ValueError(f"rnb: target must hold {num_domains} non-negative proportions with a "
                     f"positive sum, got {target}")
  q = jnp.asarray(target, jnp.float32) / sum(target)

  def init_state(width: int) -> RnBState:
    k = num_domains
    return RnBState(weights=jnp.full((k,), 1.0 / k, jnp.float32),
                    grad_sum=jnp.zeros((k, width), jnp.float32),
                    sample_count=jnp.zeros((k,), jnp.float32),
                    round_step=jnp.zeros((), jnp.int32), rounds=jnp.zeros((), jnp.int32),
                    gram=jnp.zeros((k, k), jnp.float32),
                    weights_sum=jnp.zeros((k,), jnp.float32), count=jnp.zeros((), jnp.int32))

  def update(state: RnBState, inputs: MixingInputs):
    if inputs.head_grads is None:
      raise ValueError("rnb needs MixingInputs.head_grads (domain_head_grads of the step)")
    batch = inputs.losses.shape[0]
    # This step's weights: the plain batch mean until a round has ended.
    sample_w = jnp.where(state.rounds > 0, domain_to_sample_weights(state.weights,
                                                                    inputs.domain_id),
                         jnp.full((batch,), 1.0 / batch, jnp.float32))
    grad_sum = state.grad_sum + inputs.head_grads.astype(jnp.float32)
    counts = state.sample_count + inputs.domain_counts.astype(jnp.float32)
    round_step = state.round_step + 1
    end = round_step >= round_steps
    new_p, new_gram = round_proportions(grad_sum, counts, q, lam)
    # Before the first round ends the step is the batch mean: the logged
    # weights are then the clusters' observed shares.
    observed = counts / jnp.maximum(jnp.sum(counts), 1.0)
    # A round whose gradients were not finite keeps the proportions it had
    # (the trainer stops on the non-finite loss that causes it).
    update_p = end & jnp.all(jnp.isfinite(grad_sum)) & jnp.all(jnp.isfinite(new_p))
    weights = jnp.where(update_p, new_p,
                        jnp.where(state.rounds > 0, state.weights, observed))
    new_state = RnBState(
        weights=weights,
        grad_sum=jnp.where(end, 0.0, grad_sum), sample_count=jnp.where(end, 0.0, counts),
        round_step=jnp.where(end, 0, round_step), rounds=state.rounds + end.astype(jnp.int32),
        gram=jnp.where(update_p, new_gram, state.gram),
        weights_sum=state.weights_sum + weights, count=state.count + 1)
    return sample_w, new_state

  def init(width: int | None = None) -> RnBState:
    # Exact accumulation holds (k, V * Dm): the trainer passes V * Dm.
    if sketch_dim:
      return init_state(sketch_dim)
    if width is None:
      raise ValueError("rnb with sketch_dim=0 needs init(width=V * d_model), the size of "
                       "the output layer")
    return init_state(width)

  def proportions(state: RnBState, step):
    # The round's proportions; zeros (= the run's own sampling proportions)
    # until the first round has ended, as the in-batch form trains at the
    # batch mean then.
    return jnp.where(state.rounds > 0, state.weights, 0.0)

  return OnlineMixer(init=init, update=update, needs=frozenset({"head_grads"}),
                     head_sketch_dim=sketch_dim, proportions=proportions, form="sample")
