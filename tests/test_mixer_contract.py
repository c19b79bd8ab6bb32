"""The conventions every online mixer shares, checked for all of them at once.

:mod:`dograph_jax.mixing.base` states the contract of an :class:`OnlineMixer`
(``init() -> state``, ``update(state, inputs) -> (w_B, state)``): the state is
a ``NamedTuple`` of fixed-shape arrays with ``weights (D,)``, ``weights_sum
(D,)`` and ``count ()``; ``update`` is pure and jit-compatible; its per-sample
weights sum to 1; ``needs`` names the optional :class:`MixingInputs` fields
the trainer fills (the others are ``None``). The trainer
(``dograph_jax/train/training.py``) relies on more: the state lives in a
donated, jitted train state (so its structure, shapes and dtypes never
change), and every float hyperparameter of a factory is passed as a traced
scalar inside the jitted step (``dograph_jax/train/methods.py``).

Each mixer's own test file checks its rule against hand-computed updates;
this file checks only the shared contract, on synthetic inputs of the right
shapes. A new online mixer is checked by adding one entry to :data:`MIXERS`
(modelled on optax's ``contrib/_common_test.py``).
"""

from __future__ import annotations

import inspect
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dograph_jax import mixing
from dograph_jax.mixing.base import NEEDS, MixingInputs, OnlineMixer, domain_counts

B, D, T = 8, 3, 5    # batch rows, domains, tokens per row
HEAD_WIDTH = 6       # F of exact (unsketched) head gradients: V * d_model of a toy head
STEPS = 8            # long enough for Aioli (below) to finish two rounds


class MixerCase(NamedTuple):
  """One mixer under test.

  ``traced`` maps each float hyperparameter (those the trainer traces: a
  ``float`` default in the factory's signature, not fixed by ``kwargs``) to
  two values whose results must differ within :data:`STEPS` steps of
  :func:`_sequence`.
  """
  name: str
  factory: Callable[..., OnlineMixer]
  kwargs: dict
  traced: dict


MIXERS = [
    MixerCase("uniform", mixing.uniform, {}, {}),
    # burn_in=0: the rule acts from the first step (the default waits 1000).
    MixerCase("loss_reweighting", mixing.loss_reweighting, dict(burn_in=0),
              dict(delta=(1.0, 2.0), temperature=(1.0, 0.3))),
    MixerCase("group_dro", mixing.group_dro, {}, dict(step_size=(1e-3, 0.5))),
    # One-step sub-rounds: the sweep over D = 3 domains takes 3 steps, a round
    # 4, so the proportions are estimated at steps 3 and 7 (ema acts at 7).
    MixerCase("aioli", mixing.aioli, dict(sweep_rounds=1, sweep_steps=1, round_steps=D + 1),
              dict(step_size=(1.0, 3.0), skew=(0.75, 0.5), ema=(0.1, 0.6))),
    MixerCase("aioli_no_ema", mixing.aioli,
              dict(ema=None, sweep_rounds=1, sweep_steps=1, round_steps=D + 1),
              dict(step_size=(1.0, 3.0), skew=(0.75, 0.5))),
    # initial_excess acts at step 0, where a domain is absent (see _sequence).
    MixerCase("doremi", mixing.doremi, {},
              dict(step_size=(1.0, 3.0), smoothing=(1e-3, 0.1), initial_excess=(0.0, 2.0))),
    # The synthetic Gram (see _inputs) has a domain whose score lies above 0.5
    # and one below, so both clips bite at the second value.
    MixerCase("doge", mixing.doge, {},
              dict(step_size=(5e-4, 2e-3), mu=(0.01, 0.003), dw_min=(0.0, 0.5),
                   dw_max=(5.0, 0.5), smoothing=(0.0, 0.1))),
    # round_steps=1: every step ends a round, so lambda acts from step 1.
    MixerCase("rnb", mixing.rnb, dict(round_steps=1, sketch_dim=4), dict(lam=(1.0, 4.0))),
    MixerCase("rnb_exact", mixing.rnb, dict(round_steps=1, sketch_dim=0), dict(lam=(1.0, 4.0))),
    MixerCase("odm", mixing.odm, {}, dict(alpha=(0.9, 0.3))),
    # Short fit schedule and a 2-point start grid: the fit compiles small.
    MixerCase("ado", mixing.ado,
              dict(update_interval=2, start_step=2, ignore_steps=0, subsample=1,
                   savgol_window=3, max_points=8, max_iter=20,
                   init_grid=((1.0, 1.0, 0.3), (3.0, 0.6, 0.5))),
              dict(gamma1=(0.1, 0.5), gamma2=(0.1, 0.5), s=(0.5, 1.0), delta_min=(0.01, 0.3))),
]

IDS = [case.name for case in MIXERS]


def _build(case: MixerCase, **overrides) -> OnlineMixer:
  return case.factory(D, **{**case.kwargs, **overrides})


def _init(mixer: OnlineMixer):
  """The state as the trainer makes it: R&B's exact head gradients need the
  head's width."""
  return mixer.init(width=HEAD_WIDTH) if "head_grads" in mixer.needs else mixer.init()


def _inputs(mixer: OnlineMixer, step: int, domain_id, seed: int) -> MixingInputs:
  """Synthetic inputs for ``mixer``: the always-present fields, plus only
  those in ``mixer.needs`` (the others stay ``None``, as the trainer leaves
  them)."""
  rng = np.random.default_rng(seed)
  domain_id = np.asarray(domain_id, np.int32)
  counts = np.bincount(domain_id, minlength=D)
  present = counts > 0
  # Domains differ in loss level, rows within a domain by noise.
  token_losses = (rng.uniform(1.0, 4.0, (B, T)) + 0.5 * domain_id[:, None]).astype(np.float32)
  fields = dict(losses=jnp.asarray(token_losses.mean(1)), domain_id=jnp.asarray(domain_id),
                step=jnp.asarray(step, jnp.int32),
                domain_counts=domain_counts(jnp.asarray(domain_id), D))
  if "token_losses" in mixer.needs:
    fields["token_losses"] = jnp.asarray(token_losses)
  if "ref_token_losses" in mixer.needs:
    # The reference is ahead on most tokens, behind on some (negative excess).
    fields["ref_token_losses"] = jnp.asarray(
        token_losses - rng.uniform(-0.5, 1.0, (B, T)).astype(np.float32))
  if "domain_gram" in mixer.needs:
    # Domain gradients around a shared direction c, the last domain opposed
    # to it: scores (in units of the learning rate) well above and below 0.5.
    # An absent domain's gradient is zero, as the trainer computes it.
    shared = np.array([2.0, 1.0, 0.0, -1.0])
    sign = np.linspace(1.0, -0.5, D)[:, None]
    g = sign * shared[None] + 0.3 * rng.normal(size=(D, shared.size))
    g = np.where(present[:, None], g, 0.0)
    fields["domain_gram"] = jnp.asarray(g @ g.T, jnp.float32)
  if "probe_losses" in mixer.needs:
    # Held-out losses that fall over the run, unevenly across domains.
    fields["probe_losses"] = jnp.asarray(
        3.0 + 0.3 * np.arange(D) - 0.05 * step + 0.1 * rng.normal(size=D), jnp.float32)
  if "head_grads" in mixer.needs:
    width = mixer.head_sketch_dim or HEAD_WIDTH
    grads = rng.normal(size=(D, width)) + 0.5 * np.arange(D)[:, None]
    fields["head_grads"] = jnp.asarray(grads * counts[:, None], jnp.float32)  # sums: 0 if absent
  return MixingInputs(**fields)


def _full_batch(seed: int) -> np.ndarray:
  """``(B,)`` domain ids with every domain present, in a random order."""
  return np.random.default_rng(seed).permutation(np.arange(B) % D)


def _sequence(mixer: OnlineMixer, absent_first: bool = True) -> list[MixingInputs]:
  """:data:`STEPS` steps' inputs; with ``absent_first`` the last domain is
  missing from step 0's batch (so a mixer's handling of never-seen domains,
  e.g. DoReMi's ``initial_excess``, enters the results)."""
  seq = []
  for step in range(STEPS):
    ids = _full_batch(step)
    if absent_first and step == 0:
      ids = np.arange(B) % (D - 1)
    seq.append(_inputs(mixer, step, ids, seed=100 + step))
  return seq


def _stack(inputs: list[MixingInputs]) -> MixingInputs:
  # None fields are empty subtrees: they stay None.
  return jax.tree.map(lambda *xs: jnp.stack(xs), *inputs)


def _run(mixer: OnlineMixer, state, seq: list[MixingInputs]):
  """``(final state, (w_B, state) of every step)``, one ``lax.scan`` (which
  itself requires the state's structure, shapes and dtypes to be stable)."""

  def body(state, inputs):
    w_B, state = mixer.update(state, inputs)
    return state, (w_B, state)

  return jax.lax.scan(body, state, _stack(seq))


def _leaf_types(tree):
  return [(x.shape, x.dtype, getattr(x, "weak_type", False)) for x in jax.tree.leaves(tree)]


def _assert_sample_weights(w_B):
  w = np.asarray(w_B)
  assert w.shape[-1] == B and w.dtype == np.float32
  assert np.all(np.isfinite(w)) and np.all(w >= 0)
  np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)


def _assert_mixture(weights_D):
  w = np.asarray(weights_D)
  assert w.shape[-1] == D
  assert np.all(np.isfinite(w)) and np.all(w >= 0)
  np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)


def _assert_finite_state(state):
  for leaf in jax.tree.leaves(state):
    assert np.all(np.isfinite(np.asarray(leaf, np.float64))), state


# --- the list itself -------------------------------------------------------------


def test_every_online_mixer_is_listed():
  listed = {case.factory for case in MIXERS}
  exported = {getattr(mixing, name) for name in mixing.__all__
              if inspect.isfunction(getattr(mixing, name))
              and inspect.signature(getattr(mixing, name)).return_annotation
              in ("OnlineMixer", OnlineMixer)}
  assert exported and exported <= listed, exported - listed
  # The trainer's registry (imported here: it pulls in the whole trainer).
  from dograph_jax.train import methods
  assert {methods.factory(m) for m in methods.ONLINE} <= listed


@pytest.mark.parametrize("case", MIXERS, ids=IDS)
def test_traced_list_names_every_float_hyperparameter(case):
  """The entry names exactly the hyperparameters the trainer traces."""
  params = list(inspect.signature(case.factory).parameters.values())[1:]
  floats = {p.name for p in params
            if isinstance(p.default, float) and not isinstance(p.default, bool)
            and p.name not in case.kwargs}
  assert set(case.traced) == floats


# --- state and needs -------------------------------------------------------------


@pytest.mark.parametrize("case", MIXERS, ids=IDS)
def test_needs_and_init_state(case):
  mixer = _build(case)
  assert isinstance(mixer, OnlineMixer)
  assert mixer.needs <= NEEDS, mixer.needs - NEEDS
  assert isinstance(mixer.head_sketch_dim, int) and mixer.head_sketch_dim >= 0
  state = _init(mixer)
  assert hasattr(state, "_fields"), "the state must be a NamedTuple"
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))
  assert state.weights.shape == (D,) and jnp.issubdtype(state.weights.dtype, jnp.floating)
  assert state.weights_sum.shape == (D,)
  assert jnp.issubdtype(state.weights_sum.dtype, jnp.floating)
  assert state.count.shape == () and jnp.issubdtype(state.count.dtype, jnp.integer)
  assert int(state.count) == 0 and not np.any(np.asarray(state.weights_sum))
  _assert_finite_state(state)
  weights = np.asarray(state.weights)
  # Domain-weight methods start on the simplex. base.py defines a per-sample
  # method's weights as the weight its domains received in the last batch:
  # before any batch that is all zeros (uniform, loss_reweighting).
  if np.any(weights):
    _assert_mixture(weights)
  # init works under jit too (a state built inside a jitted function).
  assert _leaf_types(jax.jit(lambda: _init(mixer))()) == _leaf_types(state)


@pytest.mark.parametrize("case", MIXERS, ids=IDS)
def test_every_need_is_read(case):
  """``needs`` does not over-claim: without any one of its fields ``update``
  fails (it would otherwise make the trainer compute something unused)."""
  mixer = _build(case)
  inputs = _inputs(mixer, 0, _full_batch(0), seed=0)
  for field in mixer.needs:
    with pytest.raises((ValueError, TypeError, AttributeError)):
      mixer.update(_init(mixer), inputs._replace(**{field: None}))


# --- update ----------------------------------------------------------------------


@pytest.mark.parametrize("case", MIXERS, ids=IDS)
def test_update_under_jit(case):
  """Two consecutive jitted steps, from inputs holding only the fields in
  ``needs`` (and the always-present ones): one trace (the state after ``update`` has
  the structure, shapes and dtypes of the state after ``init``, so it can
  stay in a donated jitted train state), the same results as eager
  execution (pure), sample weights and domain weights on the simplex, and
  ``weights_sum``/``count`` the running sum and number of updates."""
  mixer = _build(case)
  traces = []

  def update(state, inputs):
    traces.append(None)
    return mixer.update(state, inputs)

  jitted = jax.jit(update)
  state0 = _init(mixer)
  inputs = [_inputs(mixer, step, _full_batch(step), seed=step) for step in range(2)]
  w1, state1 = jitted(state0, inputs[0])
  w2, state2 = jitted(state1, inputs[1])
  assert len(traces) == 1, "the state's abstract type changed between steps (retrace)"
  for state in (state1, state2):
    assert jax.tree.structure(state) == jax.tree.structure(state0)
    assert _leaf_types(state) == _leaf_types(state0)
  # Eager execution gives the same: no trace-time state or Python side effect.
  ew1, estate1 = mixer.update(state0, inputs[0])
  ew2, estate2 = mixer.update(estate1, inputs[1])
  for got, want in ((w1, ew1), (w2, ew2), (state2, estate2)):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)
  for w_B, state in ((w1, state1), (w2, state2)):
    assert w_B.shape == (B,)
    _assert_sample_weights(w_B)
    _assert_mixture(state.weights)
    _assert_finite_state(state)
  assert int(state1.count) == 1 and int(state2.count) == 2
  np.testing.assert_allclose(state2.weights_sum, state1.weights + state2.weights, rtol=1e-6)
  # The time average that offline methods output is a mixture too.
  _assert_mixture(state2.weights_sum / state2.count)


def _absent_batches() -> list[np.ndarray]:
  """Batches missing domains: the last, the first, all but one, then full."""
  last_missing = np.arange(B) % (D - 1)
  return [last_missing, last_missing + 1, np.zeros(B, np.int32), np.full(B, D - 1),
          last_missing, _full_batch(5), np.zeros(B, np.int32), _full_batch(7)]


@pytest.mark.parametrize("case", MIXERS, ids=IDS)
def test_absent_domains(case):
  """Finite results, weights on the simplex, when domains have no rows
  (``domain_counts`` zero), including before they were ever seen."""
  mixer = _build(case)
  seq = [_inputs(mixer, step, ids, seed=200 + step)
         for step, ids in enumerate(_absent_batches())]
  assert any(np.any(np.asarray(x.domain_counts) == 0) for x in seq)
  final, (w_SxB, states) = jax.jit(lambda s: _run(mixer, s, seq))(_init(mixer))
  _assert_sample_weights(w_SxB)
  _assert_mixture(states.weights)
  _assert_finite_state(states)   # every step's state, not only the last
  assert int(final.count) == len(seq)
  _assert_mixture(final.weights_sum / final.count)


@pytest.mark.parametrize("case", [c for c in MIXERS if c.traced],
                         ids=[c.name for c in MIXERS if c.traced])
def test_float_hyperparameters_are_traced(case):
  """As in the trainer: the float hyperparameters are traced float32 scalars
  (all at once, one dict) and the mixer is built, and its state initialised,
  inside the jitted function. Changing any one of them: no new trace, and
  different results."""
  seq = _sequence(_build(case))
  traces = []

  @jax.jit
  def run(hparams):
    traces.append(None)
    mixer = _build(case, **hparams)
    return _run(mixer, _init(mixer), seq)

  def flat(out):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(out)]).astype(np.float64)

  base = {name: first for name, (first, _) in case.traced.items()}
  as_f32 = lambda hparams: {k: jnp.asarray(v, jnp.float32) for k, v in hparams.items()}
  reference = flat(run(as_f32(base)))
  for name, (first, second) in case.traced.items():
    out = run(as_f32({**base, name: second}))
    _, (w_SxB, states) = out
    _assert_sample_weights(w_SxB)
    _assert_mixture(states.weights)
    _assert_finite_state(states)
    assert not np.allclose(flat(out), reference, rtol=1e-6, atol=1e-9), (
        f"{case.name}: {name}={first} and {name}={second} gave the same results")
  assert len(traces) == 1
