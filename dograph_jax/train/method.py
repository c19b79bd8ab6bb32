"""One interface for every way the trainer turns a batch into a gradient.

A :class:`Method` owns what is particular to a data-mixing method inside
the jitted train step; the step itself (``training.make_train_step``) is the
same for all of them:

    out = method.grads(params, method_state, batch, step)      # losses, gradient
    updates, head = optimizer.head.update(out.grads, ...)      # DoGraph only
    report = method.report(out, head, batch)                   # loss, skip, metrics, new state
    updates, tail = optimizer.tail.update(updates, ..., skip=report.skip)

Implementations:

* :class:`PlainMethod` — the batch-mean gradient (``uniform``, and every
  offline pipeline's final run at its proportions);
* :class:`DoGraphMethod` — per-sample material for ``dograph_transform``:
  the factored engine's :class:`~dograph_jax.FactoredGrads` (default) or
  per-sample gradients ``vmap(grad)`` (``--sketch reference``); the
  transform (the optimizer's head) reduces it;
* :class:`MixerMethod` — an adapter over any
  :class:`~dograph_jax.mixing.OnlineMixer`: one forward pass with a ``vjp``,
  the mixer's per-sample weights ``w`` from the losses (and whatever else it
  ``needs``), the update ``vjp(w)`` — one backward pass.

A method that applies its weights by *sampling* (``--apply_weights
sample``: the online mixers whose papers sample, DoGraph on request) also
has ``proportions(state, step, base_D)``: the trainer draws the batch of
``step`` with them (``data.DynamicMixIterator``) and the method steps on the
batch mean.

Micro-batches (``--micro_batches N``): every method computes the same step
from ``N`` sequential slices of the batch (``jax.lax.scan``), holding the
activations of one slice at a time; per-sample results are the full
batch's. A step whose weights need the whole batch first (an online mixer
that reweights, DoGraph) takes two passes: the first collects what the
weights are computed from (losses, sketches, per-domain sums), the second
re-runs each slice's forward pass and backpropagates its rows' weights
(docs/method.md, "Micro-batches"). DoGraph with ``--update lagged`` takes
one pass instead, each slice weighted as it comes with the previous step's
weights (:class:`~dograph_jax.LaggedGrads`: its losses are known once the
optimizer head has run the pass).

A new method is one class with these three methods plus one line in
:data:`CLASSES` (a new online mixer needs only its line in
``methods.ONLINE``: the adapter serves it).

Shape legend: ``B`` batch, ``T`` sequence length, ``D`` human domains.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import dograph_jax as dg
from dograph_jax.mixing import MixingInputs, domain_counts
from dograph_jax.mixing.base import sampling_proportions
from dograph_jax.mixing.rnb import domain_head_grads
from dograph_jax.models import apply, sequence_loss, taps, token_losses
from dograph_jax.train import methods

PyTree = Any


class MethodOutput(NamedTuple):
  """What a method computed from a batch."""
  losses: jax.Array   # (B,) per-sequence mean token loss (None from a LaggedGrads step until its head ran)
  grads: Any          # what the optimizer reduces: a gradient, (B, ...) per-sample gradients or FactoredGrads
  state: PyTree       # the method's new state
  update_args: dict   # extra arguments of the optimizer head's update (DoGraph's per-sample losses)


class Report(NamedTuple):
  """A step as the method reads it, once its optimizer head has run."""
  loss: jax.Array     # () the training loss logged and checked (NaN: nothing left to train on)
  skip: jax.Array     # () bool, leave the step out (clip, AdamW and params do not move)
  metrics: dict       # method-specific metrics of the step
  state: PyTree       # the method's state after the step


class Method(Protocol):
  """A data-mixing method inside the train step (see the module docstring)."""

  def init(self, params: PyTree, human_domains: int) -> PyTree:
    """The method's state (``()`` if none) over ``human_domains`` human domains."""

  def grads(self, params: PyTree, state: PyTree, batch: dict, step: jax.Array) -> MethodOutput:
    """Losses and the gradient material of ``batch`` (``tokens`` (B, T + 1), ``domain_id`` (B,))."""

  def report(self, out: MethodOutput, head_state: Any, batch: dict) -> Report:
    """The step's loss, skip flag, metrics and the method's new state;
    ``head_state``: DoGraph's state, or None."""

  # Optional, for a method that applies its weights by sampling
  # (``--apply_weights sample``):
  # def proportions(self, state, step, base_D) -> (D,) proportions of the batch of ``step``.


def _sequence_losses(graphdef, params, tokens_BxT1):
  """``((B,) per-sequence mean loss, (B, T) token losses)``."""
  tok_BxT = token_losses(apply(graphdef, params, tokens_BxT1[:, :-1]), tokens_BxT1[:, 1:])
  return tok_BxT.mean(1), tok_BxT


def split_micro(x: jax.Array, n: int) -> jax.Array:
  """``(B, ...) -> (n, B / n, ...)``: micro-batch ``j`` holds rows ``j, j + n,
  j + 2n, ...``. Strided, not contiguous: a batch sharded over devices in
  contiguous blocks gives every device its own share of every micro-batch,
  so the split moves no data between devices."""
  b = x.shape[0]
  if b % n:
    raise ValueError(f"a batch of {b} rows cannot be split into {n} micro-batches")
  return x.reshape((b // n, n) + x.shape[1:]).swapaxes(0, 1)


def join_micro(y: jax.Array) -> jax.Array:
  """The inverse of :func:`split_micro`: ``(n, B / n, ...) -> (B, ...)``."""
  return y.swapaxes(0, 1).reshape((-1,) + y.shape[2:])


def _f32_zeros(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), tree)


def _add_f32(acc: PyTree, x: PyTree) -> PyTree:
  return jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, x)


def _like(acc: PyTree, params: PyTree) -> PyTree:
  return jax.tree.map(lambda a, p: a.astype(p.dtype), acc, params)


def weighted_grad_by_micro(graphdef, params: PyTree, tokens_BxT1: jax.Array, w_B: jax.Array,
                           n: int) -> PyTree:
  """``grad sum_i w_i l_i`` over ``n`` micro-batches: each one's forward pass
  is run again and backpropagates its rows' weights (float32 accumulation,
  returned in the parameters' dtype)."""
  def body(acc, x):
    toks, w = x
    losses, vjp, _ = jax.vjp(lambda p: _sequence_losses(graphdef, p, toks), params, has_aux=True)
    return _add_f32(acc, vjp(w.astype(losses.dtype))[0]), None
  acc, _ = jax.lax.scan(body, _f32_zeros(params),
                        (split_micro(tokens_BxT1, n), split_micro(w_B, n)))
  return _like(acc, params)


class PlainMethod:
  """Gradient of the batch-mean loss."""

  def __init__(self, graphdef, micro_batches: int = 1):
    self.graphdef, self.micro_batches = graphdef, micro_batches

  def init(self, params, human_domains):
    return ()

  def grads(self, params, state, batch, step):
    tokens = batch["tokens"]
    if self.micro_batches > 1:
      return self._micro_grads(params, state, tokens)

    def mean_loss(p):
      per_seq = token_losses(apply(self.graphdef, p, tokens[:, :-1]), tokens[:, 1:]).mean(1)
      return per_seq.mean(), per_seq
    (_, losses), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
    return MethodOutput(losses, grads, state, {})

  def _micro_grads(self, params, state, tokens):
    # Each micro-batch contributes sum(its losses) / B: the sum over them is
    # the batch mean's gradient.
    b = tokens.shape[0]

    def body(acc, toks):
      def part(p):
        per_seq = _sequence_losses(self.graphdef, p, toks)[0]
        return per_seq.sum() / b, per_seq
      (_, losses), g = jax.value_and_grad(part, has_aux=True)(params)
      return _add_f32(acc, g), losses
    acc, losses = jax.lax.scan(body, _f32_zeros(params), split_micro(tokens, self.micro_batches))
    return MethodOutput(join_micro(losses), _like(acc, params), state, {})

  def report(self, out, head_state, batch):
    return Report(jnp.mean(out.losses), jnp.zeros((), bool), {}, out.state)


class DoGraphMethod:
  """Per-sample material for ``dograph_transform`` (the optimizer's head).

  The failure policy (docs/method.md §4): the transform drops non-finite
  samples and counts them, so the loss is the mean over the kept ones (NaN
  only when none is left: the host then stops); a step that kept no sample,
  or a second-backward step with a dropped sample, or a lagged step
  (``update="lagged"``) whose kept samples all have coefficient 0, is
  skipped whole.
  """

  def __init__(self, graphdef, *, sketch: str, update: str, sketch_dim: int, seed: int,
               normalize_blocks: bool, samples: bool = False, decay: float = 0.9,
               micro_batches: int = 1):
    self.graphdef, self.sketch, self.update = graphdef, sketch, update
    self.sketch_dim, self.seed, self.normalize_blocks = sketch_dim, seed, normalize_blocks
    self.samples, self.decay, self.micro_batches = samples, decay, micro_batches

  def init(self, params, human_domains):
    if not self.samples:
      return ()
    if human_domains < 1:
      raise ValueError("DoGraph's sample form needs the corpus's sampling groups (human_domains >= 1)")
    return DoGraphSampling(ratio=jnp.ones((human_domains,), jnp.float32))

  def grads(self, params, state, batch, step):
    tokens = batch["tokens"]
    n = self.micro_batches
    if self.sketch == "factored":
      def sequence_losses(model, tokens_BxT1):  # the factored engine's per-sample losses
        return token_losses(model(tokens_BxT1[:, :-1]), tokens_BxT1[:, 1:]).mean(1)

      def engine(toks, update):
        return dg.factored_grads(sequence_losses, self.graphdef, params, toks,
                                 dg.projection_key(self.seed), self.sketch_dim,
                                 update=update, normalize_blocks=self.normalize_blocks)
      if self.update == "lagged":
        # Losses: known once the transform has run the pass (make_train_step).
        return MethodOutput(None, self._lagged(engine, params, tokens), state, {})
      if n == 1:
        fast = engine(tokens, self.update)
        return MethodOutput(fast.losses, fast, state, {})
      # Micro-batches: the clusters and weights need every sample's sketch
      # before the update, so pass 1 keeps only (losses, sketches) of each
      # micro-batch (B x K floats; its stored layer tensors are dropped), and
      # the update sum_i a_i g_i is a second pass (a forward and a backward
      # per micro-batch). docs/method.md, "Micro-batches", has the trade.
      def sketch_one(_, toks):
        fast = engine(toks, "bookkeeping")  # its update map is never called: XLA drops it
        return None, (fast.losses, fast.sketches)
      _, (losses, sketches) = jax.lax.scan(sketch_one, None, split_micro(tokens, n))

      def weighted_grad(a_B, keep_B=None):
        # Like the second-backward engine, a pass cannot leave a non-finite
        # sample out (0 * NaN is NaN): the transform skips such a step.
        del keep_B
        return weighted_grad_by_micro(self.graphdef, params, tokens, a_B, n)
      fast = dg.FactoredGrads(join_micro(losses), join_micro(sketches), weighted_grad, True)
      return MethodOutput(fast.losses, fast, state, {})
    loss_one = lambda p, tokens_T1: sequence_loss(self.graphdef, p, tokens_T1)
    # Per-sample gradients are (B, ...) whatever the split; chunks bound the
    # backward passes' activations to one micro-batch at a time.
    losses, grads = dg.per_sample_loss_and_grads(
        loss_one, params, tokens, chunk_size=None if n == 1 else tokens.shape[0] // n)
    return MethodOutput(losses, grads, state, {"losses": losses})

  def _lagged(self, engine, params, tokens) -> dg.LaggedGrads:
    """Design (c) of docs/method.md §7b: one pass over the micro-batches,
    each weighted as it comes by the transform's ``ratio_fn`` (the previous
    step's weights), its ``sum_i r_i g_i`` added by book-keeping before its
    stored tensors are dropped."""
    n, made = self.micro_batches, []

    def run(ratio_fn):
      def one(acc, toks):
        fast = engine(toks, "bookkeeping")
        r_b, kept_b = ratio_fn(fast.sketches, fast.losses)
        acc = _add_f32(acc, fast.weighted_grad(r_b, kept_b))
        return acc, (fast.losses, fast.sketches, r_b)
      acc, (losses, sketches, ratios) = jax.lax.scan(one, _f32_zeros(params),
                                                     split_micro(tokens, n))
      made.append(dg.LaggedPass(join_micro(losses), join_micro(sketches), join_micro(ratios),
                                acc))
      return made[-1]

    def result():
      if not made:
        raise RuntimeError("LaggedGrads.result() before the transform ran the pass")
      return made[-1]
    return dg.LaggedGrads(run, result)

  def report(self, out, head_state, batch):
    # The samples the transform kept (it drops those with a non-finite loss
    # or gradient, or a sketch beyond dg.MAX_SKETCH_ENTRY).
    kept_B = head_state.kept
    kept = jnp.sum(kept_B)
    loss = jnp.where(kept > 0, jnp.sum(jnp.where(kept_B, out.losses, 0.0))
                     / jnp.maximum(kept, 1), jnp.nan)
    skip = kept == 0
    if isinstance(out.grads, dg.FactoredGrads) and out.grads.second_backward:
      skip = skip | (kept < kept_B.shape[0])
    if isinstance(out.grads, dg.LaggedGrads) and not self.samples:
      # Every kept row fell in a domain whose lagged weight is 0: no update.
      skip = skip | (jnp.sum(head_state.coefficients) <= 0)
    metrics = dict(weights=head_state.applied_weights, counts=head_state.counts,
                   assignments=head_state.assignments, nonfinite=head_state.nonfinite,
                   coefficients=head_state.coefficients)
    if head_state.frequencies is not None:
      metrics["frequencies"] = head_state.frequencies
    state = out.state
    if self.samples:
      state = _running_ratio(out.state, head_state.coefficients, kept_B, batch["domain_id"],
                             self.decay)
      metrics["sampling_ratio"] = state.ratio
    return Report(loss, skip, metrics, state)

  def proportions(self, state: DoGraphSampling, step, base_D):
    """``(D,)`` sampling proportions ``base_d * ratio_d`` (normalised): each
    sampling group drawn as much more or less than at the run's proportions
    as DoGraph's coefficients weigh its rows on average."""
    q = jnp.asarray(base_D, jnp.float32) * state.ratio
    return q / jnp.sum(q)


class DoGraphSampling(NamedTuple):
  """DoGraph's state in the sample form (``--apply_weights sample``)."""
  ratio: jax.Array    # (D,) running mean coefficient of each sampling group's rows, x B (1: natural)


def _running_ratio(state: DoGraphSampling, a_B, kept_B, domain_id, decay) -> DoGraphSampling:
  """Moves each sampling group's ratio towards the batch's mean ``B a_i``
  over its kept rows (``a_i`` DoGraph's in-batch coefficients, summing to 1:
  ``B a_i = 1`` is the natural weight of a row). A group absent from the
  batch keeps its ratio. The mean is per row, so it does not depend on how
  many rows of the group the sampler drew."""
  num = state.ratio.shape[0]
  kept = kept_B.astype(jnp.float32)
  rows = jnp.zeros((num,), jnp.float32).at[domain_id].add(kept)
  mass = jnp.zeros((num,), jnp.float32).at[domain_id].add(a_B * kept) * jnp.sum(kept)
  batch_ratio = mass / jnp.maximum(rows, 1.0)
  ok = (rows > 0) & jnp.isfinite(batch_ratio)
  return DoGraphSampling(jnp.where(ok, decay * state.ratio + (1.0 - decay) * batch_ratio,
                                   state.ratio))


class MixerState(NamedTuple):
  """An online mixer's part of the train state."""
  mixer: PyTree       # the OnlineMixer's own state (weights, weights_sum, count, ...)
  hparams: dict       # its float hyperparameters, traced: changing one does not recompile
  ref_params: PyTree  # a frozen reference model (DoReMi's proxy run), or None


class MixerMethod:
  """Adapter over an :class:`~dograph_jax.mixing.OnlineMixer`: per-sample loss
  weights from the step's losses, the update ``grad(sum_i w_i l_i)``.

  What the mixer ``needs`` is computed here: reference-model token losses,
  the Gram matrix of per-domain gradients (formed on the device by a
  ``vmap`` of the same ``vjp``), held-out probe losses (``probe_tokens``
  (D, P, T + 1), a compile-time constant), per-domain sums of the output
  layer's per-sample gradients ``d_logits^T h`` (R&B).
  """

  def __init__(self, graphdef, method: str, method_args, *, apply_weights: str = "paper",
               probe_tokens=None, ref_params=None, micro_batches: int = 1):
    self.graphdef, self.method, self.apply_weights = graphdef, method, apply_weights
    self.micro_batches = micro_batches
    self.static, self.traced = methods.parse_method_args(method, method_args)
    self.probe_tokens = None if probe_tokens is None else jnp.asarray(probe_tokens, jnp.int32)
    self.ref_params = ref_params

  def _mixer(self, human_domains: int, hparams):
    return methods.build_mixer(self.method, human_domains, self.static, hparams)

  def form(self, human_domains: int) -> str:
    """How the weights act (``methods.weights_form``): ``sample`` draws the
    batch with :meth:`proportions` and steps on the batch mean; ``reweight``
    and ``per_sample`` weight the batch's losses."""
    paper = self._mixer(human_domains, self.traced).form
    return methods.weights_form(self.method, self.apply_weights, paper)

  def proportions(self, state: MixerState, step: jax.Array, base_D) -> jax.Array:
    """``(D,)`` proportions to draw step ``step``'s batch with (sample form),
    from the state after step ``step - 1``; ``base_D``, the run's own, while
    the mixer has none (all zeros)."""
    mixer = self._mixer(state.mixer.weights.shape[0], state.hparams)
    p = sampling_proportions(mixer, state.mixer, step).astype(jnp.float32)
    return jnp.where(jnp.sum(p) > 0, p, jnp.asarray(base_D, jnp.float32))

  def init(self, params, human_domains):
    if human_domains < 1:
      raise ValueError(f"method {self.method!r} needs human_domains >= 1 (the domain labels of the corpus)")
    mixer = self._mixer(human_domains, self.traced)
    if "ref_token_losses" in mixer.needs and self.ref_params is None:
      raise ValueError(f"method {self.method!r} needs a reference model (--reference_dir)")
    init = mixer.init(width=_head_width(params)) if "head_grads" in mixer.needs else mixer.init()
    # Copy every leaf: an init may use one array for several fields, and the
    # donated train state must not hold the same buffer twice.
    return MixerState(mixer=jax.tree.map(lambda x: jnp.array(x, copy=True), init),
                      hparams=methods.traced_state(self.traced), ref_params=self.ref_params)

  def grads(self, params, state, batch, step):
    human_domains = state.mixer.weights.shape[0]
    mixer = self._mixer(human_domains, state.hparams)
    tokens, domain_id = batch["tokens"], batch["domain_id"]
    counts_D = domain_counts(domain_id, human_domains)
    sample = self.form(human_domains) == "sample"
    b, n = tokens.shape[0], self.micro_batches
    if n == 1:
      losses_B, vjp, rows, sums = self._material(params, state, mixer, tokens, domain_id, counts_D)
    else:
      # Pass 1: what the mixer reads, micro-batch by micro-batch (per-row
      # fields stacked, per-domain sums added); in the sample form the step
      # is the batch mean, which this pass also accumulates.
      def body(carry, x):
        acc, sums = carry
        toks, ids = x
        losses, vjp, rows, part = self._material(params, state, mixer, toks, ids, counts_D)
        if sample:
          acc = _add_f32(acc, vjp(jnp.full_like(losses, 1.0 / b))[0])
        return (acc, _add_f32(sums, part)), (losses, rows)
      sums0 = _f32_zeros(jax.eval_shape(
          lambda: self._material(params, state, mixer, split_micro(tokens, n)[0],
                                 split_micro(domain_id, n)[0], counts_D)[3]))
      (acc, sums), (losses_B, rows) = jax.lax.scan(
          body, (_f32_zeros(params) if sample else (), sums0),
          (split_micro(tokens, n), split_micro(domain_id, n)))
      losses_B, rows = join_micro(losses_B), jax.tree.map(join_micro, rows)
    fields = dict(losses=losses_B, domain_id=domain_id, step=step, domain_counts=counts_D, **rows)
    if "domain_gram" in mixer.needs:
      g = sums["domain_grads"]
      fields["domain_gram"] = sum(
          (x.reshape(human_domains, -1) @ x.reshape(human_domains, -1).T).astype(jnp.float32)
          for x in jax.tree.leaves(g))
    if "head_grads" in mixer.needs:
      fields["head_grads"] = sums["head_grads"]
    if "probe_losses" in mixer.needs:
      if self.probe_tokens is None:
        raise ValueError(f"method {self.method!r} needs probe_tokens (D, P, T + 1)")
      fields["probe_losses"] = jax.vmap(
          lambda rows: _sequence_losses(self.graphdef, params, rows)[0].mean())(self.probe_tokens)
    weights_B, mixer_state = mixer.update(state.mixer, MixingInputs(**fields))
    if sample:
      # The batch was drawn with the mixer's proportions: its plain mean is
      # the step (the mixer still learnt from its losses above).
      weights_B = jnp.full_like(losses_B, 1.0 / b)
    weights_B = jax.lax.stop_gradient(weights_B).astype(losses_B.dtype)
    if n == 1:
      grads = vjp(weights_B)[0]
    elif sample:
      grads = _like(acc, params)
    else:  # pass 2: each micro-batch again, backpropagating its rows' weights
      grads = weighted_grad_by_micro(self.graphdef, params, tokens, weights_B, n)
    return MethodOutput(losses_B, grads, state._replace(mixer=mixer_state), {})

  def _material(self, params, state, mixer, tokens, domain_id, counts_D):
    """One forward pass over ``tokens`` (the batch or a micro-batch) and what
    the mixer ``needs`` from it: ``(losses (b,), vjp, per-row fields, sums)``;
    ``sums`` (per-domain sums over these rows, added across micro-batches):
    ``domain_grads`` (D, ...) the rows' shares of each domain's mean-loss
    gradient, ``head_grads`` (D, F) R&B's output-layer sums."""
    graphdef = self.graphdef
    human_domains = counts_D.shape[0]
    if "head_grads" in mixer.needs:
      losses_B, vjp, (tok_BxT, h, logits) = jax.vjp(
          lambda p: _losses_and_head(graphdef, p, tokens), params, has_aux=True)
    else:
      losses_B, vjp, tok_BxT = jax.vjp(lambda p: _sequence_losses(graphdef, p, tokens), params,
                                       has_aux=True)
    rows, sums = {}, {}
    if "token_losses" in mixer.needs:
      rows["token_losses"] = tok_BxT
    if "ref_token_losses" in mixer.needs:
      rows["ref_token_losses"] = _sequence_losses(graphdef, state.ref_params, tokens)[1]
    if "domain_gram" in mixer.needs:
      # Per-domain mean-loss gradients g_d = vjp(onehot_d / n_d), all D at
      # once (n_d: the whole batch's count, so micro-batches add up to g_d);
      # only their (D, D) Gram matrix leaves the step (DoGE never copies
      # per-domain gradients off the device).
      per_domain_DxB = (jax.nn.one_hot(domain_id, human_domains, dtype=jnp.float32).T
                        / jnp.maximum(counts_D, 1)[:, None])
      sums["domain_grads"] = jax.vmap(lambda c: vjp(c)[0])(per_domain_DxB)
    if "head_grads" in mixer.needs:
      # Each sample's own loss gradient w.r.t. its logits (the sum separates
      # over samples), then the per-domain sums of the output layer's
      # per-sample gradients d^T h (R&B; dograph_jax/mixing/rnb.py).
      targets = tokens[:, 1:]
      d_logits = jax.grad(lambda lg: token_losses(lg, targets).mean(1).sum())(
          jax.lax.stop_gradient(logits))
      sums["head_grads"] = domain_head_grads(jax.lax.stop_gradient(h), d_logits, domain_id,
                                             human_domains, mixer.head_sketch_dim)
    return losses_B, vjp, rows, sums

  def report(self, out, head_state, batch):
    return Report(jnp.mean(out.losses), jnp.zeros((), bool), {"weights": out.state.mixer.weights},
                  out.state)


def _head_width(params) -> int:
  """``V * d_model`` of the output layer (tied embedding or ``lm_head``)."""
  if "lm_head" in params:
    return int(np.prod(params["lm_head"]["kernel"].shape))
  return int(np.prod(params["wte"]["embedding"].shape))


def _losses_and_head(graphdef, params, tokens_BxT1):
  """``(losses (B,), (token losses (B, T), h (B, T, Dm), logits (B, T, V)))``:
  the forward pass with the output layer's input ``h`` recorded (the taps
  of ``models/taps.py``: ``head_inputs`` of a tied model, ``lm_head``'s
  ``inputs`` of an untied one)."""
  model = nnx.merge(graphdef, params)
  with taps.tapping():
    logits, inter = nnx.capture(lambda m, t: m(t), nnx.Intermediate)(model, tokens_BxT1[:, :-1])
  inter = nnx.to_pure_dict(inter)
  h = inter["lm_head"]["inputs"] if "lm_head" in inter else inter["head_inputs"]
  h = h[0] if isinstance(h, (tuple, list)) else h
  tok_BxT = token_losses(logits, tokens_BxT1[:, 1:])
  return tok_BxT.mean(1), (tok_BxT, h, logits)


# Method name -> its class: the one registry line a new method adds.
CLASSES = {"uniform": PlainMethod, "dograph": DoGraphMethod,
           **{name: MixerMethod for name in methods.ONLINE}}


def make_method(cfg, graphdef, *, probe_tokens=None, ref_params=None) -> Method:
  """The :class:`Method` of ``cfg.method`` (a ``TrainConfig``)."""
  cls = CLASSES.get(cfg.method)
  if cls is None:
    raise ValueError(f"method {cfg.method!r} is an offline pipeline (dograph_jax/train/offline.py); "
                     "its runs train with method uniform or a proxy mixer")
  if cls is DoGraphMethod:
    return DoGraphMethod(graphdef, sketch=cfg.sketch, update=cfg.update,
                         sketch_dim=cfg.dograph.resolved_sketch_dim(cfg.sketch), seed=cfg.run.seed,
                         normalize_blocks=cfg.dograph.normalize_blocks,
                         samples=cfg.apply_weights == "sample", decay=cfg.dograph.decay,
                         micro_batches=cfg.optim.micro_batches)
  if cls is MixerMethod:
    return MixerMethod(graphdef, cfg.method, cfg.method_args, apply_weights=cfg.apply_weights,
                       probe_tokens=probe_tokens, ref_params=ref_params,
                       micro_batches=cfg.optim.micro_batches)
  return cls(graphdef, micro_batches=cfg.optim.micro_batches)
