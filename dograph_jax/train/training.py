"""The pieces of the pretraining loop: optimizer, train state, train/eval steps.

The optimizer (docs/method.md §6) is ``[dograph_transform] -> clip_by_global_norm
-> adamw`` with a linear warm-up + cosine learning rate, held as two parts:
the *head* (DoGraph's transform, which reduces the batch axis; absent for
the other methods) and the *tail* (clip + AdamW inside
:func:`~dograph_jax.train.skip_step.skip_step`, the failure policy of
docs/method.md §4: a non-finite or skipped step moves neither AdamW's state
nor the parameters). Each part is wrapped in ``optax.inject_hyperparams``,
so every hyperparameter that does not change a shape (peak learning rate,
weight decay, DoGraph's float arguments) lives in the optimizer state:
changing it (a sweep) reuses the compiled train step. The two parts compose
exactly like ``optax.chain(head, clip, adamw)``; they are kept apart so that
the step can ask DoGraph which samples it kept before the tail runs.

The train step is one short jitted function, the same for every method;
what differs between methods is a :class:`~dograph_jax.train.method.Method`
(``dograph_jax/train/method.py``). The train state is a typed
:class:`TrainState`, donated to the step.

Shape legend: ``B`` batch, ``T`` sequence length, ``M`` DoGraph domains.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import dograph_jax as dg
from dograph_jax.models import apply, build, get_config, split_model, token_losses
from dograph_jax.train import config
from dograph_jax.train.config import TrainConfig
from dograph_jax.train.method import Method, make_method
from dograph_jax.train.skip_step import skip_step

# The traced hyperparameters (changing one reuses the compiled step), by
# their option names -> their names in the injected states.
SWEEPABLE = {"lr": "learning_rate", "weight_decay": "weight_decay",
             **{name: name for name in config.DOGRAPH_TRACED}}


def warmup_cosine(count: jax.Array, warmup_steps: int, total_steps: int,
                  final_fraction: float = 0.1) -> jax.Array:
  """Learning-rate multiplier: linear 0 -> 1 over ``warmup_steps``, then a
  cosine from 1 to ``final_fraction`` at ``total_steps``."""
  count = jnp.asarray(count, jnp.float32)
  warm = jnp.minimum(1.0, (count + 1.0) / max(warmup_steps, 1))
  progress = jnp.clip((count - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
  cosine = final_fraction + (1 - final_fraction) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
  return jnp.where(count < warmup_steps, warm, cosine)


def _tail(learning_rate, weight_decay, *, warmup_steps: int, total_steps: int,
          clip_norm: float) -> optax.GradientTransformation:
  """clip + AdamW with warm-up + cosine; the rates may be traced."""
  schedule = lambda count: learning_rate * warmup_cosine(count, warmup_steps, total_steps)
  return optax.chain(optax.clip_by_global_norm(clip_norm),
                     optax.adamw(schedule, weight_decay=weight_decay))


class OptState(NamedTuple):
  """The optimizer's state, by part."""
  head: Any   # DoGraph's injected transform state (hyperparams, inner_state: DoGraphState); () without
  tail: Any   # skip_step state around the injected clip + AdamW


class Optimizer(NamedTuple):
  """``head`` (DoGraph's transform, or None) then ``tail`` (skip_step(clip + AdamW))."""
  head: optax.GradientTransformationExtraArgs | None
  tail: optax.GradientTransformationExtraArgs

  def init(self, params) -> OptState:
    return OptState(head=() if self.head is None else self.head.init(params),
                    tail=self.tail.init(params))


def make_optimizer(cfg: TrainConfig) -> Optimizer:
  """The run's :class:`Optimizer`, configured from ``cfg``."""
  tail = skip_step(optax.inject_hyperparams(
      _tail, static_args=("warmup_steps", "total_steps", "clip_norm"))(
          learning_rate=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
          warmup_steps=min(cfg.optim.warmup_steps, cfg.optim.steps),
          total_steps=cfg.optim.steps, clip_norm=cfg.optim.clip_norm))
  head = None
  if cfg.method == "dograph":
    # inject_hyperparams over the transform itself: its static arguments are
    # its own list (dg.STATIC_ARGS), every other (float) argument is traced.
    head = optax.inject_hyperparams(dg.dograph_transform, static_args=dg.STATIC_ARGS)(
        **cfg.dograph.transform_kwargs(seed=cfg.run.seed, batch_size=cfg.optim.batch_size,
                                       sketch=cfg.sketch,
                                       in_batch=cfg.apply_weights != "sample"))
  return Optimizer(head, tail)


def hyperparams(opt_state: OptState) -> dict:
  """Every traced hyperparameter of the optimizer, by its injected name."""
  out = dict(opt_state.tail.inner.hyperparams)
  if opt_state.head != ():
    out.update(opt_state.head.hyperparams)
  return out


def set_hyperparams(opt_state: OptState, **values) -> OptState:
  """``opt_state`` with traced hyperparameters replaced (option names, :data:`SWEEPABLE`)."""
  head, tail = opt_state.head, opt_state.tail
  for name, value in values.items():
    inner = SWEEPABLE[name]
    if inner in tail.inner.hyperparams:
      hyper = {**tail.inner.hyperparams,
               inner: jnp.asarray(value, tail.inner.hyperparams[inner].dtype)}
      tail = tail._replace(inner=tail.inner._replace(hyperparams=hyper))
    elif head != () and inner in head.hyperparams:
      hyper = {**head.hyperparams, inner: jnp.asarray(value, head.hyperparams[inner].dtype)}
      head = head._replace(hyperparams=hyper)
    else:
      raise ValueError(f"{name!r} is not a hyperparameter of this run's optimizer")
  return OptState(head=head, tail=tail)


def dograph_state(opt_state: OptState) -> dg.DoGraphState | None:
  """DoGraph's transform state (found by name), or None without DoGraph."""
  return None if opt_state.head == () else opt_state.head.inner_state


class TrainState(NamedTuple):
  """Everything a checkpoint holds of a run's model and optimizer."""
  step: jax.Array     # () int32, steps taken
  params: Any         # the model's parameters
  opt_state: OptState
  method: Any         # the method's own state (an online mixer's: MixerState), () if none


def build_model(cfg: TrainConfig, vocab_size: int):
  """``(model_config, graphdef, params)`` for ``cfg.model.name`` and the tokenizer."""
  dtype = jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32
  model_cfg = get_config(cfg.model.name, vocab_size=vocab_size, dtype=dtype,
                         attention=cfg.model.attention, remat=cfg.model.remat)
  if cfg.optim.seq_len > model_cfg.n_positions:
    raise ValueError(f"--seq_len {cfg.optim.seq_len} exceeds the context of model "
                     f"{cfg.model.name!r} ({model_cfg.n_positions} positions).")
  model = build(model_cfg, nnx.Rngs(cfg.run.seed))
  graphdef, params = split_model(model)
  return model_cfg, graphdef, params


def init_train_state(params, tx: Optimizer, cfg: TrainConfig, human_domains: int = 0,
                     ref_params=None) -> TrainState:
  """The initial :class:`TrainState`; ``human_domains``: the human domains (an
  online mixer's weights), ``ref_params``: a frozen reference model
  (DoReMi's proxy run)."""
  method = make_method(cfg, None, ref_params=ref_params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    method=method.init(params, human_domains))


def make_train_step(graphdef, tx: Optimizer, cfg: TrainConfig, *, state_sharding=None,
                    batch_sharding=None, probe_tokens=None) -> Callable:
  """Jitted ``step(state, batch) -> (state, metrics)``; ``state`` is donated.

  ``metrics``: ``loss`` (batch mean; DoGraph: over the kept samples),
  ``losses`` (B,), ``domain_id`` (B,), ``update_norm``, ``update_finite``,
  ``skipped``, ``lr``, and the method's own (``Method.report``): DoGraph's
  ``weights`` (M,), ``counts`` (M,), ``assignments`` (B,), ``nonfinite``,
  ``coefficients`` (B,) [, ``frequencies`` (M,)]; an online mixer's
  ``weights`` (D,). ``probe_tokens`` (D, P, T + 1) int32: held-out rows of
  each domain for a mixer that needs probe losses (Aioli); a compile-time
  constant of the step. The function's ``traces`` list grows by one each
  time JAX traces it (tests count compilations with it).

  On a mesh, pass ``state_sharding`` (``dograph_jax.sharding.state_shardings``)
  and ``batch_sharding`` (``batch_sharding(mesh)``): the new state then keeps
  the layout of the old one (its donated buffers are reused and the next
  step runs the same executable) and the metrics come back replicated, so
  that every host can read them.
  """
  traces = []
  method: Method = make_method(cfg, graphdef, probe_tokens=probe_tokens)
  warmup, total = min(cfg.optim.warmup_steps, cfg.optim.steps), cfg.optim.steps
  keep_if = lambda cond: (lambda new, old: jnp.where(cond, new, old))

  def step(state: TrainState, batch):
    traces.append(1)
    params, opt = state.params, state.opt_state
    out = method.grads(params, state.method, batch, state.step)
    updates, head = out.grads, opt.head
    if tx.head is not None:  # DoGraph reduces the batch axis
      updates, head = tx.head.update(updates, opt.head, params, **out.update_args)
      if isinstance(out.grads, dg.LaggedGrads):  # its one pass ran inside the head
        out = out._replace(losses=out.grads.result().losses)
    report = method.report(out, dograph_state(OptState(head, opt.tail)), batch)
    updates, tail = tx.tail.update(updates, opt.tail, params, skip=report.skip)
    # Parameters move only if the tail applied the update; DoGraph's own
    # state (centroids, counts) keeps a skipped step but not a non-finite one.
    params = jax.tree.map(keep_if(tail.applied), optax.apply_updates(params, updates), params)
    head = jax.tree.map(keep_if(tail.finite), head, opt.head)
    hyper = opt.tail.inner.hyperparams  # this step's values (inject_hyperparams)
    metrics = {"loss": report.loss, "losses": out.losses, "domain_id": batch["domain_id"],
               "update_norm": tail.norm, "update_finite": tail.finite,
               "skipped": report.skip,
               "lr": hyper["learning_rate"] * warmup_cosine(state.step, warmup, total),
               **report.metrics}
    return TrainState(step=state.step + 1, params=params, opt_state=OptState(head, tail),
                      method=report.state), metrics

  shardings = {}
  if state_sharding is not None:
    replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
    shardings = dict(in_shardings=(state_sharding, batch_sharding),
                     out_shardings=(state_sharding, replicated))
  jitted = jax.jit(step, donate_argnums=0, **shardings)
  jitted.traces = traces
  return jitted


def make_proportions_fn(cfg: TrainConfig, base_D) -> Callable:
  """Jitted ``(method state, step) -> (D,)`` proportions with which a method
  in the sample form (``--apply_weights sample``: an online mixer, or
  DoGraph) wants step ``step``'s batch drawn; ``base_D``: the run's own
  proportions (domain order)."""
  method = make_method(cfg, None)
  base_D = jnp.asarray(base_D, jnp.float32)
  return jax.jit(lambda state, step: method.proportions(state, step, base_D))


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
