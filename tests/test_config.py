"""The trainer's typed config: one source of DoGraph's defaults, the command
line (help, choices, mappings, files), reading a run's config back, and the
commands that add flags of their own."""

import dataclasses
import inspect
import json

import numpy as np
import pytest

import dograph_jax as dg
from dograph_jax.train import config
from dograph_jax.train.config import DoGraphConfig, TrainConfig, parse_config


def test_dograph_section_is_exactly_the_transforms_keyword_arguments():
  signature = inspect.signature(dg.dograph_transform).parameters
  fields = {f.name: f.default for f in dataclasses.fields(DoGraphConfig)}
  assert set(fields) == set(signature) - set(config.TRAINER_FILLED)
  for name, default in fields.items():
    assert default == signature[name].default, name
  # The traced set is the transform's non-static arguments, all floats.
  assert set(config.DOGRAPH_TRACED) == set(fields) - set(dg.STATIC_ARGS)
  assert all(isinstance(fields[n], float) for n in config.DOGRAPH_TRACED)
  kwargs = TrainConfig().dograph.transform_kwargs(seed=3, batch_size=16, sketch="factored")
  dg.dograph_transform(**kwargs)  # every field is an argument it takes
  assert kwargs["seed"] == 3 and kwargs["batch_size"] == 16
  # One source, one meaning: K defaults to the dimension of equal distortion
  # for the map in use (the factored path is Kronecker), as in the transform.
  assert kwargs["sketch_dim"] == 1024
  reference = TrainConfig().dograph.transform_kwargs(seed=0, batch_size=8, sketch="reference")
  assert reference["sketch_dim"] == 256 and reference["sketch_kind"] == "gaussian"
  assert dg.dograph_transform(**reference).init({"w": np.zeros(3)}).centroids.shape == (11, 256)
  assert dg.dograph_transform(sketch_kind="kronecker").init(
      {"w": np.zeros(3)}).centroids.shape == (11, 1024)


def test_flat_names_reach_their_sections():
  cfg = config.make_config(lr=1e-3, objective="robust", data_dir="d", model="gpt2", seed=4,
                           proxy_runs=3, method_args={"burn_in": "5"}, method="loss_based")
  assert (cfg.optim.lr, cfg.dograph.objective, cfg.data.data_dir, cfg.model.name,
          cfg.run.seed, cfg.offline.proxy_runs) == (1e-3, "robust", "d", "gpt2", 4, 3)
  assert config.flatten(cfg)["model"] == "gpt2"
  assert config.from_dict(config.to_dict(cfg)) == cfg  # config.json round trip
  assert config.from_dict(config.flatten(cfg)) == cfg  # flat form too
  with pytest.raises(ValueError, match="unknown option"):
    config.make_config(learning_rate=1.0)


def test_choices_are_refused_by_name():
  with pytest.raises(ValueError, match=r"--objective must be one of \('uncertainty'"):
    config.make_config(objective="nope")
  with pytest.raises(ValueError, match="--trackers must be one of"):
    config.make_config(trackers=("jsonl", "mlflow"))
  with pytest.raises(SystemExit):
    parse_config(["--distance", "manhattan"])
  with pytest.raises(ValueError, match="--steps must be >= 1"):
    config.make_config(steps=0)


def test_command_line_mappings_and_booleans(capsys):
  cfg = parse_config(["--proportions", "code", "0.3", "prose", "0.7", "--method", "loss_based",
                      "--method_args", "burn_in", "40", "strategy", "mid", "--lr", "0.01",
                      "--no_plots", "--objective", "robust"])
  assert cfg.data.proportions == {"code": 0.3, "prose": 0.7}
  assert cfg.method_args == {"burn_in": "40", "strategy": "mid"}
  assert cfg.optim.lr == 0.01 and cfg.run.plots is False and cfg.dograph.objective == "robust"
  with pytest.raises(SystemExit):  # tyro prints the check's message and exits 2
    parse_config(["--method", "loss_based", "--method_args", "nope", "1"])
  assert "method 'loss_based' has no argument 'nope'" in " ".join(capsys.readouterr().err.split())


def test_help_lists_every_option_with_its_help_and_choices(capsys):
  with pytest.raises(SystemExit):
    parse_config(["--help"])
  text = capsys.readouterr().out
  for flag in config.FLAGS:
    assert f"--{flag}" in text, flag
  assert "uncertainty,variance,robust,alignment" in text  # a Literal's choices
  assert "forgetting factor" in text  # a field comment as help
  assert "default: 0.003" in text


@pytest.mark.parametrize("module, own", [
    ("dograph_jax.study.compare", ["--methods", "--seeds", "--args", "--eval_tasks"]),
    ("dograph_jax.study.sweep", ["--sweep"]),
    ("dograph_jax.study.ablate", ["--config", "--data_dirs", "--seeds", "--only"]),
])
def test_study_commands_show_their_own_flags(module, own, capsys):
  main = __import__(module, fromlist=["main"]).main
  with pytest.raises(SystemExit):
    main(["--help"])
  text = capsys.readouterr().out
  for flag in own + ["--objective", "--steps"]:  # their own, then the training options
    assert flag in text, (module, flag)


def test_config_file_then_flags(tmp_path):
  nested = tmp_path / "run.yaml"
  nested.write_text("method: uniform\noptim:\n  steps: 7\n  lr: 0.02\ndata:\n"
                    "  proportions: {code: 1.0, prose: 3.0}\n")
  cfg = parse_config(["--config_file", str(nested), "--lr", "0.5"])
  assert (cfg.method, cfg.optim.steps, cfg.optim.lr) == ("uniform", 7, 0.5)  # the flag wins
  assert cfg.data.proportions == {"code": 1.0, "prose": 3.0}
  flat = tmp_path / "run.json"
  flat.write_text(json.dumps({"objective": "variance", "decay": 0.8}))
  cfg = parse_config(["--config_file", str(flat)])
  assert cfg.dograph.objective == "variance" and cfg.dograph.decay == 0.8
  bad = tmp_path / "bad.yaml"
  bad.write_text("- 1\n- 2\n")
  with pytest.raises(ValueError, match="a mapping of options"):
    parse_config(["--config_file", str(bad)])


def test_resume_needs_only_the_run_directory(tmp_path):
  run = tmp_path / "run"
  run.mkdir()
  saved = config.make_config(method="uniform", steps=9, batch_size=4, data_dir="corpus",
                             halt_after=3, out_dir=str(run))
  (run / "config.json").write_text(json.dumps(config.to_dict(saved)))
  cfg = parse_config(["--out_dir", str(run), "--resume", "--eval_every", "3"])
  assert (cfg.method, cfg.optim.steps, cfg.optim.batch_size, cfg.data.data_dir) == (
      "uniform", 9, 4, "corpus")
  assert cfg.run.resume and cfg.run.eval_every == 3
  assert cfg.run.halt_after == 0  # stopping early is this invocation's, not the run's
  # A directory written before the sections (flat, strings) reads the same.
  old = {**config.flatten(saved), "proportions": "code=0.25,prose=0.75",
         "method_args": "", "sketch_norm": "block"}
  old.pop("normalize_blocks")
  (run / "config.json").write_text(json.dumps(old))
  cfg = parse_config(["--out_dir", str(run), "--resume"])
  assert cfg.data.proportions == {"code": 0.25, "prose": 0.75}
  assert cfg.dograph.normalize_blocks is True and cfg.method_args == {}


def test_export_reads_run_configs_like_the_trainer():
  """``models/export.py`` reads ``config.json`` without the trainer; its flat
  view must be the trainer's own, for a nested file and a flat (older) one."""
  from dograph_jax.models.export import flat_run_config
  cfg = config.make_config(model="llama-mini", dtype="bfloat16", vocab_size=300,
                           data_dir="corpus", tokenizer="tok", method="uniform")
  assert flat_run_config(config.to_dict(cfg)) == config.flatten(cfg)
  assert flat_run_config(config.flatten(cfg)) == config.flatten(cfg)
