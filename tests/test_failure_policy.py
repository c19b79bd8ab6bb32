"""The trainer's failure policy (docs/method.md, "Non-finite input").

A non-finite sample is made by patching the trainer's per-token loss so that
rows whose first target token is a multiple of 7 get NaN losses *and* NaN
gradients (``loss * nan``), as a real overflow would; a non-finite update with
a finite loss by adding ``0 * sqrt(0 * x)`` (value 0, gradient NaN).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dograph_jax.data import write_synthetic_corpus
from dograph_jax.models import sequence_loss
from dograph_jax.train import config, pretrain, training
from dograph_jax.train import method as method_lib
from dograph_jax.train.checkpointing import Checkpointer

B, T = 8, 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_synthetic_corpus(tmp_path_factory.mktemp("corpus"), seed=3, total_docs=300)


def _poisoned(targets):
  return targets[:, :1] % 7 == 0  # (B, 1)


@pytest.fixture
def nan_rows(monkeypatch):
  clean = method_lib.token_losses

  def losses(logits, targets):
    return clean(logits, targets) * jnp.where(_poisoned(targets), jnp.nan, 1.0)
  monkeypatch.setattr(method_lib, "token_losses", losses)
  return clean


@pytest.fixture
def nan_gradient(monkeypatch):
  clean = method_lib.token_losses

  def losses(logits, targets):
    return clean(logits, targets) + 0.0 * jnp.sqrt(0.0 * jnp.sum(logits))
  monkeypatch.setattr(method_lib, "token_losses", losses)


def _cfg(**kw):
  base = dict(model="mini", vocab_size=64, steps=10, batch_size=B, seq_len=T,
              num_domains=3, sketch_dim=64, warmup_steps=1, lr=1e-2)
  base.update(kw)
  return config.make_config(**base)


def _step_setup(cfg):
  _, graphdef, params = training.build_model(cfg, cfg.data.vocab_size)
  tx = training.make_optimizer(cfg)
  state = training.init_train_state(params, tx, cfg)
  step = training.make_train_step(graphdef, tx, cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (B, T + 1), 1, cfg.data.vocab_size)
  tokens = tokens.at[:, 1].set(jnp.array([7, 3, 5, 14, 2, 9, 11, 4]))  # rows 0, 3 poisoned
  batch = {"tokens": tokens, "domain_id": jnp.arange(B, dtype=jnp.int32) % 3}
  return graphdef, state, step, batch


def _copy(tree):
  return jax.tree.map(lambda x: np.array(x), tree)


def _same(a, b):
  return all(np.array_equal(x, y, equal_nan=True)
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_dograph_step_drops_and_counts_nonfinite_samples(nan_rows):
  cfg = _cfg()
  graphdef, state, step, batch = _step_setup(cfg)
  before = _copy(state.params)
  # The oracle: models.sequence_loss (not patched) of each of the six clean rows.
  clean_rows = np.array([1, 2, 4, 5, 6, 7])
  want = np.mean([float(sequence_loss(graphdef, state.params, batch["tokens"][i]))
                  for i in clean_rows])
  state, metrics = step(state, batch)
  assert int(metrics["nonfinite"]) == 2
  assert not bool(metrics["skipped"]) and bool(metrics["update_finite"])
  np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5)
  after = jax.tree.leaves(state.params)
  assert all(np.all(np.isfinite(x)) for x in after)
  assert not _same(before, state.params)  # the kept samples did train
  assert int(training.dograph_state(state.opt_state).nonfinite_total) == 2


def test_dograph_step_with_every_sample_nonfinite_reports_nan_loss(nan_rows):
  cfg = _cfg()
  _, state, step, batch = _step_setup(cfg)
  batch = {**batch, "tokens": batch["tokens"].at[:, 1].set(7)}
  params = _copy(state.params)
  state, metrics = step(state, batch)
  assert int(metrics["nonfinite"]) == B and np.isnan(float(metrics["loss"]))  # the host stops
  assert bool(metrics["update_finite"]) and bool(metrics["skipped"])
  assert _same(params, state.params)


def test_second_backward_skips_the_whole_optimizer_step(nan_rows):
  cfg = _cfg(update="second_backward", weight_decay=0.1)
  _, state, step, batch = _step_setup(cfg)
  # One clean step first, so that AdamW has momentum that a bad step would apply.
  clean = {**batch, "tokens": batch["tokens"].at[:, 1].set(3)}
  state, metrics = step(state, clean)
  assert not bool(metrics["skipped"])
  params, opt = _copy(state.params), _copy(state.opt_state)
  head_count = int(training.dograph_state(state.opt_state).count)
  state, metrics = step(state, batch)
  assert bool(metrics["skipped"]) and int(metrics["nonfinite"]) == 2
  assert _same(params, state.params)  # no momentum, no weight decay applied
  assert _same(opt.tail.inner, state.opt_state.tail.inner)  # clip, AdamW
  inner = training.dograph_state(state.opt_state)
  assert int(inner.count) == head_count + 1 and int(inner.nonfinite_total) == 2
  assert int(state.step) == 2


def test_nonfinite_update_is_never_applied(nan_gradient):
  cfg = _cfg(method="uniform")
  _, state, step, batch = _step_setup(cfg)
  params, opt = _copy(state.params), _copy(state.opt_state)
  state, metrics = step(state, batch)
  assert np.isfinite(float(metrics["loss"])) and not bool(metrics["update_finite"])
  assert _same(params, state.params) and _same(opt.head, state.opt_state.head)
  assert _same(opt.tail.inner, state.opt_state.tail.inner)  # clip, AdamW: not moved
  assert int(state.opt_state.tail.skipped) == 1  # skip_step's own count of the step left out


def test_dograph_with_no_usable_sample_skips_the_step(nan_gradient):
  """Finite losses, NaN gradients: DoGraph drops every sample (a zero update),
  the step is skipped whole (no AdamW weight decay) and the loss reads NaN,
  so that the host stops."""
  cfg = _cfg(weight_decay=0.1)
  _, state, step, batch = _step_setup(cfg)
  params = _copy(state.params)
  state, metrics = step(state, batch)
  assert int(metrics["nonfinite"]) == B and bool(metrics["skipped"])
  assert np.isnan(float(metrics["loss"])) and bool(metrics["update_finite"])
  assert _same(params, state.params)


def test_trainer_stops_at_a_nonfinite_update_and_saves_nothing(nan_gradient, corpus, tmp_path):
  cfg = _cfg(method="uniform", data_dir=str(corpus), vocab_size=300, steps=4, save_every=1,
             eval_every=0, out_dir=str(tmp_path / "run"), plots=False)
  with pytest.raises(pretrain.NonFiniteLossError, match="non-finite update at step 1"):
    pretrain.train(cfg)
  ckpt = Checkpointer(tmp_path / "run" / "checkpoints")
  assert ckpt.latest_step() is None
  ckpt.close()


def test_trainer_keeps_going_and_counts_dropped_samples(nan_rows, corpus, tmp_path):
  cfg = _cfg(data_dir=str(corpus), vocab_size=300, steps=6, eval_every=3, eval_rows=8,
             save_every=3, log_every=3, out_dir=str(tmp_path / "run"), plots=False)
  summary = pretrain.train(cfg)
  records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl")
             .read_text().splitlines()]
  per_step = {r["step"]: r["nonfinite"] for r in records if "nonfinite" in r}
  assert summary["nonfinite_samples"] == sum(per_step.values()) > 0
  assert summary["skipped_steps"] == 0
  # Every step that dropped a sample is in the log, not only the log_every ones.
  assert any(s % 3 for s, n in per_step.items() if n)
  assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
  # ... and the counts survive a resume.
  resumed = config.replace(cfg, out_dir=str(tmp_path / "split"))
  pretrain.train(config.replace(resumed, halt_after=3))
  again = pretrain.train(config.replace(resumed, resume=True))
  assert again["nonfinite_samples"] == summary["nonfinite_samples"]


@pytest.fixture(scope="module")
def corpus_without_val_domain(tmp_path_factory):
  """The synthetic corpus with the "legal" rows removed from its validation split."""
  root = write_synthetic_corpus(tmp_path_factory.mktemp("corpus_gap"), seed=4, total_docs=300)
  for path in (root / "validation").glob("*.jsonl"):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows
                            if r["meta"]["redpajama_set_name"] != "legal"))
  return root


def test_missing_validation_domain_is_warned_and_reported(corpus_without_val_domain, tmp_path,
                                                          caplog):
  cfg = _cfg(method="uniform", data_dir=str(corpus_without_val_domain), vocab_size=300,
             steps=2, eval_every=0, eval_rows=8, save_every=0, out_dir=str(tmp_path / "run"),
             plots=False)
  with caplog.at_level("WARNING", logger="pretrain"):
    summary = pretrain.train(cfg)
  assert "legal" in summary["proportions"]  # it still trains on it
  assert summary["val_missing"] == ["legal"] and "legal" not in summary["val_loss"]
  assert any("no rows of training domain(s) legal" in r.getMessage() for r in caplog.records)
  losses = list(summary["val_loss"].values())
  assert len(losses) == 4
  np.testing.assert_allclose(summary["average"], np.exp(np.mean(losses)), rtol=1e-6)


def test_offline_method_fits_the_validation_domains_it_has(corpus_without_val_domain, tmp_path):
  cfg = _cfg(method="regmix", data_dir=str(corpus_without_val_domain), vocab_size=300,
             steps=2, proxy_steps=2, proxy_runs=3, eval_every=0, eval_rows=8, save_every=0,
             out_dir=str(tmp_path / "regmix"), plots=False)
  summary = pretrain.train(cfg)
  mixture = summary["mixture"]
  assert set(mixture) == set(summary["proportions"]) and "legal" in mixture
  assert abs(sum(mixture.values()) - 1) < 1e-6 and summary["val_missing"] == ["legal"]
