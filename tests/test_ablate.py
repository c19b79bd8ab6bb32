"""experiments/ablate.py end to end on a tiny corpus: the table, the paired
differences recomputed from the runs' own summaries, and resumability."""

import json
import math

import numpy as np
import pytest

from dograph_jax.data import write_synthetic_corpus
from dograph_jax.study import ablate
from dograph_jax.train import pretrain


def test_study_end_to_end_and_rerun_reuses_runs(tmp_path, monkeypatch):
  corpus = write_synthetic_corpus(tmp_path / "tiny", seed=3, total_docs=200)
  results = tmp_path / "results"
  argv = ["--config", "uniform:method=uniform",
          "--config", "dograph:method=dograph,num_domains=3,decay=0.8",
          "--data_dirs", str(corpus), "--seeds", "0,1", "--results_dir", str(results),
          "--steps", "3", "--batch_size", "8", "--seq_len", "32", "--vocab_size", "300",
          "--sketch_dim", "64", "--eval_rows", "8", "--out_dir", str(tmp_path / "runs")]
  assert ablate.main(argv) == 0
  study = json.loads((results / "study.json").read_text())
  assert (results / "table.md").exists() and (results / "study.png").exists()
  # two rows (the perplexities; the paired trade-off against uniform), one corpus
  import matplotlib.pyplot as plt
  assert plt.imread(results / "study.png").shape[:2] == (2 * 540, 780)
  runs = study["corpora"]["tiny"]["runs"]
  assert {k: len(v) for k, v in runs.items()} == {"uniform": 2, "dograph": 2}

  def avg_ppl(label, seed):
    summary = json.loads((tmp_path / "runs" / "tiny" / label / f"seed{seed}" /
                          "summary.json").read_text())
    return math.exp(np.mean(list(summary["val_loss"].values())))

  diffs = [avg_ppl("dograph", s) - avg_ppl("uniform", s) for s in (0, 1)]
  text = (results / "table.md").read_text()
  assert f"| dograph | {np.mean(diffs):+.3f} ± {np.std(diffs):.3f} |" in text
  # A rerun reads every finished run back instead of training it again.
  monkeypatch.setattr(pretrain, "train", lambda cfg: pytest.fail("retrained " + cfg.run.out_dir))
  assert ablate.main(argv) == 0
  # --report_only tabulates what finished and names what did not, training nothing.
  report = tmp_path / "report"
  assert ablate.main([*argv, "--config", "stratified:method=stratified", "--report_only",
                      "--results_dir", str(report)]) == 0
  assert not (tmp_path / "runs" / "tiny" / "stratified").exists()
  reported = (report / "table.md").read_text()
  assert "Not run yet (2, left out of the means): stratified/seed0, stratified/seed1" in reported
  assert "| stratified | 0 |" in reported
  assert f"| dograph | {np.mean(diffs):+.3f} ± {np.std(diffs):.3f} |" in reported
  assert json.loads((report / "study.json").read_text())["corpora"]["tiny"]["pending"] == [
      "stratified/seed0", "stratified/seed1"]


def test_bad_config_fails_before_any_run():
  with pytest.raises(ValueError, match="not name=value"):
    ablate.parse_configs(["x:no_such_option=1"])
  with pytest.raises(ValueError, match="LABEL"):
    ablate.parse_configs(["method=uniform"])
  with pytest.raises(ValueError, match="key=value;key=value"):
    ablate.parse_configs(["x:method=temperature,method_args=T"])


def test_method_args_in_a_config_row():
  (label, text), = ablate.parse_configs(
      ["ado:method=ado,method_args=update_interval=100;start_step=200"]).items()
  assert label == "ado"
  assert ablate.parse_overrides(text) == {
      "method": "ado", "method_args": {"update_interval": "100", "start_step": "200"}}
