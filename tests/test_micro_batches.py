"""--micro_batches: every method's step over sequential micro-batches equals
its full-batch step (the full batch is the oracle), in both forms of a mixer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dograph_jax.data import write_synthetic_corpus
from dograph_jax.train import config, methods, single_run, training
from dograph_jax.train import method as method_lib

B, MICRO = 8, 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  corpus = write_synthetic_corpus(tmp_path_factory.mktemp("corpus"), seed=1, total_docs=200)
  cfg = config.make_config(data_dir=str(corpus), vocab_size=300, model="mini", steps=4,
                           batch_size=B, seq_len=32, num_domains=3, sketch_dim=64,
                           eval_every=0, eval_rows=8, save_every=0, warmup_steps=0, lr=3e-3,
                           out_dir=str(tmp_path_factory.mktemp("run")), plots=False)
  data = single_run.load_data(cfg)
  _, graphdef, params = training.build_model(cfg, data.vocab_size)
  _, _, ref_params = training.build_model(config.replace(cfg, seed=7), data.vocab_size)
  batch = next(data.train_iter)
  batch["domain_id"][0] = 2  # every micro-batch's slice has rows of several domains
  probe = jnp.asarray(np.stack([data.eval_batches[n][0]["tokens"][:3] for n in data.names]))
  return cfg, data, graphdef, params, ref_params, batch, probe


def _fresh(tree):
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)  # a train step donates its state


def _reduced(cfg, data, graphdef, params, ref_params, batch, probe):
  """The jitted gradient of a step, as the optimizer's tail receives it (after
  DoGraph's head), with the method's report."""
  method = method_lib.make_method(cfg, graphdef, probe_tokens=probe)
  tx = training.make_optimizer(cfg)
  state = training.init_train_state(_fresh(params), tx, cfg, len(data.names),
                                    ref_params=_fresh(ref_params))

  @jax.jit
  def reduce(state, batch):
    out = method.grads(state.params, state.method, batch, state.step)
    grads, head = out.grads, state.opt_state.head
    if tx.head is not None:
      grads, head = tx.head.update(grads, head, state.params, **out.update_args)
    report = method.report(out, training.dograph_state(training.OptState(head, None)), batch)
    return grads, out.losses, report
  return reduce(state, batch)


def _assert_trees_close(a, b):
  # Elementwise rtol, and an atol relative to the leaf's scale: an entry that
  # is a cancelling sum of per-sample terms has no relative precision of its own.
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    y = np.asarray(y, np.float64)
    np.testing.assert_allclose(np.asarray(x, np.float64), y, rtol=1e-5,
                               atol=1e-5 * float(np.abs(y).max()) + 1e-12)


CASES = [("uniform", {}), ("dograph", {}), ("dograph", {"sketch": "reference"}),
         ("dograph", {"apply_weights": "sample"}),
         *[(m, {}) for m in methods.ONLINE],
         # a sampling mixer in its other form (the adapter's two passes)
         ("aioli", {"apply_weights": "reweight"})]


@pytest.mark.parametrize("method, extra", CASES,
                         ids=[f"{m}-{'-'.join(map(str, e.values())) or 'paper'}" for m, e in CASES])
def test_micro_batched_step_equals_the_full_batch_step(setup, method, extra):
  cfg, *rest = setup
  cfg = config.replace(cfg, method=method, **extra)
  grads, losses, report = _reduced(cfg, *rest)
  m_grads, m_losses, m_report = _reduced(config.replace(cfg, micro_batches=MICRO), *rest)
  np.testing.assert_allclose(m_losses, losses, rtol=1e-5)
  _assert_trees_close(m_grads, grads)
  assert not bool(report.skip) and not bool(m_report.skip)
  np.testing.assert_allclose(m_report.loss, report.loss, rtol=1e-5)
  _assert_trees_close(m_report.state, report.state)  # a mixer's weights, DoGraph's sampling ratio
  if method == "dograph":
    np.testing.assert_array_equal(m_report.metrics["assignments"], report.metrics["assignments"])
    np.testing.assert_allclose(m_report.metrics["weights"], report.metrics["weights"],
                               rtol=1e-5, atol=1e-7)


def test_micro_batched_train_step_runs_under_jit_and_donation(setup):
  """The whole train step (AdamW tail included) with micro-batches: one step
  lands within float rounding of the full-batch step."""
  cfg, data, graphdef, params, ref_params, batch, probe = setup
  after = []
  for n in (1, MICRO):
    c = config.replace(cfg, method="dograph", micro_batches=n)
    tx = training.make_optimizer(c)
    state = training.init_train_state(_fresh(params), tx, c, len(data.names))
    state, metrics = training.make_train_step(graphdef, tx, c)(state, batch)
    after.append(state.params)
    assert not bool(metrics["skipped"])
  # AdamW's first step is lr * g / (|g| + eps): where |g| is within a few
  # hundred eps (1e-8) of zero, re-ordered sums move it by a visible fraction
  # of lr; elsewhere the step is g's sign times lr, to float rounding.
  grads = _reduced(config.replace(cfg, method="dograph"), data, graphdef, params, ref_params,
                   batch, probe)[0]
  checked = 0
  for a, b, g in zip(jax.tree.leaves(after[1]), jax.tree.leaves(after[0]),
                     jax.tree.leaves(grads)):
    sure = np.abs(np.asarray(g)) > 1e-6
    checked += sure.sum()
    np.testing.assert_allclose(np.asarray(a)[sure], np.asarray(b)[sure], rtol=0, atol=1e-7)
  assert checked > 0.5 * sum(x.size for x in jax.tree.leaves(grads))


def test_mixer_reads_the_same_inputs_from_micro_batches(setup, monkeypatch):
  """What a mixer is given (per-row fields stacked, per-domain sums added
  across micro-batches) equals the full batch's, for every optional input."""
  from tests.test_methods import _spy_factory
  cfg, data, graphdef, params, ref_params, batch, probe = setup
  seen = []
  monkeypatch.setattr(methods, "factory", lambda method: _spy_factory(seen))
  cfg = config.replace(cfg, method="group_dro")
  state = training.init_train_state(params, training.make_optimizer(cfg), cfg, len(data.names),
                                    ref_params=ref_params)
  outs = []
  for n in (1, MICRO):
    m = method_lib.make_method(config.replace(cfg, micro_batches=n), graphdef,
                               probe_tokens=probe)
    outs.append(m.grads(state.params, state.method, batch, state.step))
  full, micro = seen
  for name in ("losses", "token_losses", "ref_token_losses", "probe_losses", "domain_counts",
               "head_grads"):
    np.testing.assert_allclose(getattr(micro, name), getattr(full, name), rtol=1e-5, atol=1e-7,
                               err_msg=name)
  np.testing.assert_allclose(micro.domain_gram, full.domain_gram, rtol=1e-4,
                             atol=1e-6 * float(jnp.abs(full.domain_gram).max()))
  for a, b in zip(jax.tree.leaves(outs[1].grads), jax.tree.leaves(outs[0].grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_micro_batches_must_divide_the_batch(setup):
  cfg = setup[0]
  with pytest.raises(ValueError, match="not a multiple of --micro_batches 3"):
    config.replace(cfg, micro_batches=3)
  with pytest.raises(ValueError, match="--micro_batches must be >= 1"):
    config.replace(cfg, micro_batches=0)


def test_split_is_strided_and_join_inverts_it():
  x = jnp.arange(12).reshape(6, 2)
  parts = method_lib.split_micro(x, 3)
  np.testing.assert_array_equal(parts[1], x[1::3])
  np.testing.assert_array_equal(method_lib.join_micro(parts), x)
