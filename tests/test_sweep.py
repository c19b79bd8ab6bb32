"""experiments/sweep.py reuses one compiled step across hyperparameter values."""

import numpy as np
import pytest

from dograph_jax.data import write_synthetic_corpus
from dograph_jax.study import sweep
from dograph_jax.train import config


def test_sweep_compiles_once_and_values_take_effect(tmp_path):
  corpus = write_synthetic_corpus(tmp_path / "corpus", seed=2, total_docs=300)
  cfg = config.make_config(data_dir=str(corpus), vocab_size=300, steps=3, batch_size=8,
                    seq_len=32, num_domains=3, sketch_dim=32, eval_rows=8,
                    objective="robust", out_dir=str(tmp_path / "out"))
  results, step = sweep.run_sweep(cfg, {"lr": [1e-3, 1e-2], "temperature": [0.5, 2.0]})
  assert len(results) == 4
  assert len(step.traces) == 1  # one trace, hence one compilation, for all four
  losses = [r["final_train_loss"] for r in results]
  assert len(set(np.round(losses, 6))) == 4  # every setting changed the run
  # Same learning rate, different temperature: only DoGraph's weights differ.
  assert results[0]["final_train_loss"] != results[1]["final_train_loss"]


def test_bad_grid():
  with pytest.raises(ValueError, match="not a sweepable"):
    sweep.parse_grid(["num_domains=3,4"])
  with pytest.raises(ValueError, match="at least one"):
    sweep.parse_grid([])


def test_sweep_of_method_hyperparameters(tmp_path):
  """R&B's lambda (a traced mixer value, after the regrouping) and temperature
  sampling's T (proportions) sweep with one compiled step."""
  corpus = write_synthetic_corpus(tmp_path / "corpus", seed=2, total_docs=300)
  base = dict(data_dir=str(corpus), vocab_size=300, steps=3, batch_size=8, seq_len=32,
              eval_rows=8, out_dir=str(tmp_path / "out"))
  cfg = config.make_config(method="rnb", method_args={"round_steps": "1"}, regroup_k="3:4", **base)
  results, step = sweep.run_sweep(cfg, sweep.parse_grid(["lam=0.1,20"], "rnb"))
  assert len(results) == 2 and len(step.traces) == 1
  assert results[0]["final_train_loss"] != results[1]["final_train_loss"]
  assert (tmp_path / "out" / "regrouped" / "regroup.json").exists()

  cfg = config.make_config(method="temperature", **base)
  results, step = sweep.run_sweep(cfg, sweep.parse_grid(["T=1,1000", "lr=3e-3"],
                                                        "temperature"))
  assert len(results) == 2 and len(step.traces) == 1
  assert results[0]["final_train_loss"] != results[1]["final_train_loss"]
  # T = 1 is the natural mixture: the same run as a plain uniform sweep point.
  plain, _ = sweep.run_sweep(config.make_config(method="uniform", **base),
                             sweep.parse_grid(["lr=3e-3"], "uniform"))
  assert plain[0]["val_loss"] == pytest.approx(results[0]["val_loss"], rel=1e-6)
  with pytest.raises(ValueError, match="or method 'rnb'"):
    sweep.parse_grid(["round_steps=1,2"], "rnb")
