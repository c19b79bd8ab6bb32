"""--update lagged (docs/method.md §7b, design (c)): one pass over the
micro-batches, each row weighted by the *previous* step's weights.

Oracles: the step's update is ``jax.grad(sum_i a_i l_i)`` of the plain model
loss (no engine), with ``a_i`` computed here in NumPy from the state before
the batch (nearest centroid, ``min(w / p, max_ratio)``, normalised); the
domains and weights move on exactly as the exact step's do; before the
first step the update is the plain batch mean."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dograph_jax as dg
from dograph_jax.data import write_synthetic_corpus
from dograph_jax.models import apply, token_losses
from dograph_jax.train import config, single_run, training
from dograph_jax.train import method as method_lib

B = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  corpus = write_synthetic_corpus(tmp_path_factory.mktemp("corpus"), seed=3, total_docs=120)
  cfg = config.make_config(data_dir=str(corpus), vocab_size=300, model="mini", steps=4,
                           batch_size=B, seq_len=16, num_domains=3, sketch_dim=64,
                           eval_every=0, eval_rows=8, save_every=0, warmup_steps=0, lr=3e-3,
                           out_dir=str(tmp_path_factory.mktemp("run")), plots=False,
                           update="lagged", max_ratio=2.0)
  data = single_run.load_data(cfg)
  _, graphdef, params = training.build_model(cfg, data.vocab_size)
  batches = [next(data.train_iter) for _ in range(2)]
  return cfg, data, graphdef, params, batches


def _fresh(tree):
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)  # a train step donates its state


def _head_step(cfg, graphdef, state, batch):
  """The gradient after DoGraph's head, the head's new state and the report."""
  method = method_lib.make_method(cfg, graphdef)
  tx = training.make_optimizer(cfg)

  @jax.jit
  def reduce(state, batch):
    out = method.grads(state.params, state.method, batch, state.step)
    grads, head = tx.head.update(out.grads, state.opt_state.head, state.params,
                                 **out.update_args)
    if isinstance(out.grads, dg.LaggedGrads):
      out = out._replace(losses=out.grads.result().losses)
    dg_state = training.dograph_state(training.OptState(head, None))
    return grads, dg_state, out.losses, method.report(out, dg_state, batch)
  return reduce(state, batch)


def _state_after_one_step(cfg, data, graphdef, params, batch):
  tx = training.make_optimizer(cfg)
  state = training.init_train_state(_fresh(params), tx, cfg, len(data.names))
  state, metrics = training.make_train_step(graphdef, tx, cfg)(state, batch)
  assert not bool(metrics["skipped"]) and np.isfinite(float(metrics["loss"]))
  return state


def _weighted_grad(graphdef, params, tokens, a_B):
  def loss(p):
    tok = token_losses(apply(graphdef, p, tokens[:, :-1]), tokens[:, 1:])
    return jnp.sum(jnp.asarray(a_B, jnp.float32) * tok.mean(1))
  return jax.grad(loss)(params)


def _assert_trees_close(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    y = np.asarray(y, np.float64)
    np.testing.assert_allclose(np.asarray(x, np.float64), y, rtol=1e-5,
                               atol=1e-5 * float(np.abs(y).max()) + 1e-12)


@pytest.mark.parametrize("micro", [4])
def test_lagged_update_weights_rows_by_the_previous_steps_weights(setup, micro):
  cfg, data, graphdef, params, (first, second) = setup
  cfg = config.replace(cfg, micro_batches=micro)
  state = _state_after_one_step(cfg, data, graphdef, params, first)
  prev = training.dograph_state(state.opt_state)
  grads, new, losses, report = _head_step(cfg, graphdef, _fresh(state), second)

  # The oracle's coefficients, from the state before `second`.
  z = np.asarray(dg.factored_grads(
      lambda model, t: token_losses(model(t[:, :-1]), t[:, 1:]).mean(1), graphdef,
      state.params, jnp.asarray(second["tokens"]), dg.projection_key(cfg.run.seed),
      64).sketches, np.float64)
  c = np.asarray(prev.domains.centroids, np.float64)
  nearest = np.argmin(((z[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
  p = np.asarray(prev.domains.frequencies, np.float64)
  w = np.asarray(prev.applied_weights, np.float64)
  r = np.minimum(np.where(p > 0, w / np.where(p > 0, p, 1), 0), 2.0)[nearest]
  a = r / r.sum()
  assert np.ptp(a) > 1e-3  # the weights do depart from the plain mean here

  np.testing.assert_allclose(new.coefficients, a, rtol=1e-5, atol=1e-7)
  _assert_trees_close(grads, _weighted_grad(graphdef, state.params, second["tokens"], a))
  assert not bool(report.skip)
  ref = token_losses(apply(graphdef, state.params, second["tokens"][:, :-1]),
                     second["tokens"][:, 1:]).mean(1)
  np.testing.assert_allclose(losses, ref, rtol=1e-5)

  # The domains and weights move on as the exact (book-keeping) step's do.
  exact = config.replace(cfg, update="bookkeeping", micro_batches=1)
  _, new_exact, _, _ = _head_step(exact, graphdef, _fresh(state), second)
  for name in ("applied_weights", "raw_weights", "counts", "assignments"):
    np.testing.assert_allclose(getattr(new, name), getattr(new_exact, name), rtol=1e-5,
                               atol=1e-6, err_msg=name)
  for x, y in zip(jax.tree.leaves(new.domains), jax.tree.leaves(new_exact.domains)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_lagged_first_step_is_the_plain_mean(setup):
  cfg, data, graphdef, params, (first, _) = setup
  cfg = config.replace(cfg, micro_batches=2)
  tx = training.make_optimizer(cfg)
  state = training.init_train_state(_fresh(params), tx, cfg, len(data.names))
  grads, new, _, _ = _head_step(cfg, graphdef, state, first)
  np.testing.assert_allclose(new.coefficients, np.full(B, 1 / B), rtol=1e-6)
  _assert_trees_close(grads, _weighted_grad(graphdef, params, first["tokens"], np.full(B, 1 / B)))


def test_lagged_needs_factored_persistent_domains(setup):
  cfg = setup[0]
  with pytest.raises(ValueError, match="--update lagged needs"):
    config.replace(cfg, sketch="reference")
  with pytest.raises(ValueError, match="--update lagged needs"):
    config.replace(cfg, domains="batch")
  tx = dg.dograph_transform(3, 8, domains="batch")
  fake = dg.LaggedGrads(run=None, result=None)
  with pytest.raises(ValueError, match="needs domains='persistent'"):
    tx.update(fake, tx.init({}), None)
  # Post-stratified coefficients split a domain's share over the batch's count of it,
  # which a one-pass lagged update does not know when it weights a row.
  with pytest.raises(ValueError, match="--coefficients post_stratified needs"):
    config.replace(cfg, coefficients="post_stratified")
  tx = dg.dograph_transform(3, 8, coefficients="post_stratified")
  with pytest.raises(ValueError, match="post_stratified.*LaggedGrads"):
    tx.update(fake, tx.init({}), None)
