"""The natural-mixture perplexity: ``exp(sum_d s_d loss_d)`` with the corpus's
token shares renormalised over the evaluated domains; in the run summary
table, and in compare/ablate tables, study.json and plots, recomputed from
each run's val_loss + token_shares ("n/a" for runs without them)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from dograph_jax.study import ablate, compare
from dograph_jax.train import reporting

LOSS = {"a": 1.0, "b": 2.0, "c": 4.0}
# d has no validation loss: dropped, the rest renormalised to 4/7, 2/7, 1/7.
SHARES = {"a": 0.5, "b": 0.25, "c": 0.125, "d": 0.125}


def test_perplexities_natural_by_hand():
  p = reporting.perplexities(LOSS, SHARES)
  # 4/7 * 1 + 2/7 * 2 + 1/7 * 4 = 12/7
  assert p["natural"] == pytest.approx(math.exp(12 / 7), rel=1e-12)
  assert p["average"] == pytest.approx(math.exp(7 / 3), rel=1e-12)
  assert p["worst"] == pytest.approx(math.exp(4.0)) and p["worst_domain"] == "c"
  assert "natural" not in reporting.perplexities(LOSS)  # the old keys only
  assert set(reporting.perplexities(LOSS)) == {"per_domain", "average", "worst_domain", "worst"}
  # Shares on any scale: only their ratios count.
  assert reporting.perplexities(LOSS, {"a": 4, "b": 2, "c": 1})["natural"] == pytest.approx(
      p["natural"], rel=1e-12)


@pytest.mark.parametrize("shares, match", [
    ({"a": 0.5, "b": 0.5}, r"miss the evaluated domain\(s\) \['c'\]"),
    ({"a": 0.5, "b": 0.5, "c": 0.0}, "positive and finite"),
    ({"a": 0.5, "b": -0.1, "c": 0.6}, "positive and finite"),
    ({"a": 0.5, "b": float("nan"), "c": 0.5}, "positive and finite"),
    ({"a": 0.5, "b": float("inf"), "c": 0.5}, "positive and finite"),
    ({"a": 0.5, "b": "x", "c": 0.5}, "positive and finite"),
])
def test_perplexities_rejects_bad_shares(shares, match):
  with pytest.raises(ValueError, match=match):
    reporting.perplexities(LOSS, shares)


def test_summary_table_has_natural_line_only_with_shares():
  text = reporting.summary_table("T", LOSS, 2.0, shares=SHARES)
  line = next(l for l in text.splitlines() if l.startswith("natural mixture"))
  assert line.split()[-1] == f"{math.exp(12 / 7):.3f}"
  assert "natural" not in reporting.summary_table("T", LOSS, 2.0)


def _summary(seed, shift, shares=True):
  """A fake run summary: losses ``LOSS + shift`` (per domain)."""
  loss = {n: v + s for (n, v), s in zip(LOSS.items(), shift)}
  out = {"val_loss": loss, "wall_s": 10.0, "seed": seed,
         # a stored number that must NOT be trusted: the tables recompute it
         "natural": 1e9}
  if shares:
    out["token_shares"] = dict(SHARES)
  return out


def _natural(loss):
  w = {"a": 4 / 7, "b": 2 / 7, "c": 1 / 7}
  return math.exp(sum(w[n] * v for n, v in loss.items()))


def _avg(loss):
  return math.exp(sum(loss.values()) / len(loss))


def _runs():
  """uniform and a method with token_shares; an old method without them."""
  return {
      "uniform": [_summary(0, (0.0, 0.0, 0.0)), _summary(1, (0.1, 0.0, 0.0))],
      "balance": [_summary(0, (0.3, 0.0, -0.5)), _summary(1, (0.2, 0.1, -0.4))],
      "old": [_summary(0, (0.0, 0.0, 0.0), shares=False),
              _summary(1, (0.0, 0.0, 0.0), shares=False)],
  }


def test_compare_aggregate_and_table_natural_column():
  runs = _runs()
  agg = compare.aggregate(runs)
  nat = [_natural(r["val_loss"]) for r in runs["balance"]]
  assert agg["balance"]["natural_mean"] == pytest.approx(np.mean(nat), rel=1e-12)
  assert agg["balance"]["natural_std"] == pytest.approx(np.std(nat), rel=1e-9)
  assert agg["old"]["natural_mean"] is None and agg["old"]["natural_runs"] == 0
  text = compare.table(agg, "T", {"lost/seed0": "Traceback\nOSError: disk\n"},
                       ["uniform", "balance", "old", "lost"])
  head, _, *rows = [l for l in text.splitlines() if l.startswith("|")]
  cells = [c.strip() for c in head.strip("|").split("|")]
  assert cells[:5] == ["method", "runs", "avg val PPL", "worst-domain PPL", "natural-mix PPL"]
  by_method = {r.split(" | ")[0][2:]: [c.strip() for c in r.strip("|").split("|")] for r in rows}
  assert by_method["balance"][4] == f"{np.mean(nat):.3f} ± {np.std(nat):.3f}"
  assert by_method["old"][4] == "n/a"
  assert by_method["lost"][2:5] == ["-", "-", "-"]
  assert all(len(r) == len(cells) for r in by_method.values())
  # A method whose seeds only partly have token_shares: n/a, with the count.
  mixed = compare.aggregate({"m": [_summary(0, (0, 0, 0)), _summary(1, (0, 0, 0), False)]})
  assert compare.natural_cell(mixed["m"]) == "n/a (1/2 runs)"
  # Aggregates of before the column (no natural_* keys) keep the old columns.
  old_agg = {k: v for k, v in agg["uniform"].items() if not k.startswith("natural")}
  assert "natural" not in compare.table({"uniform": old_agg}, "T")


def test_compare_natural_not_crashing_on_shares_that_miss_a_domain(caplog):
  bad = _summary(0, (0, 0, 0))
  bad["token_shares"] = {"a": 1.0}
  agg = compare.aggregate({"m": [bad]})
  assert agg["m"]["natural_mean"] is None
  assert "miss the evaluated domain" in caplog.text


def test_ablate_paired_report_and_plot(tmp_path):
  runs = _runs()
  paired = ablate.paired_differences(runs)
  d = [_natural(b["val_loss"]) - _natural(u["val_loss"])
       for b, u in zip(runs["balance"], runs["uniform"])]
  assert paired["balance"]["natural_mean"] == pytest.approx(np.mean(d), rel=1e-9)
  assert paired["balance"]["natural_seeds"] == 2
  assert paired["old"]["natural_mean"] is None and paired["old"]["natural_seeds"] == 0
  result = {"corpora": {"tiny": {"aggregate": compare.aggregate(runs), "runs": runs,
                                 "failures": {}}},
            "failures": {}}
  configs = {"uniform": "method=uniform", "balance": "method=stratified",
             "old": "method=dograph"}
  from dograph_jax.train import config
  text = ablate.report(result, configs, config.make_config(), [0, 1], "cmd")
  assert ("| configuration | Δ avg PPL | Δ worst PPL | Δ natural PPL | seeds better on avg "
          "| Δ avg per seed |") in text
  seeds = sorted(s["seed"] for s in runs["balance"])
  d_avg = {s: _avg(b["val_loss"]) - _avg(u["val_loss"])
           for s, b, u in zip(seeds, runs["balance"], runs["uniform"])}
  assert paired["balance"]["average_by_seed"] == pytest.approx(d_avg, rel=1e-9)
  balance_row = [l for l in text.splitlines() if l.startswith("| balance |")][-1]
  assert balance_row.endswith(" | " + ", ".join(f"{s}: {v:+.2f}" for s, v in d_avg.items()) + " |")
  assert f"| {np.mean(d):+.3f} ± {np.std(d):.3f} |" in text.split("| balance |")[-1]
  old_row = [l for l in text.splitlines() if l.startswith("| old |")][-1]  # the paired table's
  assert old_row.split(" | ")[3] == "n/a"
  json.dumps(result)  # study.json: the aggregates stay serialisable (None for n/a)
  path = ablate.write_plot(result, tmp_path / "study.png")
  assert path.exists() and path.stat().st_size > 0


def test_compare_plot_shows_the_three_figures(tmp_path, monkeypatch):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  saved = {}
  monkeypatch.setattr(plt, "close", lambda fig=None: None)
  real = plt.Figure.savefig

  def keep(fig, path, *a, **k):
    saved[Path(path).name] = fig
    return real(fig, path, *a, **k)
  monkeypatch.setattr(plt.Figure, "savefig", keep)
  base = {"per_domain_mean": {"a": 10.0, "b": 30.0}, "per_domain_std": {"a": 1.0, "b": 2.0},
          "average_mean": 17.3, "average_std": 0.5, "worst_mean": 30.0, "worst_std": 2.0,
          "mixture": {"a": 0.5, "b": 0.5}}
  agg = {"uniform": {**base, "natural_mean": 12.0, "natural_std": 0.1},
         "old": {**base, "natural_mean": None, "natural_std": None}}
  compare.write_plots(agg, tmp_path, seed=0)
  ax = saved["per_domain_ppl.png"].axes[0]
  assert [t.get_text() for t in ax.get_xticklabels()] == [
      "a", "b", "[average]", "[natural]", "[worst]"]
  heights = [[b.get_height() for b in c] for c in ax.containers if hasattr(c, "patches")]
  assert heights[0] == [10.0, 30.0, 17.3, 12.0, 30.0]
  assert heights[1][3] == 0.0  # a method without the figure draws no bar
