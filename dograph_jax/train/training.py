"""The pieces of the pretraining loop: optimizer, train state, train/eval steps.

The optimizer is ``optax.chain([dograph_transform], clip_by_global_norm,
adamw)`` with a linear warm-up + cosine learning rate (docs/method.md §6), wrapped in
``optax.inject_hyperparams`` so that every hyperparameter that does not change
a shape (peak learning rate, weight decay, DoGraph's temperature, lambdas,
EMA, floor, decay, anchor, cap, re-seeding threshold) lives in the optimizer state: changing it (a sweep) reuses the
compiled train step.

The train step is one jitted function with the train state donated:

* ``uniform``: gradient of the batch-mean loss;
* ``dograph`` with ``--sketch factored`` (default): the factored engine
  (``dograph_jax.factored_grads``) computes per-sample losses and Kronecker
  sketches in one forward/backward pass and hands ``dograph_transform`` a map
  from the coefficients ``a`` to the weighted gradient (book-keeping, or a
  second backward with ``--update second_backward``);
* ``dograph`` with ``--sketch reference``: per-sample gradients
  (``vmap(grad)``), sketched and reduced by ``dograph_transform``;
* an online baseline (``dograph_jax/train/methods.py``): one forward pass gives the
  per-sequence losses and a ``vjp``; the method's ``OnlineMixer`` turns the
  losses (and what else it ``needs``: reference-model token losses, the Gram
  matrix of per-domain gradients formed on the device by a ``vmap`` of the
  same ``vjp``, held-out probe losses, per-domain sums of the output layer's
  per-sample gradients ``d_logits^T h`` from the recorded head input — R&B)
  into per-sample weights ``w``; the update is ``vjp(w) = grad(sum_i w_i
  l_i)`` — one backward pass.

Shape legend: ``B`` batch, ``T`` sequence length, ``M`` DoGraph domains.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import dograph_jax as dg
from dograph_jax.mixing import MixingInputs, domain_counts
from dograph_jax.mixing.rnb import domain_head_grads
from dograph_jax.models import (apply, build, get_config, sequence_loss, split_model, taps,
                                token_losses)

from dograph_jax.train import methods
from dograph_jax.train import config
from dograph_jax.train.config import TrainConfig

# The traced hyperparameters (changing one reuses the compiled step), by
# their option names -> the optimizer factory's argument names.
SWEEPABLE = {"lr": "learning_rate", "weight_decay": "weight_decay",
             **{name: name for name in config.DOGRAPH_TRACED}}
# Arguments of `optimizer_factory` fixed at construction (shapes or control flow).
OPTIMIZER_STATIC = ("dograph", "warmup_steps", "total_steps", "clip_norm")


def warmup_cosine(count: jax.Array, warmup_steps: int, total_steps: int,
                  final_fraction: float = 0.1) -> jax.Array:
  """Learning-rate multiplier: linear 0 -> 1 over ``warmup_steps``, then a
  cosine from 1 to ``final_fraction`` at ``total_steps``."""
  count = jnp.asarray(count, jnp.float32)
  warm = jnp.minimum(1.0, (count + 1.0) / max(warmup_steps, 1))
  progress = jnp.clip((count - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
  cosine = final_fraction + (1 - final_fraction) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
  return jnp.where(count < warmup_steps, warm, cosine)


def optimizer_factory(learning_rate, weight_decay, *, dograph: dict | None, warmup_steps: int,
                      total_steps: int, clip_norm: float,
                      **dograph_traced) -> optax.GradientTransformationExtraArgs:
  """The run's optimizer: ``[dograph_transform], clip, AdamW`` with warm-up +
  cosine. ``dograph``: the transform's static keyword arguments (None: no
  DoGraph); the learning rate, weight decay and ``dograph_traced`` (the
  transform's float hyperparameters) may be traced."""
  schedule = lambda count: learning_rate * warmup_cosine(count, warmup_steps, total_steps)
  tail = [optax.clip_by_global_norm(clip_norm),
          optax.adamw(schedule, weight_decay=weight_decay)]
  if dograph is None:
    return optax.chain(*tail)
  return optax.chain(dg.dograph_transform(**dograph, **dograph_traced), *tail)


# `inject_hyperparams` binds the factory's *signature*: name each of
# DoGraph's traced hyperparameters there (defaults None: unused without
# DoGraph), so they become arrays in the optimizer state, not one dict.
optimizer_factory.__signature__ = inspect.signature(optimizer_factory).replace(parameters=[
    *[p for p in inspect.signature(optimizer_factory).parameters.values()
      if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD],
    *[inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
      for name in config.DOGRAPH_TRACED],
    *[p for p in inspect.signature(optimizer_factory).parameters.values()
      if p.kind is inspect.Parameter.KEYWORD_ONLY]])


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformationExtraArgs:
  """``inject_hyperparams(optimizer_factory)`` configured from ``cfg``."""
  hyper = {"learning_rate": cfg.optim.lr, "weight_decay": cfg.optim.weight_decay}
  dograph = None
  if cfg.method == "dograph":
    dograph = cfg.dograph.transform_kwargs(seed=cfg.run.seed, batch_size=cfg.optim.batch_size)
    hyper.update({name: dograph.pop(name) for name in config.DOGRAPH_TRACED})
  static = dict(dograph=dograph, warmup_steps=min(cfg.optim.warmup_steps, cfg.optim.steps),
                total_steps=cfg.optim.steps, clip_norm=cfg.optim.clip_norm)
  return optax.inject_hyperparams(optimizer_factory, static_args=OPTIMIZER_STATIC)(
      **hyper, **static)


def set_hyperparams(opt_state, **values):
  """Return ``opt_state`` with traced hyperparameters replaced (TrainConfig names)."""
  hyper = dict(opt_state.hyperparams)
  for name, value in values.items():
    inner = SWEEPABLE[name]
    hyper[inner] = jnp.asarray(value, hyper[inner].dtype)
  return opt_state._replace(hyperparams=hyper)


def dograph_state(opt_state) -> dg.DoGraphState | None:
  """The DoGraph state inside the injected chain, or None for ``uniform``."""
  first = opt_state.inner_state[0]
  return first if isinstance(first, dg.DoGraphState) else None


def build_model(cfg: TrainConfig, vocab_size: int):
  """``(model_config, graphdef, params)`` for ``cfg.model.name`` and the tokenizer."""
  dtype = jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32
  model_cfg = get_config(cfg.model.name, vocab_size=vocab_size, dtype=dtype)
  if cfg.optim.seq_len > model_cfg.n_positions:
    raise ValueError(f"--seq_len {cfg.optim.seq_len} exceeds the context of model "
                     f"{cfg.model.name!r} ({model_cfg.n_positions} positions).")
  model = build(model_cfg, nnx.Rngs(cfg.run.seed))
  graphdef, params = split_model(model)
  return model_cfg, graphdef, params


def init_train_state(params, tx, cfg: TrainConfig | None = None, num_domains: int = 0,
                     ref_params=None) -> dict:
  """``{"params", "opt_state", "step"}``; for an online baseline (``cfg``
  given) also ``"mixer"`` (its state over ``num_domains`` human domains) and
  ``"mixer_hparams"`` (its float hyperparameters, traced by the step so that
  changing them does not recompile); ``"ref_params"``: a frozen reference
  model (DoReMi's proxy run)."""
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
  if cfg is not None and methods.kind(cfg.method) == "online":
    if num_domains < 1:
      raise ValueError(f"method {cfg.method!r} needs num_domains (the human domains)")
    static, traced = methods.parse_method_args(cfg.method, cfg.method_args)
    mixer = methods.build_mixer(cfg.method, num_domains, static, traced)
    if "ref_token_losses" in mixer.needs and ref_params is None:
      raise ValueError(f"method {cfg.method!r} needs a reference model (--reference_dir)")
    # Copy every leaf: an init may use one array for several fields, and the
    # donated train state must not hold the same buffer twice.
    init = mixer.init(width=_head_width(params)) if "head_grads" in mixer.needs else mixer.init()
    state["mixer"] = jax.tree.map(lambda x: jnp.array(x, copy=True), init)
    state["mixer_hparams"] = methods.traced_state(traced)
  if ref_params is not None:
    state["ref_params"] = ref_params
  return state


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


def _sequence_losses(graphdef, params, tokens_BxT1):
  """``((B,) per-sequence mean loss, (B, T) token losses)``."""
  tok_BxT = token_losses(apply(graphdef, params, tokens_BxT1[:, :-1]), tokens_BxT1[:, 1:])
  return tok_BxT.mean(1), tok_BxT


def _mixer_grads(graphdef, cfg: TrainConfig, state, batch, probe_tokens):
  """An online baseline's per-sequence losses, gradient and new mixer state."""
  static, _ = methods.parse_method_args(cfg.method, cfg.method_args)
  num_domains = state["mixer"].weights.shape[0]
  mixer = methods.build_mixer(cfg.method, num_domains, static, state["mixer_hparams"])
  params, tokens, domain_id = state["params"], batch["tokens"], batch["domain_id"]
  if "head_grads" in mixer.needs:
    losses_B, vjp, (tok_BxT, h, logits) = jax.vjp(
        lambda p: _losses_and_head(graphdef, p, tokens), params, has_aux=True)
  else:
    losses_B, vjp, tok_BxT = jax.vjp(lambda p: _sequence_losses(graphdef, p, tokens), params,
                                     has_aux=True)
  counts_D = domain_counts(domain_id, num_domains)
  fields = dict(losses=losses_B, domain_id=domain_id, step=state["step"],
                domain_counts=counts_D)
  if "token_losses" in mixer.needs:
    fields["token_losses"] = tok_BxT
  if "ref_token_losses" in mixer.needs:
    fields["ref_token_losses"] = _sequence_losses(graphdef, state["ref_params"], tokens)[1]
  if "domain_gram" in mixer.needs:
    # Per-domain mean-loss gradients g_d = vjp(onehot_d / n_d), all D at once;
    # only their (D, D) Gram matrix leaves this function (DoGE never copies
    # per-domain gradients off the device).
    per_domain_DxB = (jax.nn.one_hot(domain_id, num_domains, dtype=jnp.float32).T
                      / jnp.maximum(counts_D, 1)[:, None])
    grads_D = jax.vmap(lambda c: vjp(c)[0])(per_domain_DxB)
    fields["domain_gram"] = sum(
        (g.reshape(num_domains, -1) @ g.reshape(num_domains, -1).T).astype(jnp.float32)
        for g in jax.tree.leaves(grads_D))
  if "head_grads" in mixer.needs:
    # Each sample's own loss gradient w.r.t. its logits (the sum separates
    # over samples), then the per-domain sums of the output layer's
    # per-sample gradients d^T h (R&B; dograph_jax/mixing/rnb.py).
    targets = tokens[:, 1:]
    d_logits = jax.grad(lambda lg: token_losses(lg, targets).mean(1).sum())(
        jax.lax.stop_gradient(logits))
    fields["head_grads"] = domain_head_grads(jax.lax.stop_gradient(h), d_logits, domain_id,
                                             num_domains, mixer.head_sketch_dim)
  if "probe_losses" in mixer.needs:
    if probe_tokens is None:
      raise ValueError(f"method {cfg.method!r} needs probe_tokens (D, P, T + 1)")
    fields["probe_losses"] = jax.vmap(
        lambda rows: _sequence_losses(graphdef, params, rows)[0].mean())(probe_tokens)
  weights_B, mixer_state = mixer.update(state["mixer"], MixingInputs(**fields))
  grads = vjp(jax.lax.stop_gradient(weights_B).astype(losses_B.dtype))[0]
  return losses_B, grads, mixer_state


def _all_finite(tree) -> jax.Array:
  """Whether every entry of ``tree`` is finite."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def make_train_step(graphdef, tx, cfg: TrainConfig, *, state_sharding=None,
                    batch_sharding=None, probe_tokens=None) -> Callable:
  """Jitted ``step(state, batch) -> (state, metrics)``; ``state`` is donated.

  ``metrics``: ``loss`` (batch mean), ``losses`` (B,), ``domain_id`` (B,),
  ``update_norm``, ``lr``; with DoGraph also ``weights`` (M,), ``counts``
  (M,), ``assignments`` (B,), ``nonfinite``; with an online baseline
  ``weights`` (D,), its current domain weights. ``probe_tokens`` (D, P, T + 1)
  int32: the held-out rows of each domain for a mixer that needs probe
  losses (Aioli); a compile-time constant of the step. The function's ``traces`` list
  grows by one each time JAX traces it (tests count compilations with it).

  On a mesh, pass ``state_sharding`` (``dograph_jax.sharding.state_shardings``)
  and ``batch_sharding`` (``batch_sharding(mesh)``): the new state then keeps
  the layout of the old one (its donated buffers are reused and the next
  step runs the same executable) and the metrics come back replicated, so
  that every host can read them.
  """
  traces = []
  method, warmup, total = cfg.method, min(cfg.optim.warmup_steps, cfg.optim.steps), cfg.optim.steps
  online = methods.kind(method) == "online"
  if methods.kind(method) == "offline":
    raise ValueError(f"method {method!r} is an offline pipeline (dograph_jax/train/offline.py); "
                     "its runs train with method uniform or a proxy mixer")
  if probe_tokens is not None:
    probe_tokens = jnp.asarray(probe_tokens, jnp.int32)

  def loss_one(params, tokens_T1):
    return sequence_loss(graphdef, params, tokens_T1)

  def sequence_losses(model, tokens_BxT1):  # the factored engine's per-sample losses
    return token_losses(model(tokens_BxT1[:, :-1]), tokens_BxT1[:, 1:]).mean(1)

  def step(state, batch):
    traces.append(1)
    params, opt_state = state["params"], state["opt_state"]
    tokens = batch["tokens"]
    if method == "dograph" and cfg.sketch == "factored":
      fast = dg.factored_grads(sequence_losses, graphdef, params, tokens,
                               dg.projection_key(cfg.run.seed), cfg.dograph.sketch_dim, update=cfg.update,
                               normalize_blocks=cfg.dograph.normalize_blocks)
      losses = fast.losses
      updates, opt_state = tx.update(fast, opt_state, params)
    elif method == "dograph":
      losses, grads = dg.per_sample_loss_and_grads(loss_one, params, tokens)
      updates, opt_state = tx.update(grads, opt_state, params, losses=losses)
    elif online:
      losses, grads, mixer_state = _mixer_grads(graphdef, cfg, state, batch, probe_tokens)
      updates, opt_state = tx.update(grads, opt_state, params)
    else:
      def mean_loss(p):
        per_seq = token_losses(apply(graphdef, p, tokens[:, :-1]), tokens[:, 1:]).mean(1)
        return per_seq.mean(), per_seq
      (_, losses), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
    inner = dograph_state(opt_state)
    # The failure policy (docs/method.md §4): DoGraph drops non-finite
    # samples and counts them, so its loss is the mean over the kept ones
    # (NaN only when none is left: the host then stops). A step
    # whose update is non-finite is never applied (the host stops naming it);
    # a step that kept no sample, or a second-backward step with a dropped
    # sample, is skipped whole: the transform zeroes its update, and
    # clipping/AdamW keep their state, so momentum and weight decay do not
    # move either.
    update_finite = _all_finite(updates)
    skipped = jnp.zeros((), bool)
    if method == "dograph":
      # The samples the transform kept (it drops those with a non-finite
      # loss or gradient, or a sketch beyond dg.MAX_SKETCH_ENTRY).
      kept_B = inner.kept
      kept = jnp.sum(kept_B)
      loss = jnp.where(kept > 0, jnp.sum(jnp.where(kept_B, losses, 0.0))
                       / jnp.maximum(kept, 1), jnp.nan)
      skipped = kept == 0
      if cfg.sketch == "factored" and cfg.update == "second_backward":
        skipped = skipped | (kept < kept_B.shape[0])
    else:
      loss = jnp.mean(losses)
    revert_all, revert_step = ~update_finite, ~update_finite | skipped
    pick = lambda revert: (lambda new, old: jnp.where(revert, old, new))
    params = jax.tree.map(pick(revert_step), optax.apply_updates(params, updates),
                          state["params"])
    new_opt_state, opt_state = opt_state, jax.tree.map(pick(revert_step), opt_state,
                                                       state["opt_state"])
    if inner is not None:  # DoGraph's own state (centroids, counts) keeps a skipped step
      head = jax.tree.map(pick(revert_all), new_opt_state.inner_state[0],
                          state["opt_state"].inner_state[0])
      opt_state = opt_state._replace(inner_state=(head, *opt_state.inner_state[1:]))
    # The metrics below describe this step as computed (`inner`), also when
    # its update was not applied.
    hyper = opt_state.hyperparams  # this step's values (inject_hyperparams)
    metrics = {"loss": loss, "losses": losses, "domain_id": batch["domain_id"],
               "update_norm": optax.tree.norm(updates), "update_finite": update_finite,
               "skipped": skipped,
               "lr": hyper["learning_rate"] * warmup_cosine(state["step"], warmup, total)}
    if inner is not None:
      metrics.update(weights=inner.applied_weights, counts=inner.counts,
                     assignments=inner.assignments, nonfinite=inner.nonfinite,
                     coefficients=inner.coefficients)
      if inner.frequencies is not None:
        metrics["frequencies"] = inner.frequencies
    new_state = {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}
    if online:
      new_state["mixer"] = mixer_state
      metrics["weights"] = mixer_state.weights
    return new_state, metrics

  shardings = {}
  if state_sharding is not None:
    replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
    shardings = dict(in_shardings=(state_sharding, batch_sharding),
                     out_shardings=(state_sharding, replicated))
  jitted = jax.jit(step, donate_argnums=0, **shardings)
  jitted.traces = traces
  return jitted


def make_eval_step(graphdef, mesh=None) -> Callable:
  """Jitted ``(params, tokens (B, T+1)) -> per-sequence mean loss (B,)``
  (replicated over ``mesh`` if given, so that every host can read it)."""
  def eval_step(params, tokens):
    return token_losses(apply(graphdef, params, tokens[:, :-1]), tokens[:, 1:]).mean(1)
  if mesh is None:
    return jax.jit(eval_step)
  return jax.jit(eval_step, out_shardings=jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()))


def abstract_like(tree: Any) -> Any:
  """Shapes, dtypes and (for arrays) shardings: a restore lands where ``tree`` is."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x),
                                                     sharding=getattr(x, "sharding", None)),
                      tree)
