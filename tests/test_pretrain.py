"""End-to-end tests of experiments/pretrain.py on a tiny synthetic corpus:
exact resume, recovery from a save killed midway, the non-finite stop, and
the run's artefacts."""

import json
import math
import shutil

import jax
import numpy as np
import pytest

from dograph_jax.data import write_synthetic_corpus
from dograph_jax.train import config, pretrain, training, single_run
from dograph_jax.train.checkpointing import Checkpointer
from dograph_jax.train.config import TrainConfig


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_synthetic_corpus(tmp_path_factory.mktemp("corpus"), seed=1, total_docs=300)


def _cfg(corpus, out_dir, **kw):
  base = dict(data_dir=str(corpus), vocab_size=300, model="mini", steps=6,
              batch_size=8, seq_len=32, num_domains=3, sketch_dim=64, eval_every=3,
              eval_rows=8, save_every=3, log_every=1, warmup_steps=2, lr=3e-3,
              out_dir=str(out_dir), plots=False)
  base.update(kw)
  return config.make_config(**base)


def _losses(out_dir):
  return [(r["step"], r["loss"]) for r in map(json.loads, (out_dir / "metrics.jsonl")
                                               .read_text().splitlines()) if "loss" in r]


def _final_params(cfg):
  data = single_run.load_data(cfg)
  _, _, params = training.build_model(cfg, data.vocab_size)
  # with the online baselines' mixer state, as the trainer builds it
  state = training.init_train_state(params, training.make_optimizer(cfg), cfg,
                                    len(data.names))
  ckpt = Checkpointer(cfg.run.out_dir + "/checkpoints")
  restored, data_state, _ = ckpt.restore(ckpt.latest_step(), training.abstract_like(state))
  ckpt.close()
  return restored, data_state


@pytest.mark.parametrize("method, extra", [
    ("dograph", {}),                                              # persistent domains
    ("dograph", {"domains": "batch", "distance": "euclidean"}),   # the literal mode
    ("uniform", {}),
    ("dograph", {"model": "llama-mini"}),                         # the LLaMA family
    ("loss_based", {"model": "llama-mini"}),
    # the sample form: proportions change every step of Aioli's sweep (steps 0-4)
    ("aioli", {"method_args": {"sweep_rounds": "1", "sweep_steps": "1", "round_steps": "7"}}),
    ("dograph", {"apply_weights": "sample"})])
def test_resume_is_exact(corpus, tmp_path, method, extra):
  straight = _cfg(corpus, tmp_path / "straight", method=method, **extra)
  pretrain.train(straight)
  split = _cfg(corpus, tmp_path / "split", method=method, **extra)
  assert pretrain.train(config.replace(split, halt_after=3)) == {"halted_at": 3}
  pretrain.train(config.replace(split, resume=True))
  assert _losses(tmp_path / "straight") == _losses(tmp_path / "split")
  assert len(_losses(tmp_path / "split")) == 6
  a, data_a = _final_params(straight)
  b, data_b = _final_params(split)
  assert data_a == data_b
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert int(a.step) == 6


def test_resume_skips_a_checkpoint_killed_midway(corpus, tmp_path):
  cfg = _cfg(corpus, tmp_path / "run", steps=6)
  pretrain.train(config.replace(cfg, halt_after=3))
  ckpt_dir = tmp_path / "run" / "checkpoints"
  # What a process killed while writing step 6 leaves behind: orbax's
  # temporary directory, incomplete (one item's files truncated).
  partial = ckpt_dir / "6.orbax-checkpoint-tmp"  # the name this orbax gives it
  shutil.copytree(ckpt_dir / "3", partial)
  for f in sorted(partial.rglob("*")):
    if f.is_file():
      f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
  ckpt = Checkpointer(ckpt_dir)
  assert ckpt.latest_step() == 3
  ckpt.close()
  summary = pretrain.train(config.replace(cfg, resume=True))
  assert summary["steps"] == 6
  straight = _cfg(corpus, tmp_path / "straight", steps=6)
  pretrain.train(straight)
  assert _losses(tmp_path / "run") == _losses(tmp_path / "straight")


def test_nonfinite_loss_stops_without_saving_it(corpus, tmp_path):
  cfg = _cfg(corpus, tmp_path / "nan", method="uniform", lr=1e9, warmup_steps=0,
             steps=20, save_every=1, eval_every=0)
  with pytest.raises(pretrain.NonFiniteLossError, match=r"at step (\d+)") as err:
    pretrain.train(cfg)
  bad_step = int(err.value.args[0].split("at step ")[1].split(";")[0])
  ckpt = Checkpointer(tmp_path / "nan" / "checkpoints")
  last = ckpt.latest_step()
  ckpt.close()
  assert last is not None and last < bad_step
  params, _ = _final_params(cfg)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params.params))
  assert pretrain.main([f"--{k}={v}" for k, v in [
      ("data_dir", corpus), ("vocab_size", 300), ("method", "uniform"), ("lr", 1e9),
      ("warmup_steps", 0), ("steps", 20), ("batch_size", 8), ("seq_len", 32),
      ("eval_every", 0), ("save_every", 0), ("out_dir", tmp_path / "nan2"),
      ("plots", "false")]]) == 1


def test_run_artefacts_and_summary(corpus, tmp_path, capsys):
  cfg = _cfg(corpus, tmp_path / "full", steps=4, eval_every=2, plots=True)
  summary = pretrain.train(cfg)
  out = tmp_path / "full"
  for name in ("summary.txt", "summary.json", "config.json", "loss_per_domain.png",
               "domain_weights.png", "clusters_vs_domains.png"):
    assert (out / name).exists(), name
  assert any((out / "tensorboard").iterdir())
  records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
  train_records = [r for r in records if "weights" in r]
  assert len(train_records) == 4
  for r in train_records:
    assert len(r["weights"]) == 3 and abs(sum(r["weights"]) - 1) < 1e-5
    assert sum(r["cluster_sizes"]) == 8 and -1 <= r["ari"] <= 1 and 0 <= r["nmi"] <= 1
    # persistent domains: running frequencies, and each human domain's share
    # of the update (sum of its rows' a_i)
    assert len(r["frequencies"]) == 3 and abs(sum(r["frequencies"]) - 1) < 1e-5
    assert abs(sum(r["update_share"].values()) - 1) < 1e-5
  evals = [r for r in records if "val_loss" in r]
  assert [r["step"] for r in evals] == [2, 4]
  names = set(evals[-1]["val_loss"])
  assert names == set(summary["per_domain"])
  # The summary's aggregates follow from the per-domain losses.
  losses = evals[-1]["val_loss"]
  assert summary["average"] == pytest.approx(math.exp(np.mean(list(losses.values()))))
  assert summary["worst"] == pytest.approx(max(math.exp(v) for v in losses.values()))
  printed = capsys.readouterr().out
  assert "average" in printed and "worst" in printed and "steps/s" in printed


def test_resume_refuses_changed_settings(corpus, tmp_path):
  cfg = _cfg(corpus, tmp_path / "run", steps=4)
  pretrain.train(config.replace(cfg, halt_after=2))
  with pytest.raises(ValueError, match="lr"):
    pretrain.train(config.replace(cfg, resume=True, lr=1e-2))


def test_bare_boolean_flags():
  from dograph_jax.train.config import parse_config
  assert parse_config(["--resume"]).run.resume is True
  assert parse_config(["--resume", "false"]).run.resume is False
  assert parse_config(["--resume=true"]).run.resume is True
  assert parse_config(["--no_plots", "--steps", "3"]).run.plots is False
  assert parse_config(["--plots", "--steps", "3"]).run.plots is True
  assert parse_config([]).run.resume is False
  with pytest.raises(SystemExit):
    parse_config(["--resume", "maybe"])


def test_resume_check_ignores_options_the_method_does_not_read():
  base = config.make_config(method="uniform")
  saved = config.to_dict(config.replace(base, distance="cosine", anchor=1.0))
  single_run.check_resumable(saved, base)  # uniform reads no DoGraph option
  literal = config.make_config(domains="batch", buffer_size=0)
  single_run.check_resumable(config.to_dict(config.replace(literal, anchor=0.9)), literal)
  persistent = TrainConfig()
  with pytest.raises(ValueError, match="anchor"):
    single_run.check_resumable(config.to_dict(config.replace(persistent, anchor=0.9)),
                              persistent)
  with pytest.raises(ValueError, match="domains"):
    single_run.check_resumable(config.to_dict(literal), persistent)
  with pytest.raises(ValueError, match="lr"):
    single_run.check_resumable(config.to_dict(config.replace(base, lr=1.0)), base)
  # a run directory of before the sections (flat, string-typed) still reads
  flat = {**config.flatten(base), "method_args": "", "proportions": ""}
  single_run.check_resumable(flat, base)


def _cli(cfg) -> list[str]:
  """``pretrain.py`` arguments that reproduce ``cfg``."""
  args = []
  for name, value in config.flatten(cfg).items():
    if value != config.flatten(TrainConfig())[name]:
      args.append(f"--{name}={str(value).lower() if isinstance(value, bool) else value}")
  return args


def test_sigkill_during_an_orbax_save_then_resume_is_exact(corpus, tmp_path):
  """A real interrupted save: a child ``pretrain.py`` saving every step is
  killed with SIGKILL while orbax's temporary checkpoint directory exists
  (the save is in flight); the resumed run ends with the parameters, data
  position and per-step losses of a straight run."""
  import os
  import signal
  import subprocess
  import sys
  import time
  from pathlib import Path

  steps = 20
  straight = _cfg(corpus, tmp_path / "straight", steps=steps, save_every=1, eval_every=0,
                  keep_checkpoints=3)
  pretrain.train(straight)  # also caches the tokenizer and packed rows for the child
  repo = Path(__file__).resolve().parents[1]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(repo)}
  for attempt in range(5):
    run = tmp_path / f"killed{attempt}"
    cfg = config.replace(straight, out_dir=str(run))
    child = subprocess.Popen([sys.executable, str(repo / "experiments" / "pretrain.py"),
                              *_cli(cfg)], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    ckpts, killed_in_flight = run / "checkpoints", False
    deadline = time.monotonic() + 300
    while child.poll() is None and time.monotonic() < deadline:
      if ckpts.exists():
        names = [e.name for e in os.scandir(ckpts)]
        done = [n for n in names if n.isdigit()]
        if len(done) >= 2 and any(".orbax-checkpoint-tmp" in n for n in names):
          child.send_signal(signal.SIGKILL)
          child.wait()
          # Still there after the kill: the save had not been renamed into place.
          killed_in_flight = any(".orbax-checkpoint-tmp" in e.name for e in os.scandir(ckpts))
          break
    if child.poll() is None:
      child.kill()
    child.wait()
    if killed_in_flight:
      break
  assert killed_in_flight, "never caught a save in flight in 5 runs"
  ckpt = Checkpointer(run / "checkpoints")  # drops the partial directory
  killed_at = ckpt.latest_step()
  ckpt.close()
  assert killed_at is not None and killed_at < steps
  assert not list((run / "checkpoints").glob("*.orbax-checkpoint-tmp*"))
  summary = pretrain.train(config.replace(cfg, resume=True))
  assert summary["steps"] == steps
  assert _losses(run) == _losses(tmp_path / "straight")
  a, data_a = _final_params(straight)
  b, data_b = _final_params(cfg)
  assert data_a == data_b
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_unfinished_last_metrics_record_is_dropped(tmp_path, caplog):
  from dograph_jax.train.tracking import read_records
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
  with caplog.at_level("WARNING"):
    assert read_records(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
  assert "unfinished last record" in caplog.text
  path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
  with pytest.raises(ValueError, match="line 2: not a JSON record"):
    read_records(path)
