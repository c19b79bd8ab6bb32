"""experiments/analyses.py end to end on a tiny study (2 seeds, few steps),
the quantities it plots checked against independent computations:
scikit-learn's ARI / NMI / PCA / contingency matrix, scipy's Spearman
correlation, optax's cross-entropy of a plain forward pass, perplexities
recomputed from the runs' own summaries, and numpy sums of the logged
coefficients."""

import json
import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.stats import spearmanr
from sklearn.decomposition import PCA
from sklearn.metrics import (adjusted_rand_score, calinski_harabasz_score,
                             normalized_mutual_info_score)
from sklearn.metrics.cluster import contingency_matrix

from dograph_jax.data import write_synthetic_corpus
from dograph_jax.study import ablate, analyses
from dograph_jax.models.gpt2 import apply
from dograph_jax.train import single_run, training

SEEDS = (0, 1)
CONFIGS = {"uniform": "method=uniform", "stratified": "method=stratified",
           "dograph": "method=dograph,num_domains=3",
           "dograph_m4": "method=dograph,num_domains=4,objective=variance,lambda_graph=0.5"}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  root = tmp_path_factory.mktemp("analyses")
  corpus = write_synthetic_corpus(root / "tiny", seed=3, total_docs=200)
  argv = [arg for label, text in CONFIGS.items() for arg in ("--config", f"{label}:{text}")]
  argv += ["--data_dirs", str(corpus), "--seeds", ",".join(map(str, SEEDS)),
           "--results_dir", str(root / "study"), "--steps", "4", "--save_every", "2",
           "--keep_checkpoints", "10", "--log_every", "1", "--batch_size", "8",
           "--seq_len", "32", "--vocab_size", "300", "--sketch_dim", "64", "--eval_rows", "8",
           "--out_dir", str(root / "runs")]
  assert ablate.main(argv) == 0
  return root


def _avg_ppl(run_dir):
  loss = json.loads((run_dir / "summary.json").read_text())["val_loss"]
  return math.exp(np.mean(list(loss.values())))


def _run(root, label, seed):
  return root / "runs" / "tiny" / label / f"seed{seed}"


def test_objectives_and_granularity_tables(study):
  bench = {"command": "python benchmarks/bench_core.py --json b.json", "jax": "x",
           "backend": "cpu", "cpu_count": 2, "num_domains": 11, "solver_batch": 48,
           "solver_sketch_dim": 64, "adamw_update_s": 2e-4, "adamw_params": "2-layer MLP",
           "solvers": [{"objective": "uncertainty", "lambda_graph": 0.0, "median_s": 1e-5,
                        "min_s": 9e-6, "vs_adamw_update": 0.05}]}
  (study / "bench.json").write_text(json.dumps(bench))
  out = study / "objectives"
  assert analyses.main(["objectives", "--study", str(study / "study" / "study.json"),
                        "--bench", str(study / "bench.json"), "--out", str(out)]) == 0
  rows = {r["label"]: r for r in json.loads((out / "analysis.json").read_text())["rows"]["tiny"]}
  assert set(rows) == set(CONFIGS)
  for label in CONFIGS:
    ppl = [_avg_ppl(_run(study, label, s)) for s in SEEDS]
    assert rows[label]["average_mean"] == pytest.approx(np.mean(ppl), rel=1e-12)
    assert rows[label]["average_std"] == pytest.approx(np.std(ppl), rel=1e-9, abs=1e-12)
  assert (rows["dograph"]["objective"], rows["dograph"]["lambda_graph"]) == ("uncertainty", 0)
  assert rows["dograph"]["solve_s"] == 1e-5 and rows["dograph"]["solver"].startswith("closed")
  # No timing for (variance, 0.5) in the benchmark: said, not invented.
  assert rows["dograph_m4"]["solve_s"] is None
  text = (out / "table.md").read_text()
  assert "not measured" in text and "10 µs" in text and (out / "objectives.png").exists()

  out = study / "granularity"
  assert analyses.main(["granularity", "--study", str(study / "study" / "study.json"),
                        "--out", str(out)]) == 0
  data = json.loads((out / "analysis.json").read_text())["rows"]["tiny"]
  assert [p["m"] for p in data["points"]] == [3, 4]
  worst = [max(math.exp(v) for v in json.loads((_run(study, "dograph_m4", s) / "summary.json")
                                               .read_text())["val_loss"].values()) for s in SEEDS]
  assert data["points"][1]["worst_mean"] == pytest.approx(np.mean(worst), rel=1e-12)
  assert (out / "granularity.png").exists()


def test_domains_against_sklearn(study):
  out = study / "domains"
  assert analyses.main(["domains", "--runs", str(study / "runs"), "--out", str(out),
                        "--probe_rows", "6", "--keep_sketches"]) == 0
  data = json.loads((out / "analysis.json").read_text())["corpora"]["tiny"]
  assert set(data) == {"uniform", "dograph"} and set(data["dograph"]) == {"0", "1"}
  for label, seeds in data.items():
    for seed, run in seeds.items():
      # Step 0 is the initialisation, then every saved checkpoint.
      assert run["steps"] == [0] + single_run.checkpoint_steps(_run(study, label, seed)) \
          == [0, 2, 4]
      assert sorted(run["snapshots"], key=int) == ["0", "2", "4"]
      for step, snap in run["snapshots"].items():
        labels, clusters = np.asarray(snap["labels"]), np.asarray(snap["clusters"])
        k = run["steps"].index(int(step))
        assert run["ari"][k] == pytest.approx(adjusted_rand_score(labels, clusters), abs=1e-12)
        assert run["nmi"][k] == pytest.approx(normalized_mutual_info_score(labels, clusters),
                                              abs=1e-12)
        z = np.asarray(snap["sketches"])
        unit = z / np.linalg.norm(z, axis=1, keepdims=True)
        ref = PCA(n_components=2, svd_solver="full").fit_transform(unit)
        ours = np.asarray(snap["pca"])
        for c in range(2):  # a principal direction's sign is arbitrary
          sign = np.sign(ours[:, c] @ ref[:, c])
          np.testing.assert_allclose(ours[:, c], sign * ref[:, c], atol=1e-5)
        table = np.asarray(snap["contingency"])
        present = np.unique(clusters)
        np.testing.assert_array_equal(table[np.unique(labels)][:, present],
                                      contingency_matrix(labels, clusters))
        assert table.sum() == len(labels) == run["probe_rows"]
  correlated = between = 0
  # The same initialisation under either method: identical step-0 sketches.
  for seed in ("0", "1"):
    np.testing.assert_array_equal(data["uniform"][seed]["snapshots"]["0"]["sketches"],
                                  data["dograph"][seed]["snapshots"]["0"]["sketches"])
    own = data["dograph"][seed]
    assert own["ari_own"][0] is None and all(x is not None for x in own["ari_own"][1:])
    # Up-weighting by source, recomputed in numpy from the checkpoint: each
    # probe row's nearest persistent centroid (Euclidean), r = min(w / p, 4)
    # of the last update's weights, averaged over the source's rows.
    assert own["ratio_own"][0] is None
    for k, step in enumerate(own["steps"][1:], start=1):
      state, meta, cfg = single_run.load_run_state(_run(study, "dograph", seed), step)
      inner = state.opt_state.head.inner_state
      z = np.asarray(own["snapshots"][str(step)]["sketches"], np.float64)
      labels = np.asarray(own["snapshots"][str(step)]["labels"])
      centroids = np.asarray(inner.centroids, np.float64)
      nearest = ((z[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
      w, p = np.asarray(inner.applied_weights, np.float64), np.asarray(inner.frequencies, np.float64)
      r = np.where(p > 0, np.minimum(w / np.where(p > 0, p, 1), 4.0), 0.0)
      expected = [r[nearest[labels == d]].mean() for d in range(len(own["names"]))]
      np.testing.assert_allclose(own["ratio_own"][k], expected, rtol=1e-5)
      assert not np.allclose(expected, 1.0)  # the weights departed: the check can fail
      # Within a source: the tilt towards high-loss rows and scipy's Spearman
      # correlation of r and the row losses, averaged over the sources.
      losses = np.asarray(own["snapshots"][str(step)]["losses"], np.float64)
      tilt, rho, spread = [], [], []
      for d in np.unique(labels):
        rd, ld = r[nearest[labels == d]], losses[labels == d]
        tilt.append((rd @ ld / rd.sum() - ld.mean()) / ld.mean())
        spread.append(rd.std())
        if np.ptp(np.round(rd, 4)) > 0:  # r equal to 1e-4 is constant (see the docstring)
          rho.append(spearmanr(np.round(rd, 4), ld).statistic)
      got = own["tilt_own"][k]
      np.testing.assert_allclose(got["tilt"], np.mean(tilt), rtol=1e-5, atol=1e-9)
      # r ~ 1 in float32 there, float64 here: a constant r's std is a few ulp.
      np.testing.assert_allclose(got["r_std"], np.mean(spread), rtol=1e-5, atol=1e-6)
      # The clusters' share of the sketch variance, from scikit-learn's
      # Calinski-Harabasz index CH = (B / (c - 1)) / (W / (n - c)).
      c, n = len(np.unique(nearest)), len(nearest)
      if 1 < c < n:
        ratio = calinski_harabasz_score(z, nearest) * (c - 1) / (n - c)
        np.testing.assert_allclose(got["between"], ratio / (1 + ratio), rtol=1e-6)
        between += 1
      if rho:
        np.testing.assert_allclose(got["spearman"], np.mean(rho), rtol=1e-6)
        correlated += 1
      else:
        assert got["spearman"] is None
    # The row losses are the checkpoint's: a plain forward pass and optax's
    # cross-entropy of the probe rows (last step).
    tokens, _, _ = analyses.probe_set(cfg, 6)
    _, graphdef, _ = training.build_model(cfg, meta["vocab_size"])
    logits = apply(graphdef, state.params, jnp.asarray(tokens[:, :-1]))
    expected = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), jnp.asarray(tokens[:, 1:])).mean(1)
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    # The online curve is the trainer's own log; its ARI agrees with
    # scikit-learn's on the logged contingency tables.
    records = [r for r in analyses.read_metrics(_run(study, "dograph", seed)) if "ari" in r]
    assert own["online"]["steps"] == [r["step"] for r in records] == [1, 2, 3, 4]
    for r, ari in zip(records, own["online"]["ari"]):
      table = np.asarray(r["contingency"])
      rows, cols = np.nonzero(table)
      labels = np.repeat(rows, table[rows, cols])
      clusters = np.repeat(cols, table[rows, cols])
      assert ari == pytest.approx(adjusted_rand_score(labels, clusters), abs=1e-12)
  for name in ("agreement.png", "pca_tiny.png", "contingency_tiny.png", "table.md"):
    assert (out / name).exists()
  table = (out / "table.md").read_text()
  assert "Up-weighting by source" in table and "| dograph step |" in table
  assert "Within a source" in table and "| tilt % |" in table
  assert correlated  # r varies within a source somewhere: the Spearman check can fail
  assert between  # some step has 2 or more clusters among the probe rows
  assert "| between % |" in table


def test_weights_and_cost(study):
  out = study / "weights"
  assert analyses.main(["weights", "--runs", str(study / "runs"), "--out", str(out),
                        "--window", "2"]) == 0
  data = json.loads((out / "analysis.json").read_text())["corpora"]["tiny"]
  for seed in SEEDS:
    records = analyses.read_metrics(_run(study, "dograph", seed))
    logged = [r for r in records if "update_share" in r]
    names = data["seeds"][str(seed)]["names"]
    for r in logged:  # the coefficients of a batch sum to 1
      assert sum(r["update_share"].values()) == pytest.approx(1.0, abs=1e-5)
    window = [r for r in logged if r["step"] > 2]
    assert [r["step"] for r in window] == [3, 4]
    for n in names:
      expect = np.mean([r["update_share"].get(n, 0.0) for r in window])
      assert data["seeds"][str(seed)]["window"][n] == pytest.approx(expect, abs=1e-12)
    assert np.asarray(data["seeds"][str(seed)]["weights"]).shape == (4, 3)
  uniform = json.loads((_run(study, "uniform", 0) / "summary.json").read_text())
  assert data["natural"] == uniform["proportions"]
  strat = json.loads((_run(study, "stratified", 0) / "summary.json").read_text())
  assert data["stratified"] == strat["mixture"]
  assert data["stratified"] == pytest.approx({n: 1 / len(names) for n in names})
  assert (out / "weights.png").exists()

  bench = {"command": "python benchmarks/bench_step.py --json s.json", "date": "d",
           "device_kind": "cpu", "setting": {"model": "mini"},
           "candidates": {"plain": {"median_s": 0.01, "min_s": 0.009, "ratio_vs_plain": 1.0},
                          "factored": {"median_s": 0.0105, "min_s": 0.01,
                                       "ratio_vs_plain": 1.05}}}
  (study / "bench_step.json").write_text(json.dumps(bench))
  out = study / "cost"
  assert analyses.main(["cost", "--runs", str(study / "runs"), "--out", str(out),
                        "--bench", str(study / "bench_step.json")]) == 0
  data = json.loads((out / "analysis.json").read_text())
  read = lambda label, s: json.loads((_run(study, label, s) / "summary.json").read_text())
  ratios = [read("uniform", s)["steps_per_s"] / read("dograph", s)["steps_per_s"] for s in SEEDS]
  assert data["runs"]["tiny"]["step_ratio"][0] == pytest.approx(np.mean(ratios), rel=1e-12)

  def steady(label, s):  # steps over seconds between the first and last record
    timed = [r for r in analyses.read_metrics(_run(study, label, s)) if "elapsed_s" in r]
    assert [r["step"] for r in timed] == [1, 2, 3, 4]
    return 3 / (timed[-1]["elapsed_s"] - timed[0]["elapsed_s"])
  steady_ratios = [steady("uniform", s) / steady("dograph", s) for s in SEEDS]
  assert data["runs"]["tiny"]["steady_step_ratio"][0] == pytest.approx(np.mean(steady_ratios),
                                                                       rel=1e-12)
  assert "| factored | 10.50 | 10.00 | 1.050x |" in (out / "table.md").read_text()


def test_host_record_update_share_is_the_sum_of_coefficients():
  rng = np.random.default_rng(0)
  domain = rng.integers(0, 3, 16)
  a = rng.random(16).astype(np.float32)
  a /= a.sum()
  metrics = {"loss": 1.0, "lr": 0.1, "update_norm": 1.0, "losses": rng.random(16),
             "domain_id": domain, "coefficients": a}
  record = single_run._host_record(metrics, ["x", "y", "z"])
  np.testing.assert_allclose(list(record["update_share"].values()),
                             np.bincount(domain, weights=a, minlength=3), rtol=1e-6)


def test_missing_runs_and_bad_studies_fail_clearly(tmp_path):
  with pytest.raises(FileNotFoundError, match="no finished runs"):
    analyses.find_runs(tmp_path)
  with pytest.raises(FileNotFoundError, match="no such study"):
    analyses.read_study(tmp_path / "study.json")
  study = {"config": {"method": "dograph", "num_domains": 11, "objective": "uncertainty",
                      "lambda_graph": 0.0},
           "configs": {"a": "method=dograph", "b": "method=dograph,objective=robust"},
           "corpora": {"c": {"runs": {
               "a": [{"seed": 0, "val_loss": {"x": 1.0}, "wall_s": 1.0}],
               "b": [{"seed": 0, "val_loss": {"x": 1.1}, "wall_s": 1.0}]}}}}
  with pytest.raises(ValueError, match="both have m = 11"):
    analyses.granularity(study)


def test_steady_speed_uses_the_last_session_of_a_resumed_run():
  records = [{"step": 1, "elapsed_s": 1.0}, {"step": 3, "elapsed_s": 2.0},
             {"step": 3, "val_loss": {}},  # an evaluation record: no clock
             {"step": 5, "elapsed_s": 0.5}, {"step": 9, "elapsed_s": 1.5}]  # resumed
  assert analyses.steady_steps_per_s(records) == pytest.approx(4.0)
  assert analyses.steady_steps_per_s(records[:2]) == pytest.approx(2.0)
  assert analyses.steady_steps_per_s([{"step": 4, "loss": 1.0}]) is None


# ---------------------------------------------------------------------------
# dynamics: fake run directories with hand-written logs (no training).

def _fake_run(runs, corpus, label, seed, records, apply_weights="paper", finished=True,
              offline=False):
  run = runs / corpus / label / f"seed{seed}"
  log_dir = run / "stages" / "final" if offline else run  # an offline pipeline logs per stage
  log_dir.mkdir(parents=True)
  (log_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  (run / "config.json").write_text(json.dumps({
      "method": "uniform" if label == "uniform" else "dograph", "apply_weights": apply_weights,
      "dograph": {"max_ratio": 1.5, "num_domains": 3}, "optim": {"batch_size": 8}}))
  if finished:
    (run / "summary.json").write_text("{}")


def _val(step, ppl):
  """An evaluation record whose average PPL exp(mean_d val_loss_d) is ``ppl``:
  two domains at ppl / 2 and 2 ppl (their mean PPL, 1.25 ppl, would differ)."""
  return {"step": step, "val_loss": {"a": math.log(ppl / 2), "b": math.log(2 * ppl)}}


# The hand case: w / p = (2, 0.4, —) with p_3 = 0 (a cluster reseeded this step).
HAND = {"weights": [0.5, 0.3, 0.2], "frequencies": [0.25, 0.75, 0.0], "cluster_sizes": [2, 5, 1]}
FLAT = {"weights": [0.5, 0.5, 0.0], "frequencies": [0.5, 0.5, 0.0], "cluster_sizes": [4, 4, 0]}


def test_weight_stats_by_hand():
  s = analyses.weight_stats(HAND["weights"], HAND["frequencies"], HAND["cluster_sizes"], 1.5)
  # departure: 0.25 |2 - 1| + 0.75 |0.4 - 1| = 0.25 + 0.45 (the p = 0 cluster left out)
  assert s["departure"] == pytest.approx(0.7, abs=1e-12)
  assert s["max_ratio"] == pytest.approx(2.0)  # uncapped
  assert s["alive"] == 2  # 1 / (4 M) = 1/12: 0.25 and 0.75 pass, 0 does not
  # r = (min(2, 1.5), 0.4, 0), n = (2, 5, 1): ESS = (3 + 2)^2 / (4.5 + 0.8), B = 8 (the
  # reseeded cluster's row counts in B with a zero coefficient).
  assert s["ess_fraction"] == pytest.approx(25 / 5.3 / 8, abs=1e-12)
  assert "sampling_spread" not in s
  flat = analyses.weight_stats(FLAT["weights"], FLAT["frequencies"], FLAT["cluster_sizes"], 1.5)
  assert (flat["departure"], flat["max_ratio"], flat["ess_fraction"]) == (0.0, 1.0, 1.0)
  assert flat["alive"] == 2
  # The threshold is inclusive: p = 1 / (4 M) = 1/8 with M = 2 is alive.
  assert analyses.weight_stats([0.5, 0.5], [0.125, 0.875], [1, 7], 4.0)["alive"] == 2
  # Sample form: the update is the plain mean whatever w / p; the groups' spread.
  s = analyses.weight_stats(HAND["weights"], HAND["frequencies"], HAND["cluster_sizes"], 1.5,
                            sample=True, sampling_ratio={"x": 0.5, "y": 2.0, "z": 1.0})
  assert (s["ess_fraction"], s["sampling_spread"]) == (1.0, 4.0)
  assert s["departure"] == pytest.approx(0.7)


def test_dynamics_gap_weights_and_skips(tmp_path, capsys):
  runs = tmp_path / "runs"
  # Uniform: PPL 20 / 30 at step 100 and 10 / 12 at step 200 (seed 0 resumed: its
  # first step-100 evaluation, 99, is superseded by the later one).
  _fake_run(runs, "c", "uniform", 0, [_val(100, 99.0), _val(100, 20.0), _val(200, 10.0)])
  _fake_run(runs, "c", "uniform", 1, [_val(100, 30.0), _val(200, 12.0)])
  # DoGraph: 16 / 27, then 10 (a tie: not better) / 11. Training records at 50 (outside the window
  # (50, 100]: a wild one that would show), 75 and 100.
  wild = {"step": 50, "weights": [1.0, 0.0, 0.0], "frequencies": [0.01, 0.01, 0.98],
          "cluster_sizes": [8, 0, 0]}
  _fake_run(runs, "c", "dograph", 0, [wild, {"step": 75, **HAND}, {"step": 100, **FLAT},
                                      _val(100, 16.0), _val(200, 10.0)])
  _fake_run(runs, "c", "dograph", 1, [wild, {"step": 75, **FLAT}, {"step": 100, **FLAT},
                                      _val(100, 27.0), _val(200, 11.0)])
  _fake_run(runs, "c", "dograph", 2, [_val(100, 1.0)], finished=False)  # still running
  _fake_run(runs, "c", "dograph_sample", 0,
            [{"step": 100, **HAND, "sampling_ratio": {"x": 0.5, "y": 2.0}}, _val(100, 19.0)],
            apply_weights="sample")
  _fake_run(runs, "d", "dograph", 0, [_val(100, 5.0)])  # no Uniform: corpus left out
  out = tmp_path / "out"
  argv = ["dynamics", "--runs", str(runs), "--uniform", "uniform", "--dograph",
          "dograph,dograph_sample,absent", "--at", "100,400", "--window", "50", "--out", str(out)]
  assert analyses.main(argv) == 0
  logged = capsys.readouterr().err  # main's logging goes to stderr
  assert "c: no finished 'absent' runs; left out" in logged
  assert "d: needs finished 'uniform' runs" in logged
  data = json.loads((out / "analysis.json").read_text())
  assert list(data["corpora"]) == ["c"]
  c = data["corpora"]["c"]
  assert set(c["curves"]) == {"uniform", "dograph", "dograph_sample"}
  u = c["curves"]["uniform"]
  assert u["steps"] == [100, 200] and u["seeds"] == [0, 1]
  np.testing.assert_allclose(u["mean"], [25.0, 11.0])
  np.testing.assert_allclose(u["std"], [5.0, 1.0])
  p = c["paired"]["dograph"]
  assert p["seeds"] == [0, 1] and p["steps"] == [100, 200]  # the unfinished seed 2 ignored
  np.testing.assert_allclose(p["diff_mean"], [-3.5, -0.5], atol=1e-12)  # (-4, -3), (0, -1)
  np.testing.assert_allclose(p["diff_std"], [0.5, 0.5])
  assert p["better"] == [2, 1]
  np.testing.assert_allclose(p["ratio_mean"], [0.85, (1 + 11 / 12) / 2])
  assert c["paired"]["dograph_sample"]["steps"] == [100]
  assert c["paired"]["dograph_sample"]["diff_mean"] == pytest.approx([-1.0])

  w = c["weights"]["dograph"]["at"]
  assert w["100"]["records"] == [2, 2]
  assert w["100"]["departure"] == pytest.approx([0.175, 0.175])  # seeds 0.35, 0
  assert w["100"]["max_ratio"] == pytest.approx([1.25, 0.25])  # seeds (2 + 1) / 2, 1
  assert w["100"]["alive"] == pytest.approx([2.0, 0.0])
  ess0 = (25 / 5.3 / 8 + 1) / 2
  assert w["100"]["ess_fraction"] == pytest.approx([(ess0 + 1) / 2, (1 - ess0) / 2])
  assert w["400"]["records"] == [0, 0] and w["400"]["departure"] is None  # nothing logged
  s = c["weights"]["dograph_sample"]
  assert s["apply_weights"] == "sample"
  assert s["at"]["100"]["ess_fraction"] == [1.0, 0.0]
  assert s["at"]["100"]["sampling_spread"] == [4.0, 0.0]

  text = (out / "table.md").read_text()
  assert text.splitlines()[2] == ("Command: `python experiments/analyses.py " + " ".join(argv)
                                  + "`")
  assert ("| step | uniform PPL (2 seeds) | dograph PPL (2 seeds) | dograph_sample PPL (1 seeds) "
          "| Δ dograph − uniform (2 seeds) |") in text
  assert "| 100 | 25.00 ± 5.00 | 21.50 ± 5.50 | 19.00 ± 0.00 | -3.50 ± 0.50 (2/2) |" in text
  assert "| 200 | 11.00 ± 1.00 | 10.50 ± 0.50 | — | -0.50 ± 0.50 (1/2) |" in text
  assert "| ESS/B | " in text and "| sampling_ratio max/min | 4.000 ± 0.000 | — |" in text
  assert (out / "gap.png").stat().st_size > 0


def test_dynamics_against_an_offline_methods_final_stage(tmp_path):
  # DoGraph on stratified batches against stratified itself, whose curve is its
  # final stage's log (an offline pipeline writes none at its top).
  runs = tmp_path / "runs"
  _fake_run(runs, "c", "stratified", 0, [_val(100, 20.0), _val(200, 10.0)], offline=True)
  _fake_run(runs, "c", "dograph_stratified", 0, [_val(100, 18.0), _val(200, 9.0)])
  out = tmp_path / "out"
  assert analyses.main(["dynamics", "--runs", str(runs), "--uniform", "stratified",
                        "--dograph", "dograph_stratified", "--at", "100", "--out", str(out)]) == 0
  c = json.loads((out / "analysis.json").read_text())["corpora"]["c"]
  np.testing.assert_allclose(c["curves"]["stratified"]["mean"], [20.0, 10.0])
  np.testing.assert_allclose(c["paired"]["dograph_stratified"]["diff_mean"], [-2.0, -1.0])


def test_dynamics_training_loss_gap_by_hand(tmp_path):
  # Window (50, 100]: step 50 is outside. Uniform's seed 0 was resumed and logged
  # step 100 twice (its later record, 2.9, wins); DoGraph's seed 1 logged step 90,
  # which Uniform did not: only the steps both logged count.
  runs = tmp_path / "runs"
  loss = lambda step, x: {"step": step, "loss": x}
  _fake_run(runs, "c", "uniform", 0, [loss(50, 9.0), loss(75, 4.0), loss(100, 3.0),
                                      loss(100, 2.9), _val(100, 20.0)])
  _fake_run(runs, "c", "uniform", 1, [loss(75, 4.0), loss(100, 3.0), _val(100, 20.0)])
  _fake_run(runs, "c", "dograph", 0, [loss(50, 1.0), loss(75, 3.9), loss(100, 2.7),
                                      _val(100, 19.0)])
  _fake_run(runs, "c", "dograph", 1, [loss(75, 4.1), loss(90, 1.0), _val(100, 21.0)])
  out = tmp_path / "out"
  assert analyses.main(["dynamics", "--runs", str(runs), "--uniform", "uniform", "--dograph",
                        "dograph", "--at", "100,400", "--window", "50", "--out", str(out)]) == 0
  t = json.loads((out / "analysis.json").read_text())["corpora"]["c"]["train_loss"]["dograph"]
  assert t["seeds"] == [0, 1] and not t["own_batches"]
  # seed 0: (3.9 - 4.0 + 2.7 - 2.9) / 2 = -0.15; seed 1: 4.1 - 4.0 = +0.1
  x = t["at"]["100"]
  np.testing.assert_allclose(x["diff"], [-0.025, 0.125], atol=1e-12)
  assert (x["better"], x["seeds"], x["records"]) == (1, 2, [2, 1])
  assert t["at"]["400"] == {"diff": None, "better": 0, "seeds": 0, "records": [0, 0]}
  text = (out / "table.md").read_text()
  assert "| dograph | -0.0250 ± 0.1250 (1/2) | — |" in text
  # The sample form draws its own batches: marked.
  _fake_run(runs, "c", "dograph_sample", 0, [loss(75, 3.0), _val(100, 19.0)],
            apply_weights="sample")
  assert analyses.main(["dynamics", "--runs", str(runs), "--uniform", "uniform", "--dograph",
                        "dograph_sample", "--at", "100", "--window", "50", "--out", str(out)]) == 0
  t = json.loads((out / "analysis.json").read_text())["corpora"]["c"]["train_loss"]
  assert t["dograph_sample"]["own_batches"]
  # seed 0 only: 3.0 - 4.0
  np.testing.assert_allclose(t["dograph_sample"]["at"]["100"]["diff"], [-1.0, 0.0], atol=1e-12)
  assert ("| dograph_sample (its own batches: sampled) | -1.0000 ± 0.0000 (1/1) |"
          in (out / "table.md").read_text())


def test_probe_reads_validation_only_domains_after_the_training_ones():
  """--eval_domains validation: a source only the validation split has (the
  true source hidden under a coarse training label) is probed too, with
  the next id; a training domain without validation rows keeps its id."""
  from types import SimpleNamespace
  rows = lambda v, n: [{"tokens": np.full((n, 3), v), "mask": np.ones(n, bool)}]
  data = SimpleNamespace(names=["a", "b", "c"],
                         eval_batches={"a": rows(1, 4), "c": rows(3, 2), "hidden": rows(9, 5)})
  tokens, labels, names = analyses._read_probe(data, rows_per_domain=3)
  assert names == ["a", "b", "c", "hidden"]
  np.testing.assert_array_equal(labels, [0, 0, 0, 2, 2, 3, 3, 3])
  np.testing.assert_array_equal(tokens[:, 0], [1, 1, 1, 3, 3, 9, 9, 9])
