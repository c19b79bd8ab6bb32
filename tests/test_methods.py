"""The trainer's method switch: the online-mixer step against jax.grad oracles,
--method_args, traced mixer hyperparameters, the offline pipelines end to end
(proportions reach the data pipeline, stages resume), and the compare harness."""

import json
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dograph_jax.data import read_split, write_synthetic_corpus
from dograph_jax.mixing import OnlineMixer, domain_counts, mean_sample_weights
from dograph_jax.mixing.base import NEEDS
from dograph_jax.models import sequence_loss, token_losses, apply
from dograph_jax.study import compare
from dograph_jax.train import config, methods, offline, pretrain, single_run, training
from dograph_jax.train import method as method_lib


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_synthetic_corpus(tmp_path_factory.mktemp("corpus"), seed=1, total_docs=300)


def _cfg(corpus, out_dir, **kw):
  base = dict(data_dir=str(corpus), vocab_size=300, model="mini", steps=4,
              batch_size=8, seq_len=32, num_domains=3, sketch_dim=64, eval_every=0,
              eval_rows=8, save_every=0, log_every=1, warmup_steps=1, lr=3e-3,
              out_dir=str(out_dir), plots=False)
  base.update(kw)
  return config.make_config(**base)


# --- --method_args ---------------------------------------------------------

def test_method_args_are_typed_and_checked():
  static, traced = methods.parse_method_args("group_dro", {"step_size": "0.5"})
  assert static == {} and traced == {"step_size": 0.5}
  static, traced = methods.parse_method_args("group_dro", {"step_size": 0.5})  # from a file
  assert static == {} and traced == {"step_size": 0.5}
  _, traced = methods.parse_method_args("group_dro", {})
  assert set(traced) == {"step_size"}  # defaults too: the state's structure never changes
  with pytest.raises(ValueError, match="no argument 'eta'"):
    methods.parse_method_args("group_dro", {"eta": "1"})
  with pytest.raises(TypeError, match="a mapping"):
    methods.parse_method_args("group_dro", "step_size")
  with pytest.raises(ValueError, match="not a valid float"):
    methods.parse_method_args("group_dro", {"step_size": "big"})
  with pytest.raises(ValueError, match="takes none"):
    methods.parse_method_args("uniform", {"a": "1"})
  with pytest.raises(ValueError, match="unknown method"):
    methods.kind("nope")
  with pytest.raises(ValueError, match="no argument"):
    config.make_config(method="group_dro", method_args={"eta": "1"})


# --- the online step against oracles -----------------------------------------

class _SpyState(NamedTuple):
  weights: jax.Array
  weights_sum: jax.Array
  count: jax.Array


def _spy_factory(seen):
  """A mixer that needs every optional input, records them, and weights the
  samples by softmax(losses) (non-uniform, so the gradient checks bite)."""

  def spy(num_domains, *, scale: float = 1.0):
    def init(width=None):  # a head_grads mixer is told the output layer's size
      z = jnp.zeros((num_domains,), jnp.float32)
      return _SpyState(z, z, jnp.zeros((), jnp.int32))

    def update(state, inputs):
      seen.append(inputs)
      w = jax.nn.softmax(scale * inputs.losses)
      share = mean_sample_weights(w, inputs.domain_id, num_domains)
      return w, _SpyState(share, state.weights_sum + share, state.count + 1)

    return OnlineMixer(init, update, NEEDS)
  return spy


def test_settings_that_train_as_uniform_are_named_and_logged(corpus, tmp_path, caplog):
  from dograph_jax.mixing.temperature import temperature_proportions
  sizes = np.array([300.0, 100.0, 50.0])
  # T = 1 without a cap is the natural mixture (the closed form n_d / sum n).
  np.testing.assert_allclose(temperature_proportions(sizes, T=1.0), sizes / sizes.sum())
  assert methods.inert_settings("temperature", {}, 1000)
  assert not methods.inert_settings("temperature", {"T": "4"}, 1000)
  assert not methods.inert_settings("temperature", {"max_epochs": "1.5"}, 1000)
  assert methods.inert_settings("loss_based", {}, 1000)  # the 1000-step burn-in
  assert not methods.inert_settings("loss_based", {}, 1001)
  assert not methods.inert_settings("loss_based", {"burn_in": "100"}, 1000)
  assert not methods.inert_settings("dograph", {}, 10) and not methods.inert_settings("uniform", {}, 1)
  caplog.set_level("WARNING", logger="pretrain")
  single_run.load_data(_cfg(corpus, tmp_path / "t", method="temperature"))
  assert any("trains as uniform does" in r.getMessage() and "T=1" in r.getMessage()
             for r in caplog.records)


def test_online_step_matches_jax_grad_oracles(corpus, tmp_path, monkeypatch):
  seen = []
  monkeypatch.setattr(methods, "factory", lambda method: _spy_factory(seen))
  cfg = _cfg(corpus, tmp_path, method="group_dro")
  data = single_run.load_data(cfg)
  _, graphdef, params = training.build_model(cfg, data.vocab_size)
  _, _, ref_params = training.build_model(config.replace(cfg, seed=7), data.vocab_size)
  tx = training.make_optimizer(cfg)
  num_domains = len(data.names)
  state = training.init_train_state(params, tx, cfg, num_domains, ref_params=ref_params)
  batch = next(data.train_iter)
  batch["domain_id"] = np.where(batch["domain_id"] == 1, 0, batch["domain_id"])  # domain 1 absent
  probe = np.stack([data.eval_batches[n][0]["tokens"][:3] for n in data.names])
  mixer_method = method_lib.make_method(cfg, graphdef, probe_tokens=jnp.asarray(probe))
  out = mixer_method.grads(state.params, state.method, batch, state.step)
  losses, grads = out.losses, out.grads
  inputs = seen[-1]
  tokens, domain = jnp.asarray(batch["tokens"]), jnp.asarray(batch["domain_id"])
  one = lambda p, t: sequence_loss(graphdef, p, t)
  oracle_losses = jnp.stack([one(params, t) for t in tokens])
  np.testing.assert_allclose(losses, oracle_losses, rtol=1e-5)
  w = jax.nn.softmax(oracle_losses)
  oracle = jax.grad(lambda p: sum(w[i] * one(p, tokens[i]) for i in range(len(tokens))))(params)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(oracle)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  # Reference token losses, held-out probe losses, counts.
  np.testing.assert_allclose(
      inputs.ref_token_losses,
      token_losses(apply(graphdef, ref_params, tokens[:, :-1]), tokens[:, 1:]), rtol=1e-5)
  oracle_probe = [np.mean([one(params, jnp.asarray(t)) for t in probe[d]])
                  for d in range(num_domains)]
  np.testing.assert_allclose(inputs.probe_losses, oracle_probe, rtol=1e-5)
  np.testing.assert_array_equal(inputs.domain_counts, domain_counts(domain, num_domains))
  # Gram of per-domain mean-loss gradients, each from its own jax.grad.
  flat = []
  for d in range(num_domains):
    members = [i for i in range(len(tokens)) if int(domain[i]) == d]
    if not members:
      flat.append(jnp.zeros(sum(x.size for x in jax.tree.leaves(params))))
      continue
    g = jax.grad(lambda p: sum(one(p, tokens[i]) for i in members) / len(members))(params)
    flat.append(jnp.concatenate([x.ravel() for x in jax.tree.leaves(g)]))
  flat = jnp.stack(flat)
  oracle_gram = flat @ flat.T
  np.testing.assert_allclose(inputs.domain_gram, oracle_gram, rtol=1e-4,
                             atol=1e-6 * float(jnp.abs(oracle_gram).max()))
  assert float(jnp.abs(inputs.domain_gram[1]).max()) == 0.0  # the absent domain
  # Output-layer gradient sums per domain (their values: tests/test_rnb.py).
  v, dm = params["wte"]["embedding"].shape
  assert inputs.head_grads.shape == (num_domains, v * dm)
  assert float(jnp.abs(inputs.head_grads[1]).max()) == 0.0


@pytest.mark.parametrize("method, method_args, name, values", [
    ("group_dro", {}, "step_size", (0.0, 5.0)),
    ("rnb_rounds", {"round_steps": "1"}, "lam", (0.5, 8.0)),   # R&B's lambda
])
def test_mixer_hyperparameters_are_traced(corpus, tmp_path, method, method_args, name, values):
  cfg = _cfg(corpus, tmp_path, method=method, method_args=method_args)
  data = single_run.load_data(cfg)
  _, graphdef, params = training.build_model(cfg, data.vocab_size)
  tx = training.make_optimizer(cfg)
  step = training.make_train_step(graphdef, tx, cfg)
  batch = next(data.train_iter)
  outs = []
  for value in values:
    state = training.init_train_state(jax.tree.map(jnp.copy, params), tx, cfg, len(data.names))
    hparams = {**state.method.hparams, name: jnp.asarray(value, jnp.float32)}
    state = state._replace(method=state.method._replace(hparams=hparams))
    state, metrics = step(state, batch)
    state, metrics = step(state, batch)
    outs.append(np.asarray(metrics["weights"]))
  assert len(step.traces) == 1
  # the larger value spreads the weights further (both methods' rules sharpen with it)
  assert np.ptp(outs[1]) > np.ptp(outs[0])
  assert not np.allclose(outs[0], outs[1])  # the new value took effect without a retrace


# --- offline pipelines and the harness, end to end ---------------------------

def test_doremi_pipeline_reaches_the_data_and_resumes(corpus, tmp_path, caplog):
  cfg = _cfg(corpus, tmp_path / "doremi", method="doremi", steps=4, proxy_steps=3)
  summary = pretrain.train(cfg)
  stages = tmp_path / "doremi" / "stages"
  assert sorted(p.name for p in stages.iterdir()) == ["final", "proxy", "reference"]
  proxy = json.loads((stages / "proxy" / "summary.json").read_text())
  average = np.asarray(list(proxy["mixer_average"].values()))
  assert np.all(average > 0) and abs(average.sum() - 1) < 1e-5
  mixture = json.loads((tmp_path / "doremi" / "mixture.json").read_text())
  expected = offline._floor(proxy["mixer_average"])  # = the average unless a weight < 1e-3
  np.testing.assert_allclose(list(mixture.values()), list(expected.values()), rtol=1e-9)
  final = json.loads((stages / "final" / "summary.json").read_text())
  np.testing.assert_allclose(list(final["proportions"].values()), list(mixture.values()),
                             rtol=1e-9)  # the mixture reached grain's mix
  assert summary["method"] == "doremi" and summary["mixture"] == mixture
  assert summary["wall_s"] == pytest.approx(sum(summary["stages"].values()))
  assert set(summary["stages"]) == {"reference", "proxy", "final"}
  # A crash after the proxy: the finished stages are reused, not retrained.
  stamps = {s: (stages / s / "summary.json").stat().st_mtime_ns for s in ("reference", "proxy")}
  import shutil
  shutil.rmtree(stages / "final")
  caplog.clear()
  with caplog.at_level("INFO", logger="offline"):
    again = pretrain.train(config.replace(cfg, resume=True))  # without it: refused (a run is there)
  assert {s: (stages / s / "summary.json").stat().st_mtime_ns for s in stamps} == stamps
  assert "stage reference: finished before" in caplog.text
  assert again["mixture"] == mixture
  assert again["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-6)  # same final run


@pytest.fixture(scope="module")
def corpus2(corpus, tmp_path_factory):
  """Two domains of the synthetic corpus in the plain {"text", "domain"}
  schema (the mixing law needs D + 1 proxy runs: 3 here)."""
  out = tmp_path_factory.mktemp("corpus2")
  for split in ("train", "validation"):
    (out / split).mkdir()
    docs, _ = read_split(corpus, split)
    with open(out / split / "part.jsonl", "w") as f:
      for name in ("code", "prose"):
        for text in docs[name]:
          f.write(json.dumps({"text": text, "domain": name}) + "\n")
  return out


def test_floor_keeps_proportions_valid():
  assert offline._floor({"a": 0.0, "b": 1.0, "c": 0.0}) == pytest.approx(
      {"a": 0.001, "b": 0.998, "c": 0.001})
  # 2e-3 survives the first pass, then stays (0.002 * 0.999 / 1.0 >= 1e-3).
  assert offline._floor({"a": 1e-5, "b": 2e-3, "c": 0.998}) == pytest.approx(
      {"a": 0.001, "b": 0.002 * 0.999 / (0.002 + 0.998), "c": 0.998 * 0.999 / 1.0})
  assert offline._floor({"a": 2.0, "b": 6.0}) == {"a": 0.25, "b": 0.75}
  with pytest.raises(ValueError, match="not a mixture"):
    offline._floor({"a": float("nan"), "b": 1.0})


def test_compare_table_lists_failed_and_diverged_runs():
  def agg(avg):
    return {"runs": 2, "average_mean": avg, "average_std": 0.5, "worst_mean": 2 * avg,
            "worst_std": 1.0, "per_domain_mean": {"a": avg, "b": 2 * avg},
            "wall_vs_uniform": 1.0}
  diverged = ("Traceback (most recent call last):\n  ...\ndograph_jax.train.pretrain."
              "NonFiniteLossError: non-finite training loss (nan) at step 7; stopping.\n")
  text = compare.table({"uniform": agg(10.0), "dograph": agg(9.0)}, "T",
                       {"dograph/seed2": diverged, "doge/seed0": "Traceback\nOSError: disk\n",
                        "doge/seed1": diverged}, ["uniform", "dograph", "doge"])
  rows = [line for line in text.splitlines() if line.startswith("| ")][1:]
  assert [r.split(" | ")[0][2:] for r in rows] == ["uniform", "dograph", "doge"]
  assert rows[0].startswith("| uniform | 2 | 10.000 ± 0.500 |")
  assert rows[1].startswith("| dograph | 2/3, 1 diverged | 9.000 ± 0.500 |")
  assert rows[2] == "| doge | 0/2, 1 diverged, 1 failed | - | - | - | - | - |"
  assert "- dograph seed 2: diverged: dograph_jax.train.pretrain.NonFiniteLossError: " \
         "non-finite training loss (nan) at step 7; stopping." in text
  assert "- doge seed 0: failed: OSError: disk" in text


def test_compare_runs_methods_survives_a_crash_and_resumes(corpus2, tmp_path, monkeypatch):
  base = _cfg(corpus2, tmp_path, steps=3, proxy_steps=2, proxy_runs=3, plots=True,
              eval_rows=4)
  names = ["uniform", "stratified", "aioli", "doge", "regmix", "mixing_law"]
  real_train = pretrain.train

  def flaky(cfg):
    if cfg.method == "aioli":
      raise RuntimeError("simulated crash")
    return real_train(cfg)

  monkeypatch.setattr(pretrain, "train", flaky)
  result = compare.compare(base, names, [0], tmp_path / "cmp",
                           {"aioli": {"sweep_rounds": "1", "sweep_steps": "1", "round_steps": "3"}})
  assert list(result["failures"]) == ["aioli/seed0"]
  agg = result["aggregate"]
  assert set(agg) == set(names) - {"aioli"}
  assert agg["uniform"]["wall_vs_uniform"] == pytest.approx(1.0)
  for method in ("regmix", "mixing_law", "doge", "stratified"):
    mixture = np.asarray(list(agg[method]["mixture"].values()))
    assert np.all(mixture >= offline.MIN_PROPORTION) and abs(mixture.sum() - 1) < 1e-9
  for method in ("regmix", "mixing_law"):
    summary = json.loads((tmp_path / "cmp" / method / "seed0" / "summary.json").read_text())
    assert len(summary["stages"]) == 4  # 3 proxy runs + the final run, all in the cost
    assert summary["proportions"] == pytest.approx(summary["mixture"])  # reached grain
  table = (tmp_path / "cmp" / "compare.md").read_text()
  assert "| regmix | 1 |" in table
  assert "| aioli | 0/1, 1 failed | - |" in table  # listed as failed, not by its absence
  assert "- aioli seed 0: failed: RuntimeError: simulated crash" in table
  assert (tmp_path / "cmp" / "per_domain_ppl.png").exists()
  assert (tmp_path / "cmp" / "weights.png").exists()
  # Rerun: the crashed method trains now; the finished ones are read back.
  monkeypatch.setattr(pretrain, "train", real_train)
  stamp = (tmp_path / "cmp" / "uniform" / "seed0" / "summary.json").stat().st_mtime_ns
  result = compare.compare(base, names, [0], tmp_path / "cmp",
                           {"aioli": {"sweep_rounds": "1", "sweep_steps": "1", "round_steps": "3"}})
  assert result["failures"] == {} and set(result["aggregate"]) == set(names)
  assert (tmp_path / "cmp" / "uniform" / "seed0" / "summary.json").stat().st_mtime_ns == stamp
  aioli = json.loads((tmp_path / "cmp" / "aioli" / "seed0" / "summary.json").read_text())
  assert aioli["method_args"] == {"sweep_rounds": "1", "sweep_steps": "1", "round_steps": "3"}
  assert abs(sum(aioli["mixer_average"].values()) - 1) < 1e-5


def test_mixing_law_refuses_too_few_proxy_runs_before_training(corpus, tmp_path):
  cfg = _cfg(corpus, tmp_path / "ml", method="mixing_law", proxy_runs=5)  # 5 domains
  with pytest.raises(ValueError, match="needs --proxy_runs >= 6"):
    pretrain.train(cfg)
  assert not (tmp_path / "ml" / "stages").exists()


def test_resume_check_reads_options_newer_than_the_checkpoint_at_their_default():
  cfg = config.make_config(method="uniform")
  older = {k: v for k, v in config.flatten(cfg).items()
           if k not in ("proxy_runs", "method_args")}  # written before these existed
  single_run.check_resumable(older, cfg)
  with pytest.raises(ValueError, match="proxy_runs"):
    single_run.check_resumable(older, config.replace(cfg, proxy_runs=3))


# --- --apply_weights: the sample form --------------------------------------

def test_weights_form_resolves_each_papers_form():
  assert methods.weights_form("aioli", "paper", "sample") == "sample"
  assert methods.weights_form("group_dro", "paper", "reweight") == "reweight"
  assert methods.weights_form("group_dro", "sample", "reweight") == "sample"
  assert methods.weights_form("aioli", "reweight", "sample") == "reweight"
  assert methods.weights_form("loss_based", "reweight", "per_sample") == "per_sample"
  with pytest.raises(ValueError, match="weights single rows"):
    methods.weights_form("loss_based", "sample", "per_sample")
  with pytest.raises(ValueError, match="apply_weights must be one of"):
    config.make_config(method="aioli", apply_weights="both")
  forms = {m: single_run.samples(config.make_config(method=m), 3)
           for m in ("aioli", "rnb_rounds", "group_dro", "doremi_proxy", "doge_proxy",
                     "loss_based", "uniform", "dograph")}
  assert forms == {"aioli": True, "rnb_rounds": True, "group_dro": False,
                   "doremi_proxy": False, "doge_proxy": False, "loss_based": False,
                   "uniform": False, "dograph": False}
  assert single_run.samples(config.make_config(method="dograph", apply_weights="sample"), 3)


def test_sample_form_steps_on_the_batch_mean_and_the_mixer_still_learns(corpus, tmp_path):
  cfg = _cfg(corpus, tmp_path, method="group_dro", apply_weights="sample")
  data = single_run.load_data(cfg)
  assert type(data.train_iter).__name__ == "DynamicMixIterator"
  _, graphdef, params = training.build_model(cfg, data.vocab_size)
  tx = training.make_optimizer(cfg)
  state = training.init_train_state(params, tx, cfg, len(data.names))
  batch = next(data.train_iter)
  sample = method_lib.make_method(cfg, graphdef).grads(state.params, state.method, batch,
                                                       state.step)
  reweight = method_lib.make_method(config.replace(cfg, apply_weights="reweight"), graphdef).grads(
      state.params, state.method, batch, state.step)
  tokens = jnp.asarray(batch["tokens"])
  oracle = jax.grad(lambda p: jnp.mean(jnp.stack(
      [sequence_loss(graphdef, p, t) for t in tokens])))(params)
  for a, b in zip(jax.tree.leaves(sample.grads), jax.tree.leaves(oracle)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  # The mixer's update is the same in both forms: only the use of its weights differs.
  for a, b in zip(jax.tree.leaves(sample.state.mixer), jax.tree.leaves(reweight.state.mixer)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(sample.state.mixer.weights), 1 / len(data.names))
  # What the sampler is given: the mixer's weights after the step.
  base = np.full(len(data.names), 1.0 / len(data.names))
  p = training.make_proportions_fn(cfg, base)(sample.state, state.step + 1)
  np.testing.assert_array_equal(np.asarray(p), np.asarray(sample.state.mixer.weights))


def test_dograph_sample_ratio_is_the_running_mean_coefficient_per_group():
  state = method_lib.DoGraphSampling(ratio=jnp.asarray([1.0, 2.0, 1.0], jnp.float32))
  # 4 rows: groups 0, 0, 1, 2; row 3 (group 2) dropped by the transform.
  a = jnp.asarray([0.5, 0.2, 0.3, 0.0])
  kept = jnp.asarray([True, True, True, False])
  new = method_lib._running_ratio(state, a, kept, jnp.asarray([0, 0, 1, 2]), 0.9)
  # B_kept a_i = 3 a_i: group 0 rows 1.5, 0.6 (mean 1.05), group 1: 0.9; group 2 has no kept row.
  np.testing.assert_allclose(new.ratio, [0.9 * 1.0 + 0.1 * 1.05, 0.9 * 2.0 + 0.1 * 0.9, 1.0],
                             rtol=1e-6)
  m = method_lib.DoGraphMethod(None, sketch="factored", update="bookkeeping", sketch_dim=8,
                               seed=0, normalize_blocks=False, samples=True)
  q = m.proportions(new, 0, jnp.asarray([0.5, 0.25, 0.25]))
  want = np.array([0.5 * 1.005, 0.25 * 1.89, 0.25 * 1.0])
  np.testing.assert_allclose(q, want / want.sum(), rtol=1e-6)


def test_batch_drawer_draws_with_the_states_proportions(corpus, tmp_path):
  """What both the trainer and sweep.py use: in the sample form the batch of
  a step follows the proportions of the state it is given."""
  cfg = _cfg(corpus, tmp_path, method="group_dro", apply_weights="sample")
  data = single_run.load_data(cfg)
  _, _, params = training.build_model(cfg, data.vocab_size)
  state = training.init_train_state(params, training.make_optimizer(cfg), cfg, len(data.names))
  draw = single_run.batch_drawer(cfg, data)
  weights = np.zeros(len(data.names), np.float32)
  weights[[1, 3]] = [0.25, 0.75]
  state = state._replace(method=state.method._replace(
      mixer=state.method.mixer._replace(weights=jnp.asarray(weights))))
  ids = np.concatenate([draw(state)["domain_id"] for _ in range(8)])
  assert set(ids.tolist()) == {1, 3}
  assert abs((ids == 3).mean() - 0.75) < 0.1
  plain = single_run.batch_drawer(config.replace(cfg, apply_weights="reweight"),
                                  single_run.load_data(config.replace(cfg, apply_weights="reweight")))
  assert len(set(np.concatenate([plain(state)["domain_id"] for _ in range(4)]).tolist())) > 2
