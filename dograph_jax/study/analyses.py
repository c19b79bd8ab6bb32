"""The paper's analyses of DoGraph, regenerated from finished runs (no training).

Each subcommand reads finished studies or run directories and writes
``table.md`` (with the exact command), its plots and ``analysis.json`` (every
number plotted) into ``--out``:

``objectives``  (paper Table 10) the four weight objectives with and without
    the graph term: average / worst-domain validation PPL, mean ± std over
    seeds, from an ``ablate.py`` study's ``study.json``, beside each solver's
    method and complexity and its solve time per step measured by
    ``benchmarks/bench_core.py --json`` (section 3) next to one AdamW update.
``granularity`` (paper A.7) PPL against the number of model-centric domains
    ``m`` with error bars, from a study whose DoGraph rows differ in
    ``num_domains``.
``domains``     (paper Fig. 1 and 3) how DoGraph's clusters relate to the human
    domains as training goes on, for DoGraph and for Uniform training. A
    fixed probe set (the first ``--probe_rows`` validation rows of every human
    domain; with a run's ``--eval_domains validation``, every source of the
    validation split, so a coarse-label corpus is probed by its true
    sources) is sketched with the run's own sketch (``factored_grads``, the
    run's projection key and ``sketch_dim``) under the parameters of every
    saved checkpoint (step 0 is the initialisation, rebuilt from the run's
    seed), then clustered *on the side* by K-means (``m`` = the run's
    ``num_domains``, its distance and Lloyd iterations, seeded k-means++):
    the update of the run is untouched, so Uniform gets clusters too. For
    DoGraph also: the probe rows assigned to DoGraph's own persistent
    centroids in the checkpoint, and the ARI / NMI that the trainer logged on
    its training batches (``metrics.jsonl``); and per source how much heavier
    than in the plain batch mean DoGraph counts its rows at each checkpoint
    (the mean over the source's probe rows of ``r = min(w / p, max_ratio)``
    of the domain each falls in; table "up-weighting by source"; persistent
    mode, several DoGraph labels with ``--dograph a,b``), and within a
    source which rows (``within_source_tilt``: does the update lean to the
    source's high-loss rows). Plots: ARI and NMI
    against the step (mean ± std over seeds); a 2-D PCA of the unit-normalised probe
    sketches coloured by human domain, and the contingency matrices (share of
    each human domain's rows per side cluster), at initialisation, mid-run
    and the end (first seed).
``weights``     DoGraph's weights of its model-centric domains over training
    (stacked), and per human domain the effective sampling share that its
    coefficients give it: the sum of the per-sample coefficients ``a_i`` of
    the domain's samples in a batch (the trainer logs it as ``update_share``;
    the ``a_i`` of a batch sum to 1), averaged over the logged steps of the
    last ``--window`` steps, against the natural share (the sampling
    proportions of the Uniform run) and Stratified's.
``cost``        DoGraph's step time and wall-clock against Uniform from the same
    runs (paired by seed), and the step ratios of ``benchmarks/bench_step.py
    --json``, in one table.
``dynamics``    why DoGraph's gain over Uniform fades, from the runs' logs.
    *The gap*: at every evaluation step the average validation PPL
    ``exp(mean_d val_loss_d)`` of each label (mean ± std over seeds) and the
    seed-paired difference DoGraph − Uniform (mean ± std, seeds better);
    plotted as the ratio DoGraph / Uniform and as both curves. *The
    weights* (each ``--dograph`` label, comma-separated), averaged over the
    training records in ``(s - --window, s]`` for each ``s`` in ``--at``, then
    mean ± std over seeds: the departure ``sum_k p_k |w_k / p_k - 1|`` of the
    applied weights ``w`` from the running frequencies ``p`` (clusters with
    ``p_k > 0``) and ``max_k w_k / p_k``; the clusters alive (``p_k >= 1 / (4
    M)``); the effective batch size fraction ``ESS / B`` of the persistent
    mode's coefficients ``a_i ∝ r_{c(i)}``, ``r_k = min(w_k / p_k,
    max_ratio)`` (0 where ``p_k = 0``), ``n_k`` the batch rows of cluster
    ``k``: ``ESS = (sum_k n_k r_k)^2 / sum_k n_k r_k^2``, ``B = sum_k n_k``
    (1 for ``--apply_weights sample`` runs, whose update is the plain mean;
    there also the spread max / min of the groups' ``sampling_ratio``).
    *The training loss*: for each ``--dograph`` label and each ``s`` in
    ``--at``, the seed-paired difference of the logged training loss (the
    plain mean loss of the step's batch, before the step's update) to
    ``--uniform``'s at the same steps, averaged over the steps in ``(s -
    --window, s]`` both runs logged, then mean ± std over seeds. Where both
    runs draw the same batches (the same seed and mixture, and weights
    applied in the batch), this compares the two optimizers on the same
    data: a lower loss on the training distribution itself, not a shifted
    mixture. A sample-form label (``--apply_weights sample``) draws its own
    batches and is marked so.

The run directories are ``ablate.py``'s layout ``RUNS/<corpus>/<label>/seed<k>``;
``--uniform``, ``--dograph`` and ``--stratified`` name the labels. Examples
(the commands behind ``experiments/results/analysis_*``)::

    python experiments/analyses.py objectives \\
        --study experiments/results/dograph_objectives/study.json \\
        --bench experiments/results/analysis_objectives/bench_core.json \\
        --out experiments/results/analysis_objectives
    python experiments/analyses.py domains --runs runs/analyses \\
        --out experiments/results/analysis_domains
    python experiments/analyses.py dynamics --runs runs/mixing_1000 \\
        --uniform uniform --dograph dograph,dograph_sample --at 400,1000 \\
        --window 100 --out experiments/results/analysis_dynamics
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
from pathlib import Path
from typing import Sequence


import numpy as np

from dograph_jax import agreement

log = logging.getLogger("analyses")

# How each objective is solved (dograph_jax/objectives.py), per graph term;
# M domains, K sketch dimension, S = num_steps (200) iterations.
SOLVERS = {
    ("uncertainty", False): "closed form w ∝ p / s2, O(M K)",
    ("uncertainty", True): "convex QP, FISTA (S steps), O(M K + S M^2)",
    ("variance", False): "convex QP, FISTA (S steps), O(M^2 K + S M^2)",
    ("variance", True): "convex QP, FISTA (S steps), O(M^2 K + S M^2)",
    ("robust", False): "closed form w ∝ p exp(L / t), O(M)",
    ("robust", True): "mirror descent (S steps), O(M^2 K + S M^2)",
    ("alignment", False): "non-convex; S damped projected fixed-point steps, O(S M K)",
    ("alignment", True): "non-convex; S damped projected fixed-point steps, O(S M K + S M^2)",
}


# ---------------------------------------------------------------------------
# Reading studies and runs.

def read_study(path: str | Path) -> dict:
  """An ``ablate.py`` ``study.json``."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such study (write it with experiments/ablate.py)")
  return json.loads(path.read_text())


def label_settings(study: dict, label: str) -> dict:
  """The options (flat, by flag name) of one configuration of a study; the
  study's base config may be nested (``config.json``) or, from before the
  sections, flat."""
  from dograph_jax.study import ablate
  from dograph_jax.train import config
  base = config.flatten(config.from_dict(study["config"]))
  return {**base, **ablate.parse_overrides(study["configs"][label])}


def find_runs(runs_dir: str | Path) -> dict[str, dict[str, dict[int, Path]]]:
  """``{corpus: {label: {seed: run_dir}}}`` of the finished runs (with a
  ``summary.json``) under ``runs_dir/<corpus>/<label>/seed<k>``."""
  runs_dir = Path(runs_dir)
  out: dict = {}
  for summary in sorted(runs_dir.glob("*/*/seed*/summary.json")):
    run = summary.parent
    out.setdefault(run.parent.parent.name, {}).setdefault(run.parent.name, {})[
        int(run.name[len("seed"):])] = run
  if not out:
    raise FileNotFoundError(f"{runs_dir}: no finished runs (<corpus>/<label>/seed<k>/"
                            "summary.json)")
  return out


def read_metrics(run_dir: Path) -> list[dict]:
  """The run's ``metrics.jsonl`` records; for an offline method's pipeline
  (``dograph_jax/train/offline.py``: stratified, temperature, DoReMi, ...),
  which keeps no log of its own, those of its final stage: the training run
  at the chosen mixture, whose curve is the method's."""
  from dograph_jax.train.tracking import read_records
  path = run_dir / "metrics.jsonl"
  final = run_dir / "stages" / "final" / "metrics.jsonl"
  return read_records(final if not path.exists() and final.exists() else path)


def _mean_std(values) -> tuple[float, float]:
  v = np.asarray(list(values), float)
  return (float(v.mean()), float(v.std())) if v.size else (math.nan, math.nan)


def _pm(mean: float, std: float, digits: int = 3) -> str:
  return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _write(out: Path, command: str, title: str, body: list[str], data: dict) -> None:
  out.mkdir(parents=True, exist_ok=True)
  (out / "table.md").write_text("\n".join([f"# {title}", "", f"Command: `{command}`", "",
                                          *body]) + "\n")
  (out / "analysis.json").write_text(json.dumps({"command": command, **data}, indent=2))


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


# ---------------------------------------------------------------------------
# 1. Objectives (paper Table 10).

def objectives(study: dict, bench: dict | None) -> dict:
  """Per corpus and DoGraph configuration: objective, graph term, PPL
  aggregates, the paired difference to Uniform, solver and solve time."""
  from dograph_jax.study import ablate, compare
  solve_s = {}
  if bench:
    solve_s = {(r["objective"], float(r["lambda_graph"])): r for r in bench["solvers"]}
  rows = {}
  for corpus, result in study["corpora"].items():
    agg = compare.aggregate(result["runs"])
    paired = ablate.paired_differences(result["runs"])
    rows[corpus] = []
    for label, a in agg.items():
      s = label_settings(study, label)
      row = {"label": label, "method": s["method"], **{k: a[k] for k in (
          "average_mean", "average_std", "worst_mean", "worst_std", "seeds")}}
      if s["method"] == "dograph":
        lam = float(s["lambda_graph"])
        timing = solve_s.get((s["objective"], lam))
        row.update(objective=s["objective"], lambda_graph=lam,
                   solver=SOLVERS[s["objective"], lam > 0],
                   solve_s=timing["median_s"] if timing else None,
                   solve_vs_adamw=timing["vs_adamw_update"] if timing else None,
                   paired=paired.get(label))
      rows[corpus].append(row)
  return {"rows": rows, "bench": bench}


def write_objectives(data: dict, out: Path, command: str) -> None:
  bench = data["bench"]
  body = []
  if bench:
    body += [f"Solve times: `{bench['command']}` (jax {bench['jax']}, {bench['backend']}, "
             f"{bench['cpu_count']} cores): one jitted `solve_weights` on the domain "
             f"statistics of a B={bench['solver_batch']} batch, M={bench['num_domains']}, "
             f"K={bench['solver_sketch_dim']}; one AdamW update of the benchmark's model "
             f"({bench['adamw_params']} parameters): {bench['adamw_update_s'] * 1e6:.0f} µs.",
             ""]
  for corpus, rows in data["rows"].items():
    body += [f"### {corpus}", "",
             "| configuration | objective | λ_graph | avg PPL | worst PPL | Δ avg vs uniform "
             "(seeds better) | solver | solve time | vs AdamW update |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
      if r["method"] != "dograph":
        body.append(f"| {r['label']} | — | — | {_pm(r['average_mean'], r['average_std'])} | "
                    f"{_pm(r['worst_mean'], r['worst_std'])} | — | — | — | — |")
        continue
      p = r["paired"]
      delta = (f"{p['average_mean']:+.3f} ± {p['average_std']:.3f} ({p['better']}/{p['seeds']})"
               if p else "—")
      t = f"{r['solve_s'] * 1e6:.0f} µs" if r["solve_s"] is not None else "not measured"
      v = f"{r['solve_vs_adamw']:.2f}x" if r["solve_vs_adamw"] is not None else "—"
      body.append(f"| {r['label']} | {r['objective']} | {r['lambda_graph']:g} | "
                  f"{_pm(r['average_mean'], r['average_std'])} | "
                  f"{_pm(r['worst_mean'], r['worst_std'])} | {delta} | {r['solver']} | {t} | {v} |")
    body.append("")
  _write(out, command, "Weight objectives, with and without the graph term", body, data)
  plt = _plt()
  corpora = list(data["rows"])
  fig, axes = plt.subplots(1, len(corpora), figsize=(6 * len(corpora), 4), squeeze=False)
  for ax, corpus in zip(axes[0], corpora):
    rows = [r for r in data["rows"][corpus] if r["method"] == "dograph"]
    names = sorted({r["objective"] for r in rows})
    lams = sorted({r["lambda_graph"] for r in rows})
    for i, lam in enumerate(lams):
      pts = [(names.index(r["objective"]), r) for r in rows if r["lambda_graph"] == lam]
      x = np.asarray([p[0] for p in pts]) + (i - (len(lams) - 1) / 2) * 0.2
      ax.errorbar(x, [p[1]["average_mean"] for p in pts],
                  yerr=[p[1]["average_std"] for p in pts], fmt="o", capsize=3,
                  label=f"λ_graph = {lam:g}")
    for r in data["rows"][corpus]:
      if r["method"] == "uniform":
        ax.axhspan(r["average_mean"] - r["average_std"], r["average_mean"] + r["average_std"],
                   color="0.85", label="uniform (mean ± std)")
    ax.set_xticks(range(len(names)), names)
    ax.set(ylabel="average val PPL (mean ± std over seeds)", title=corpus)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out / "objectives.png", dpi=120)
  plt.close(fig)


# ---------------------------------------------------------------------------
# 2. Granularity (paper A.7).

def granularity(study: dict) -> dict:
  """Per corpus: ``m`` -> PPL aggregates of the DoGraph rows, and Uniform's."""
  from dograph_jax.study import ablate, compare
  rows = {}
  for corpus, result in study["corpora"].items():
    agg = compare.aggregate(result["runs"])
    paired = ablate.paired_differences(result["runs"])
    points, seen = [], {}
    for label, a in agg.items():
      s = label_settings(study, label)
      if s["method"] != "dograph":
        continue
      m = int(s["num_domains"])
      if m in seen:
        raise ValueError(f"granularity: configurations {seen[m]!r} and {label!r} both have "
                         f"m = {m}; give a study whose DoGraph rows differ only in num_domains")
      seen[m] = label
      points.append({"label": label, "m": m, "paired": paired.get(label),
                     **{k: a[k] for k in ("average_mean", "average_std", "worst_mean",
                                          "worst_std", "seeds")}})
    uniform = agg.get("uniform")
    rows[corpus] = {"points": sorted(points, key=lambda p: p["m"]),
                    "uniform": {k: uniform[k] for k in ("average_mean", "average_std",
                                                        "worst_mean", "worst_std")}
                    if uniform else None}
  return {"rows": rows}


def write_granularity(data: dict, out: Path, command: str) -> None:
  body = []
  for corpus, r in data["rows"].items():
    u = r["uniform"]
    body += [f"### {corpus}", "", "| m | configuration | avg PPL | worst PPL | Δ avg vs uniform "
             "(seeds better) |", "|---|---|---|---|---|"]
    for p in r["points"]:
      d = p["paired"]
      delta = (f"{d['average_mean']:+.3f} ± {d['average_std']:.3f} ({d['better']}/{d['seeds']})"
               if d else "—")
      body.append(f"| {p['m']} | {p['label']} | {_pm(p['average_mean'], p['average_std'])} | "
                  f"{_pm(p['worst_mean'], p['worst_std'])} | {delta} |")
    if u:
      body.append(f"| — | uniform | {_pm(u['average_mean'], u['average_std'])} | "
                  f"{_pm(u['worst_mean'], u['worst_std'])} | — |")
    best = min(r["points"], key=lambda p: p["average_mean"]) if r["points"] else None
    if best:
      body += ["", f"Lowest mean average PPL at m = {best['m']}."]
    body.append("")
  _write(out, command, "Granularity: PPL against the number of model-centric domains m",
         body, data)
  plt = _plt()
  corpora = list(data["rows"])
  fig, axes = plt.subplots(2, len(corpora), figsize=(5.5 * len(corpora), 6.5), squeeze=False)
  for j, corpus in enumerate(corpora):
    r = data["rows"][corpus]
    ms = [p["m"] for p in r["points"]]
    for i, key in enumerate(("average", "worst")):
      ax = axes[i, j]
      ax.errorbar(ms, [p[f"{key}_mean"] for p in r["points"]],
                  yerr=[p[f"{key}_std"] for p in r["points"]], fmt="o-", capsize=3,
                  label="DoGraph")
      if r["uniform"]:
        u = r["uniform"]
        ax.axhspan(u[f"{key}_mean"] - u[f"{key}_std"], u[f"{key}_mean"] + u[f"{key}_std"],
                   color="0.85", label="uniform (mean ± std)")
        ax.axhline(u[f"{key}_mean"], color="0.5", lw=0.8)
      ax.set_xticks(ms)
      ax.set(xlabel="m (model-centric domains)", ylabel=f"{key} val PPL",
             title=f"{corpus}: {key}-domain PPL (mean ± std over seeds)")
      ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out / "granularity.png", dpi=120)
  plt.close(fig)


# ---------------------------------------------------------------------------
# 3. Model-centric vs human domains over training (paper Fig. 1 and 3).

_PROBES: dict = {}  # the runs of one corpus share their probe set


def probe_set(cfg, rows_per_domain: int):
  """``(tokens (N, T + 1) int32, human domain ids (N,), names)``: the first
  ``rows_per_domain`` validation rows of every human domain (fewer where the
  split has fewer), tokenized and packed as the run's trainer did."""
  from dograph_jax.train.single_run import load_data
  key = (cfg.data.data_dir, cfg.data.domain_field, cfg.data.eval_domains, cfg.data.tokenizer,
         cfg.data.vocab_size, cfg.optim.seq_len, cfg.optim.batch_size, cfg.run.eval_rows,
         rows_per_domain)
  if key not in _PROBES:
    _PROBES[key] = _read_probe(load_data(cfg), rows_per_domain)
  return _PROBES[key]


def _read_probe(data, rows_per_domain: int):
  # The training domains, then any domain only the validation split has
  # (--eval_domains validation: the true sources of a coarse-label corpus),
  # so clusters are compared with the sources the run is judged on.
  names = list(data.names) + [n for n in data.eval_batches if n not in data.names]
  tokens, labels = [], []
  for d, name in enumerate(names):
    rows = [b["tokens"][np.asarray(b["mask"])] for b in data.eval_batches.get(name, [])]
    if not rows:
      continue
    rows = np.concatenate(rows)[:rows_per_domain]
    tokens.append(rows)
    labels.append(np.full(len(rows), d, np.int32))
  return np.concatenate(tokens).astype(np.int32), np.concatenate(labels), names


def make_sketcher(graphdef, cfg):
  """Jitted ``(params, tokens (N, T + 1)) -> (sketches (N, K), losses (N,))``:
  the run's own sketches of the per-sample gradients (the factored engine,
  the run's key and K) and each row's mean token loss."""
  import jax
  import dograph_jax as dg
  from dograph_jax.models import token_losses

  def sequence_losses(model, tokens):
    return token_losses(model(tokens[:, :-1]), tokens[:, 1:]).mean(1)

  @jax.jit
  def sketches(params, tokens):
    out = dg.factored_grads(sequence_losses, graphdef, params, tokens,
                            dg.projection_key(cfg.run.seed), cfg.dograph.resolved_sketch_dim(cfg.sketch),
                            normalize_blocks=cfg.dograph.normalize_blocks)
    return out.sketches, out.losses
  return sketches


def side_clusters(z: np.ndarray, cfg, seed: int) -> np.ndarray:
  """K-means of the probe sketches as DoGraph founds its domains (seeded
  k-means++ then the run's Lloyd iterations, its distance, ``m`` clusters)."""
  import jax
  import dograph_jax as dg
  result = dg.kmeans(jax.numpy.asarray(z), cfg.dograph.num_domains, jax.random.PRNGKey(seed),
                     iters=cfg.dograph.kmeans_iters, distance=cfg.dograph.distance)
  return np.asarray(result.assignments)


def pca_2d(x: np.ndarray) -> np.ndarray:
  """``(N, 2)``: ``x`` centred and projected on its two leading principal
  directions (SVD; each direction's sign fixed so its largest entry is positive)."""
  centred = x - x.mean(0)
  _, _, vt = np.linalg.svd(centred, full_matrices=False)
  vt = vt[:2] * np.sign(vt[:2][np.arange(2), np.abs(vt[:2]).argmax(1)])[:, None]
  return centred @ vt.T


def _unit(z: np.ndarray) -> np.ndarray:
  return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-30)


def source_ratios(ratios_M: np.ndarray, assigned_N: np.ndarray, labels_N: np.ndarray,
                  num_sources: int) -> list[float | None]:
  """Per human domain (source) ``d``: the mean of ``r_{c(i)}`` over its probe
  rows ``i``, where ``c(i)`` is the row's DoGraph domain and ``ratios_M`` the
  frequency-relative ratios ``r`` — how much heavier than in the plain batch
  mean DoGraph would count that source's rows (1: untouched). None for a
  source with no probe rows."""
  return [float(ratios_M[assigned_N[labels_N == d]].mean()) if (labels_N == d).any() else None
          for d in range(num_sources)]


def _ranks(x: np.ndarray) -> np.ndarray:
  """Ranks 0..n-1 of ``x``, ties given their average rank."""
  order = np.argsort(x, kind="stable")
  ranks = np.empty(len(x), float)
  ranks[order] = np.arange(len(x))
  _, inverse = np.unique(x, return_inverse=True)
  sums = np.bincount(inverse, weights=ranks)
  return (sums / np.bincount(inverse))[inverse]


def within_source_tilt(r_N: np.ndarray, losses_N: np.ndarray, labels_N: np.ndarray,
                       num_sources: int) -> dict:
  """Which rows *within* a source DoGraph counts more: per source ``d`` (its
  probe rows ``i``, their ``r_i`` and losses ``l_i``), the tilt
  ``sum_i r_i l_i / sum_i r_i - mean_i l_i`` (> 0: the update leans to the
  source's harder rows), as a fraction of ``mean_i l_i``; the Spearman rank
  correlation of ``r`` (rounded to 1e-4) and ``l``; and the standard
  deviation of ``r``. Each the mean over the sources where it is defined (a
  source with a constant ``r`` or loss has no correlation); None where none
  is."""
  tilt, rho, spread = [], [], []
  for d in range(num_sources):
    r, l = r_N[labels_N == d].astype(float), losses_N[labels_N == d].astype(float)
    if len(r) < 2:
      continue
    tilt.append((np.sum(r * l) / np.sum(r) - l.mean()) / l.mean())
    spread.append(r.std())
    # Ranks of r rounded to 1e-4: r of two clusters can differ by a float32
    # rounding of w / p, which is no ordering.
    r = np.round(r, 4)
    if np.ptp(r) > 0 and np.ptp(l) > 0:
      rho.append(np.corrcoef(_ranks(r), _ranks(l))[0, 1])
  mean = lambda v: float(np.mean(v)) if v else None
  return {"tilt": mean(tilt), "spearman": mean(rho), "r_std": mean(spread)}


def between_share(z_NxK: np.ndarray, assigned_N: np.ndarray) -> float:
  """The share of the sketches' total variance that lies between clusters,
  ``1 - sum_i |z_i - zbar_{c(i)}|^2 / sum_i |z_i - zbar|^2`` (``zbar_c`` the
  mean of the rows assigned to ``c``): how much of the per-sample gradients'
  spread (in sketch space) the clusters account for — what an update that
  gives each cluster its exact share could remove (the between-domain term
  of ``post_stratified_coefficients``). NaN when every row is the same."""
  z = np.asarray(z_NxK, np.float64)
  _, inverse = np.unique(assigned_N, return_inverse=True)
  counts = np.bincount(inverse)
  means = np.stack([np.bincount(inverse, weights=z[:, k]) for k in range(z.shape[1])], 1)
  means /= counts[:, None]
  total = np.sum((z - z.mean(0)) ** 2)
  return float(1.0 - np.sum((z - means[inverse]) ** 2) / total) if total > 0 else math.nan


def run_agreement(run_dir: Path, probe_rows: int, snapshots: bool = True,
                  keep_sketches: bool = False) -> dict:
  """ARI / NMI against the step for one run (see the module docstring), and
  with ``snapshots`` those of the first, middle and last step: the PCA
  coordinates, side clusters and contingency matrix (and with
  ``keep_sketches`` the sketches themselves)."""
  import jax
  from dograph_jax import clustering
  from dograph_jax.train import single_run, training
  from dograph_jax.train.checkpointing import Checkpointer
  from dograph_jax.train import config
  from dograph_jax.transform_stages.coefficients import frequency_ratios

  cfg = config.from_dict(json.loads((run_dir / "config.json").read_text()))
  tokens, labels, names = probe_set(cfg, probe_rows)
  steps = single_run.checkpoint_steps(run_dir)
  if not steps:
    raise FileNotFoundError(f"{run_dir} has no complete checkpoint")
  checkpointer = Checkpointer(run_dir / "checkpoints", async_save=False)
  try:
    vocab_size = checkpointer.restore_meta(steps[-1])["vocab_size"]
  finally:
    checkpointer.close()
  # Step 0 is the initialisation, rebuilt from the run's seed as the trainer built it.
  _, graphdef, init_params = training.build_model(cfg, vocab_size)
  out = {"method": cfg.method, "names": names, "steps": [], "ari": [], "nmi": [],
         "probe_rows": int(len(labels)), "num_domains": cfg.dograph.num_domains}
  if cfg.method == "dograph":
    out.update(ari_own=[], nmi_own=[], ratio_own=[], tilt_own=[])
  sketcher = make_sketcher(graphdef, cfg)
  pick = sorted({0, *steps})
  snap_at = {pick[0], pick[len(pick) // 2], pick[-1]} if snapshots else set()
  out["snapshots"] = {}
  for step in pick:
    params, own, ratios = init_params, None, None  # no centroids before the first step
    if step > 0:
      state, _, _ = single_run.load_run_state(run_dir, step)
      params = state.params
      inner = training.dograph_state(state.opt_state)
      own = None if inner is None else np.asarray(inner.centroids)
      if inner is not None and inner.frequencies is not None:
        # r_j = min(w_j / p_j, max_ratio) of the last update: a row of cluster
        # j counts r_j times as much as in the plain batch mean (persistent mode).
        ratios = np.asarray(frequency_ratios(inner.applied_weights, inner.frequencies,
                                             cfg.dograph.max_ratio))
    z, row_losses = (np.asarray(x) for x in jax.device_get(
        sketcher(params, jax.numpy.asarray(tokens))))
    clusters = side_clusters(z, cfg, cfg.run.seed)
    out["steps"].append(step)
    out["ari"].append(agreement.adjusted_rand_index(labels, clusters))
    out["nmi"].append(agreement.normalized_mutual_info(labels, clusters))
    if "ari_own" in out:
      if own is None:
        out["ari_own"].append(None)
        out["nmi_own"].append(None)
        out["ratio_own"].append(None)
        out["tilt_own"].append(None)
      else:
        assigned = np.asarray(clustering.assign(jax.numpy.asarray(z), jax.numpy.asarray(own),
                                                cfg.dograph.distance)[0])
        out["ari_own"].append(agreement.adjusted_rand_index(labels, assigned))
        out["nmi_own"].append(agreement.normalized_mutual_info(labels, assigned))
        out["ratio_own"].append(None if ratios is None else source_ratios(
            ratios, assigned, labels, len(names)))
        tilt = None if ratios is None else within_source_tilt(ratios[assigned], row_losses,
                                                              labels, len(names))
        if tilt is not None:
          tilt["between"] = between_share(z, assigned)
        out["tilt_own"].append(tilt)
    if step in snap_at:
      snap = {"labels": labels.tolist(), "clusters": clusters.tolist(),
              "pca": pca_2d(_unit(z)).tolist(),
              "contingency": agreement.contingency(labels, clusters, len(names),
                                                   cfg.dograph.num_domains).tolist()}
      if keep_sketches:
        snap["sketches"] = z.tolist()
        snap["losses"] = row_losses.tolist()
      out["snapshots"][str(step)] = snap
  online = [r for r in read_metrics(run_dir) if "ari" in r]
  out["online"] = {"steps": [r["step"] for r in online], "ari": [r["ari"] for r in online],
                   "nmi": [r["nmi"] for r in online]}
  return out


def domains(runs_dir: Path, labels: Sequence[str], probe_rows: int,
            keep_sketches: bool = False) -> dict:
  found = find_runs(runs_dir)
  result = {}
  for corpus, by_label in found.items():
    result[corpus] = {}
    for label in labels:
      if label not in by_label:
        log.warning("%s: no finished %r runs; left out", corpus, label)
        continue
      result[corpus][label] = {
          str(seed): run_agreement(run, probe_rows, keep_sketches=keep_sketches)
          for seed, run in sorted(by_label[label].items())}
  return {"corpora": result, "probe_rows_per_domain": probe_rows}


def _curve(seeds: dict, key: str, online: bool = False):
  """Steps present (and not None) in every seed and the mean / std of ``key``
  there; ``online``: from the trainer's logged curve instead of the probe's."""
  series = []
  for run in seeds.values():
    source = run["online"] if online else run
    series.append(dict(zip(source["steps"], source[key])))
  steps = [s for s in sorted(set.intersection(*(set(x) for x in series)))
           if all(x[s] is not None for x in series)]
  if not steps:
    return [], np.zeros(0), np.zeros(0)
  values = np.asarray([[x[s] for s in steps] for x in series], float)
  return steps, values.mean(0), values.std(0)


def _ratio_table(by_label: dict) -> list[str]:
  """Markdown: per DoGraph run and checkpoint, each source's up-weighting
  (``ratio_own``), mean ± std over seeds, and the largest ``|r - 1|`` of
  the means."""
  out = []
  for label, seeds in by_label.items():
    runs = [r for r in seeds.values() if any(x is not None for x in r.get("ratio_own", []))]
    if not runs:
      continue
    names = runs[0]["names"]
    if not out:
      out = ["Up-weighting by source: the mean over a source's probe rows of `r = min(w / p, "
             "max_ratio)` of the DoGraph domain (own centroid) each falls in — how much "
             "heavier than in the plain batch mean the checkpoint's last update counted such "
             "rows (1: untouched). Mean ± std over seeds.", ""]
    out += [f"| {label} step | " + " | ".join(names) + " | max \\|r − 1\\| |",
            "|---" * (len(names) + 2) + "|"]
    for k, step in enumerate(runs[0]["steps"]):
      values = [r["ratio_own"][k] for r in runs]
      if any(v is None for v in values):
        continue
      # A source without probe rows has None: a dash, left out of the max.
      values = np.asarray([[np.nan if x is None else x for x in v] for v in values], float)
      mean, std = values.mean(0), values.std(0)
      out.append(f"| {step} | " + " | ".join("—" if np.isnan(m) else _pm(m, sd)
                                             for m, sd in zip(mean, std))
                 + f" | {np.nanmax(np.abs(mean - 1)):.3f} |")
    out.append("")
  return out


def _tilt_table(by_label: dict) -> list[str]:
  """Markdown: per DoGraph run and checkpoint, which rows within a source its
  update leans to (``tilt_own``), mean ± std over seeds."""
  out = []
  for label, seeds in by_label.items():
    runs = [r for r in seeds.values() if any(x is not None for x in r.get("tilt_own", []))]
    if not runs:
      continue
    if not out:
      out = ["Within a source: the tilt `sum_i r_i l_i / sum_i r_i − mean_i l_i` of a "
             "source's probe rows (`r_i` as above, `l_i` the row's loss under the "
             "checkpoint's parameters; > 0: the update leans to the source's harder rows), "
             "in % of the source's mean loss; the Spearman correlation of `r` and `l`; the "
             "std of `r` within a source. Each averaged over the sources, then mean ± std "
             "over seeds. Between %: the share of the probe sketches' variance that lies "
             "between DoGraph's clusters, `1 − within SS / total SS` (what giving each "
             "cluster its exact share of the update could remove).", ""]
    out += [f"| {label} step | tilt % | Spearman(r, loss) | std of r | between % |",
            "|---|---|---|---|---|"]
    for k, step in enumerate(runs[0]["steps"]):
      cells = [r["tilt_own"][k] for r in runs]
      if any(c is None for c in cells):
        continue
      row = []
      for key, scale in (("tilt", 100.0), ("spearman", 1.0), ("r_std", 1.0),
                         ("between", 100.0)):
        values = [c.get(key) for c in cells if c.get(key) is not None]
        row.append(_pm(*_mean_std(np.asarray(values) * scale)) if values else "—")
      out.append(f"| {step} | " + " | ".join(row) + " |")
    out.append("")
  return out


def write_domains(data: dict, out: Path, command: str, dograph: Sequence[str],
                  uniform: str) -> None:
  plt = _plt()
  out.mkdir(parents=True, exist_ok=True)
  corpora = data["corpora"]
  body = [f"Probe: the first {data['probe_rows_per_domain']} validation rows of every human "
          "domain. *side*: K-means of the probe sketches under each checkpoint's parameters "
          "(the update untouched); *own*: the probe rows assigned to DoGraph's persistent "
          "centroids; *online*: what the trainer logged on its training batches. "
          "Mean ± std over seeds.", ""]
  fig, axes = plt.subplots(2, len(corpora), figsize=(6 * len(corpora), 7), squeeze=False)
  for j, (corpus, by_label) in enumerate(corpora.items()):
    body += [f"### {corpus}", "", "| run | clusters | measure | " + " | ".join(
        ["init", "mid", "end"]) + " |", "|---|---|---|---|---|---|"]
    for i, measure in enumerate(("ari", "nmi")):
      ax = axes[i, j]
      curves = []
      for label, seeds in by_label.items():
        curves.append((label, "side", *_curve(seeds, measure)))
        if label in dograph:
          curves.append((label, "own", *_curve(seeds, f"{measure}_own")))
          curves.append((label, "online", *_curve(seeds, measure, online=True)))
      for label, kind, steps, mean, std in curves:
        if not steps:
          continue
        line, = ax.plot(steps, mean, marker="o" if kind != "online" else None, ms=3,
                        label=f"{label} ({kind})", ls="--" if kind == "online" else "-")
        ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        idx = [0, len(steps) // 2, len(steps) - 1]
        body.append(f"| {label} | {kind} | {measure.upper()} | " + " | ".join(
            f"{_pm(mean[k], std[k])} (step {steps[k]})" for k in idx) + " |")
      ax.set(xlabel="step", ylabel=f"{measure.upper()} (clusters vs human domains)",
             title=f"{corpus}: {measure.upper()}")
      ax.legend(fontsize=7)
    body.append("")
    body += _ratio_table(by_label)
    body += _tilt_table(by_label)
  fig.tight_layout()
  fig.savefig(out / "agreement.png", dpi=120)
  plt.close(fig)

  for corpus, by_label in corpora.items():
    shown = [l for l in (uniform, *dograph) if l in by_label]
    if not shown:
      continue
    first = {l: by_label[l][min(by_label[l], key=int)] for l in shown}
    names = next(iter(first.values()))["names"]
    for kind in ("pca", "contingency"):
      cols = max(len(r["snapshots"]) for r in first.values())
      fig, axes = plt.subplots(len(shown), cols, figsize=(4.2 * cols, 3.8 * len(shown)),
                               squeeze=False)
      for i, label in enumerate(shown):
        for k, (step, snap) in enumerate(sorted(first[label]["snapshots"].items(),
                                                key=lambda kv: int(kv[0]))):
          ax = axes[i, k]
          if kind == "pca":
            xy, lab = np.asarray(snap["pca"]), np.asarray(snap["labels"])
            for d, name in enumerate(names):
              if (lab == d).any():
                ax.scatter(*xy[lab == d].T, s=8, label=name)
            ax.set(title=f"{label}, step {step}", xticks=[], yticks=[])
            if k == 0:
              ax.legend(fontsize=6, markerscale=1.5)
          else:
            table = np.asarray(snap["contingency"], float)
            share = table / np.maximum(table.sum(1, keepdims=True), 1)
            ax.imshow(share, cmap="viridis", vmin=0, vmax=1, aspect="auto")
            ax.set_yticks(range(len(names)), names if k == 0 else [""] * len(names),
                          fontsize=7)
            ax.set(title=f"{label}, step {step}", xlabel="side cluster")
      fig.suptitle(f"{corpus}: " + ("PCA of unit-normalised probe sketches, by human domain"
                                    if kind == "pca" else
                                    "share of each human domain's probe rows per cluster"))
      fig.tight_layout()
      fig.savefig(out / f"{kind}_{corpus}.png", dpi=110)
      plt.close(fig)
  _write(out, command, "Model-centric vs human domains over training", body, data)


# ---------------------------------------------------------------------------
# 4. Weights over training.

def effective_share(records: list[dict], names: Sequence[str], first_step: int) -> dict:
  """Mean over the logged records with ``step > first_step`` of each human
  domain's ``update_share`` (the sum of its samples' ``a_i`` in the batch; 0
  for a domain absent from a logged batch)."""
  window = [r for r in records if "update_share" in r and r["step"] > first_step]
  if not window:
    raise ValueError("no logged update_share in the window (is this a DoGraph run?)")
  return {n: float(np.mean([r["update_share"].get(n, 0.0) for r in window])) for n in names}


def weights(runs_dir: Path, dograph: str, uniform: str, stratified: str, window: int) -> dict:
  found = find_runs(runs_dir)
  result = {}
  for corpus, by_label in found.items():
    if dograph not in by_label:
      log.warning("%s: no finished %r runs; left out", corpus, dograph)
      continue

    def proportions(label):
      if label not in by_label:
        return None
      summary = json.loads((by_label[label][min(by_label[label])] / "summary.json").read_text())
      return summary.get("mixture") or summary.get("proportions")

    seeds = {}
    for seed, run in sorted(by_label[dograph].items()):
      records = read_metrics(run)
      summary = json.loads((run / "summary.json").read_text())
      names = list(summary.get("proportions") or summary["val_loss"])  # every human domain
      last = max(r["step"] for r in records)
      weighted = [r for r in records if "weights" in r]
      seeds[str(seed)] = {
          "names": names,
          "window": effective_share(records, names, last - window),
          "whole_run": effective_share(records, names, 0),
          "steps": [r["step"] for r in weighted],
          "weights": [r["weights"] for r in weighted],
          "update_share": [[r.get("update_share", {}).get(n, 0.0) for n in names]
                           for r in weighted]}
    result[corpus] = {"seeds": seeds, "natural": proportions(uniform),
                      "stratified": proportions(stratified)}
  return {"corpora": result, "window": window}


def write_weights(data: dict, out: Path, command: str) -> None:
  plt = _plt()
  out.mkdir(parents=True, exist_ok=True)
  body = [f"Effective share: per human domain the sum of DoGraph's per-sample coefficients "
          f"`a_i` over its samples in a batch (these sum to 1 over the batch), averaged over "
          f"the logged steps of the last {data['window']} steps (and over the whole run); "
          "mean ± std over seeds. Natural: the sampling proportions of the Uniform run "
          "(what every batch is drawn from, DoGraph's included); Stratified: its proportions.",
          ""]
  corpora = data["corpora"]
  fig, axes = plt.subplots(2, len(corpora), figsize=(6.5 * len(corpora), 8), squeeze=False)
  for j, (corpus, r) in enumerate(corpora.items()):
    seeds = r["seeds"]
    names = next(iter(seeds.values()))["names"]
    body += [f"### {corpus}", "", "| human domain | natural | stratified | DoGraph, last window "
             "| DoGraph, whole run | window / natural |", "|---|---|---|---|---|---|"]
    for n in names:
      w = _mean_std(s["window"][n] for s in seeds.values())
      whole = _mean_std(s["whole_run"][n] for s in seeds.values())
      nat = (r["natural"] or {}).get(n)
      strat = (r["stratified"] or {}).get(n)
      body.append(f"| {n} | {nat:.3f} | " if nat is not None else f"| {n} | — | ")
      body[-1] += (f"{strat:.3f} | " if strat is not None else "— | ") + (
          f"{_pm(*w)} | {_pm(*whole)} | " + (f"{w[0] / nat:.2f} |" if nat else "— |"))
    body.append("")
    first = seeds[min(seeds, key=int)]
    steps = first["steps"]
    ax = axes[0, j]
    w = np.asarray(first["weights"]).T
    colors = plt.get_cmap("tab20")(np.arange(len(w)) % 20)  # m may exceed tab10's 10
    ax.stackplot(steps, w, labels=[f"domain {k}" for k in range(len(w))], colors=colors)
    ax.set(xlabel="step", ylabel="weight", ylim=(0, 1),
           title=f"{corpus}: DoGraph weights of its model-centric domains (seed "
                 f"{min(seeds, key=int)})")
    ax.legend(fontsize=6, ncol=3, loc="upper right")
    ax = axes[1, j]
    share = np.asarray(first["update_share"]).T
    ax.stackplot(steps, share, labels=names)
    if r["natural"]:
      cum = np.cumsum([r["natural"][n] for n in names])
      for c in cum[:-1]:
        ax.axhline(c, color="k", lw=0.6, ls="--")
    ax.set(xlabel="step", ylabel="share of the update (sum of a_i)", ylim=(0, 1),
           title=f"{corpus}: effective share per human domain (dashed: natural)")
    ax.legend(fontsize=6, ncol=2, loc="upper right")
  fig.tight_layout()
  fig.savefig(out / "weights.png", dpi=120)
  plt.close(fig)
  _write(out, command, "DoGraph's weights over training and the share they give each human "
         "domain", body, data)


# ---------------------------------------------------------------------------
# 5. Cost.

def steady_steps_per_s(records: list[dict]) -> float | None:
  """Steps per second between the first and the last logged record (their
  ``elapsed_s``): the training loop without the first step's compilation
  (the checkpoint saves and evaluations in between included); of a resumed
  run, its last session. ``None`` for a run logged before records had
  ``elapsed_s``, or with fewer than two."""
  timed = [r for r in records if "elapsed_s" in r]
  # A resumed run restarts the clock: keep its last session's records.
  for k in range(len(timed) - 1, 0, -1):
    if timed[k]["elapsed_s"] <= timed[k - 1]["elapsed_s"]:
      timed = timed[k:]
      break
  if len(timed) < 2 or timed[-1]["elapsed_s"] <= timed[0]["elapsed_s"]:
    return None
  return (timed[-1]["step"] - timed[0]["step"]) / (timed[-1]["elapsed_s"] - timed[0]["elapsed_s"])


def cost(runs_dir: Path, dograph: str, uniform: str, bench: dict | None) -> dict:
  found = find_runs(runs_dir)
  rows = {}
  for corpus, by_label in found.items():
    if dograph not in by_label or uniform not in by_label:
      continue
    seeds = sorted(set(by_label[dograph]) & set(by_label[uniform]))
    read = lambda label, s: json.loads((by_label[label][s] / "summary.json").read_text())
    pairs = [(read(dograph, s), read(uniform, s)) for s in seeds]
    steady = [(steady_steps_per_s(read_metrics(by_label[dograph][s])),
               steady_steps_per_s(read_metrics(by_label[uniform][s]))) for s in seeds]
    rows[corpus] = {
        "seeds": seeds,
        "steady_step_ratio": (_mean_std(u / d for d, u in steady)
                              if all(d and u for d, u in steady) else None),
        "dograph_steps_per_s": _mean_std(d["steps_per_s"] for d, _ in pairs),
        "uniform_steps_per_s": _mean_std(u["steps_per_s"] for _, u in pairs),
        # step-time ratio: uniform's steps/s over DoGraph's (time per step, paired)
        "step_ratio": _mean_std(u["steps_per_s"] / d["steps_per_s"] for d, u in pairs),
        "wall_ratio": _mean_std(d["wall_s"] / u["wall_s"] for d, u in pairs)}
  out = {"runs": rows}
  if bench:
    out["bench"] = {"command": bench["command"], "date": bench.get("date"),
                    "device_kind": bench.get("device_kind"), "setting": bench["setting"],
                    "candidates": {n: {k: c.get(k) for k in ("median_s", "min_s",
                                                             "ratio_vs_plain", "compile_s")}
                                   for n, c in bench["candidates"].items()}}
  return out


def write_cost(data: dict, out: Path, command: str) -> None:
  body = ["From the runs (paired by seed; steps/s: the steps over the seconds of the "
          "training loop, which include the first step's compilation and the loop's "
          "evaluations and checkpoint saves; wall-clock: the whole run, data loading "
          "included):", "",
          "| corpus | seeds | DoGraph steps/s | Uniform steps/s | step time DoGraph / Uniform "
          "| same, after the first logged step | wall-clock DoGraph / Uniform |",
          "|---|---|---|---|---|---|---|"]
  for corpus, r in data["runs"].items():
    steady = _pm(*r["steady_step_ratio"]) if r.get("steady_step_ratio") else "not logged"
    body.append(f"| {corpus} | {len(r['seeds'])} | {_pm(*r['dograph_steps_per_s'], 2)} | "
                f"{_pm(*r['uniform_steps_per_s'], 2)} | {_pm(*r['step_ratio'])} | {steady} | "
                f"{_pm(*r['wall_ratio'])} |")
  if "bench" in data:
    b = data["bench"]
    body += ["", f"From `{b['command']}` ({b['date']}, {b['device_kind']}; "
             f"{b['setting']}):", "", "| candidate | median ms | min ms | vs plain | compile s |",
             "|---|---|---|---|---|"]
    for name, c in b["candidates"].items():
      if c["median_s"] is None:
        body.append(f"| {name} | not run | — | — | — |")
        continue
      body.append(f"| {name} | {c['median_s'] * 1e3:.2f} | {c['min_s'] * 1e3:.2f} | "
                  f"{c['ratio_vs_plain']:.3f}x | "
                  + (f"{c['compile_s']:.1f} |" if c.get("compile_s") is not None else "— |"))
  _write(out, command, "Cost of DoGraph against Uniform", body, data)


# ---------------------------------------------------------------------------
# 6. Dynamics: why the gain over Uniform fades.

def eval_ppl(records: list[dict]) -> dict[int, float]:
  """``{step: exp(mean_d val_loss_d)}`` of a run's evaluation records (the
  average validation PPL of ``summary.json``). A resumed run may log a step
  twice; its later record (the session that went on) wins."""
  return {int(r["step"]): math.exp(float(np.mean(list(r["val_loss"].values()))))
          for r in records if r.get("val_loss")}


def weight_stats(weights_M, frequencies_M, sizes_M, max_ratio: float,
                 sample: bool = False, sampling_ratio: dict | None = None) -> dict:
  """What DoGraph's weights do at one logged step (definitions in the module
  docstring): ``departure`` (frequency-weighted mean ``|w_k / p_k - 1|``),
  ``max_ratio`` (``max_k w_k / p_k``, uncapped), ``alive`` (clusters with
  ``p_k >= 1 / (4 M)``), ``ess_fraction`` (``ESS / B`` of the coefficients
  ``a_i ∝ min(w_k / p_k, max_ratio)``; 1 in the sample form, whose update is
  the plain mean) and, given ``sampling_ratio``, ``sampling_spread`` (max /
  min over its groups)."""
  w = np.asarray(weights_M, float)
  p = np.asarray(frequencies_M, float)
  n = np.asarray(sizes_M, float)
  seen = p > 0
  ratio = np.where(seen, w / np.where(seen, p, 1.0), 0.0)
  out = {"departure": float(np.sum(p[seen] * np.abs(ratio[seen] - 1.0))),
         "max_ratio": float(ratio[seen].max()) if seen.any() else math.nan,
         "alive": int(np.sum(p >= 1.0 / (4 * len(p))))}
  r = np.minimum(ratio, max_ratio)  # 0 where p_k = 0, as the trainer's coefficients
  batch, s1, s2 = n.sum(), np.sum(n * r), np.sum(n * r * r)
  if sample:
    out["ess_fraction"] = 1.0
  elif batch <= 0:
    out["ess_fraction"] = math.nan
  else:
    # Every ratio 0: the trainer falls back to the plain mean (ESS = B).
    out["ess_fraction"] = float(s1 * s1 / s2 / batch) if s1 > 0 else 1.0
  if sampling_ratio:
    v = np.asarray(list(sampling_ratio.values()), float)
    out["sampling_spread"] = float(v.max() / v.min()) if v.min() > 0 else math.inf
  return out


def window_weight_stats(records: list[dict], step: int, window: int, max_ratio: float,
                        sample: bool) -> dict:
  """:func:`weight_stats` averaged over the training records with a step in
  ``(step - window, step]`` that log ``weights``, ``frequencies`` and
  ``cluster_sizes``; ``records``: how many (0: every statistic ``None``)."""
  picked = [r for r in records if step - window < r["step"] <= step
            and all(k in r for k in ("weights", "frequencies", "cluster_sizes"))]
  stats = [weight_stats(r["weights"], r["frequencies"], r["cluster_sizes"], max_ratio, sample,
                        r.get("sampling_ratio")) for r in picked]
  keys = ["departure", "max_ratio", "alive", "ess_fraction"] + (
      ["sampling_spread"] if any("sampling_spread" in s for s in stats) else [])
  out = {"records": len(picked)}
  for k in keys:
    v = [s[k] for s in stats if k in s]
    out[k] = float(np.mean(v)) if v else None
  return out


def train_losses(records: list[dict]) -> dict[int, float]:
  """``{step: loss}`` of a run's training records (the batch's plain mean
  loss). A resumed run may log a step twice; its later record wins."""
  return {int(r["step"]): float(r["loss"]) for r in records if r.get("loss") is not None}


def window_loss_gap(label: dict[int, float], reference: dict[int, float], step: int,
                    window: int) -> tuple[float | None, int]:
  """Mean of ``label[t] - reference[t]`` over the steps ``t`` in ``(step -
  window, step]`` that both logged, and how many (``None, 0`` if none)."""
  shared = [t for t in label if step - window < t <= step and t in reference]
  if not shared:
    return None, 0
  return float(np.mean([label[t] - reference[t] for t in shared])), len(shared)


def _seed_mean_std(values) -> list | None:
  """``[mean, std]`` over the seeds that have a value; ``None`` if none."""
  v = [x for x in values if x is not None and not math.isnan(x)]
  return list(_mean_std(v)) if v else None


def _config(run: Path) -> dict:
  return json.loads((run / "config.json").read_text())


def dynamics(runs_dir: Path, uniform: str, dograph: Sequence[str], at: Sequence[int],
             window: int) -> dict:
  found = find_runs(runs_dir)
  result = {}
  for corpus, by_label in found.items():
    present = []
    for label in dograph:
      if label in by_label:
        present.append(label)
      else:
        log.warning("%s: no finished %r runs; left out", corpus, label)
    if uniform not in by_label or not present:
      log.warning("%s: needs finished %r runs and one of %s; corpus left out", corpus,
                  uniform, ", ".join(map(repr, dograph)))
      continue
    records = {label: {seed: read_metrics(run) for seed, run in sorted(by_label[label].items())}
               for label in [uniform, *present]}
    ppl = {label: {seed: eval_ppl(r) for seed, r in seeds.items()}
           for label, seeds in records.items()}
    curves = {}
    for label, seeds in ppl.items():
      # Steps every seed of the label evaluated at, so each mean is over the same seeds.
      steps = sorted(set.intersection(*(set(s) for s in seeds.values())))
      values = np.asarray([[seeds[s][t] for t in steps] for s in seeds], float)
      curves[label] = {"seeds": sorted(seeds), "steps": steps,
                       "mean": values.mean(0).tolist(), "std": values.std(0).tolist(),
                       "per_seed": {str(s): [seeds[s][t] for t in steps] for s in seeds}}
    paired = {}
    for label in present:
      seeds = sorted(set(ppl[label]) & set(ppl[uniform]))
      if not seeds:
        log.warning("%s: %r and %r share no seed; no paired difference", corpus, label, uniform)
        continue
      steps = sorted(set.intersection(*(set(ppl[label][s]) & set(ppl[uniform][s])
                                        for s in seeds)))
      diff = np.asarray([[ppl[label][s][t] - ppl[uniform][s][t] for t in steps] for s in seeds])
      ratio = np.asarray([[ppl[label][s][t] / ppl[uniform][s][t] for t in steps] for s in seeds])
      paired[label] = {"seeds": seeds, "steps": steps,
                       "diff_mean": diff.mean(0).tolist(), "diff_std": diff.std(0).tolist(),
                       "better": (diff < 0).sum(0).tolist(),
                       "ratio_mean": ratio.mean(0).tolist(), "ratio_std": ratio.std(0).tolist()}
    train = {}
    for label in present:
      seeds = sorted(set(records[label]) & set(records[uniform]))
      if not seeds:
        continue
      ours = {s: train_losses(records[label][s]) for s in seeds}
      ref = {s: train_losses(records[uniform][s]) for s in seeds}
      by_step = {}
      for t in at:
        gaps = [window_loss_gap(ours[s], ref[s], t, window) for s in seeds]
        values = [g for g, _ in gaps if g is not None]
        by_step[str(t)] = {"diff": _seed_mean_std(values),
                           "better": int(sum(v < 0 for v in values)), "seeds": len(values),
                           "records": [n for _, n in gaps]}
      # The sample form draws its own batches: its Δ mixes the optimizer with the data.
      own = any(_config(by_label[label][s]).get("apply_weights") == "sample" for s in seeds)
      train[label] = {"seeds": seeds, "at": by_step, "own_batches": own}
    weight = {}
    for label in present:
      per_seed = {}
      for seed, run in sorted(by_label[label].items()):
        cfg = _config(run)
        opts = cfg.get("dograph", {})
        sample = cfg.get("apply_weights") == "sample"
        cap = math.inf if opts.get("max_ratio") is None else float(opts["max_ratio"])
        per_seed[str(seed)] = {
            "apply_weights": cfg.get("apply_weights"), "max_ratio": opts.get("max_ratio"),
            "num_domains": opts.get("num_domains"),
            "batch_size": cfg.get("optim", {}).get("batch_size"),
            "at": {str(s): window_weight_stats(records[label][seed], s, window,
                                               cap, sample)
                   for s in at}}
      summary = {}
      for s in at:
        stats = [v["at"][str(s)] for v in per_seed.values()]
        keys = list(dict.fromkeys(k for x in stats for k in x if k != "records"))
        summary[str(s)] = {k: _seed_mean_std(x.get(k) for x in stats) for k in keys}
        summary[str(s)]["records"] = [x["records"] for x in stats]
      first = next(iter(per_seed.values()))
      weight[label] = {"apply_weights": first["apply_weights"],
                       "max_ratio": first["max_ratio"], "num_domains": first["num_domains"],
                       "at": summary, "per_seed": per_seed}
    result[corpus] = {"curves": curves, "paired": paired, "train_loss": train,
                      "weights": weight}
  if not result:
    raise FileNotFoundError(f"{runs_dir}: no corpus has finished {uniform!r} runs and "
                            f"finished runs of one of {', '.join(map(repr, dograph))}")
  return {"corpora": result, "uniform": uniform, "dograph": list(dograph), "at": list(at),
          "window": window}


def _cell(x: list | None, digits: int = 3) -> str:
  return _pm(*x, digits) if x else "—"


def write_dynamics(data: dict, out: Path, command: str) -> None:
  plt = _plt()
  out.mkdir(parents=True, exist_ok=True)
  uniform, at, window = data["uniform"], data["at"], data["window"]
  body = ["PPL: the average validation PPL `exp(mean_d val_loss_d)` at each evaluation step, "
          "mean ± std over seeds; Δ: DoGraph − Uniform paired by seed, mean ± std (seeds "
          "where DoGraph is lower / seeds); ratio: DoGraph / Uniform, paired.", "",
          f"Weights: averaged over the training records in `(s - {window}, s]`, then mean ± "
          "std over seeds. departure = `sum_k p_k |w_k/p_k - 1|` (w: applied weights, p: "
          "running frequencies, clusters with p_k > 0); max w/p uncapped; alive = clusters "
          "with `p_k >= 1/(4M)`; ESS/B of the coefficients `a_i ∝ min(w_k/p_k, max_ratio)` "
          "over the batch's cluster sizes n_k (1 for the sample form, whose update is the "
          "plain mean); sampling spread = max/min of the groups' `sampling_ratio` (sample "
          "form).", ""]
  corpora = data["corpora"]
  for corpus, r in corpora.items():
    curves, paired = r["curves"], r["paired"]
    labels = [uniform, *[l for l in data["dograph"] if l in curves]]
    body += [f"### {corpus}", "", "Where the gap opens and closes:", ""]
    # The seed counts in the header: a label's PPL is over its finished seeds, a
    # paired column only over the seeds both labels have finished.
    head = ["step"] + [f"{l} PPL ({len(curves[l]['seeds'])} seeds)" for l in labels]
    for l in labels[1:]:
      if l in paired:
        n = len(paired[l]["seeds"])
        head += [f"Δ {l} − {uniform} ({n} seeds)", f"{l} / {uniform}"]
    body += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    steps = sorted({t for c in curves.values() for t in c["steps"]})
    for t in steps:
      row = [str(t)]
      for l in labels:
        c = curves[l]
        row.append(_pm(c["mean"][c["steps"].index(t)], c["std"][c["steps"].index(t)], 2)
                   if t in c["steps"] else "—")
      for l in labels[1:]:
        if l not in paired:
          continue
        p = paired[l]
        if t not in p["steps"]:
          row += ["—", "—"]
          continue
        k = p["steps"].index(t)
        row += [f"{p['diff_mean'][k]:+.2f} ± {p['diff_std'][k]:.2f} "
                f"({p['better'][k]}/{len(p['seeds'])})",
                _pm(p["ratio_mean"][k], p["ratio_std"][k], 3)]
      body.append("| " + " | ".join(row) + " |")
    for l, p in paired.items():
      if p["steps"]:
        k = int(np.argmin(p["diff_mean"]))
        body.append(f"\n{l}: largest mean gain {p['diff_mean'][k]:+.2f} PPL at step "
                    f"{p['steps'][k]}; at step {p['steps'][-1]}: {p['diff_mean'][-1]:+.2f} "
                    f"({p['better'][-1]}/{len(p['seeds'])} seeds better).")
    body.append("")
    if r.get("train_loss"):
      body += [f"Training loss against {uniform}'s at the same steps (Δ of the logged batch "
               f"loss, averaged over the steps in `(s - {window}, s]` both logged, then mean ± "
               "std over seeds; seeds lower / seeds):", "",
               "| label | " + " | ".join(f"step {s}" for s in at) + " |",
               "|---|" + "---|" * len(at)]
      for l, tr in r["train_loss"].items():
        cells = []
        for s in at:
          x = tr["at"][str(s)]
          cells.append(f"{_pm(*x['diff'], 4)} ({x['better']}/{x['seeds']})" if x["diff"]
                       else "—")
        name = f"{l} (its own batches: sampled)" if tr["own_batches"] else l
        body.append(f"| {name} | " + " | ".join(cells) + " |")
      body.append("")
    for l, w in r["weights"].items():
      body += [f"What {l}'s weights do (apply_weights = {w['apply_weights']}, max_ratio = "
               f"{w['max_ratio']}, M = {w['num_domains']}):", "",
               "| quantity | " + " | ".join(f"step {s}" for s in at) + " |",
               "|---|" + "---|" * len(at)]
      names = {"departure": "departure Σ p\\|w/p − 1\\|", "max_ratio": "max w/p",
               "alive": f"clusters alive (of {w['num_domains']})", "ess_fraction": "ESS/B",
               "sampling_spread": "sampling_ratio max/min"}
      for k, name in names.items():
        if any(k in w["at"][str(s)] for s in at):
          body.append(f"| {name} | " + " | ".join(_cell(w["at"][str(s)].get(k))
                                                  for s in at) + " |")
      body.append("| training records per seed | " + " | ".join(
          ", ".join(map(str, w["at"][str(s)]["records"])) for s in at) + " |")
      body.append("")
  # One row per corpus, its two panels side by side.
  fig, axes = plt.subplots(len(corpora), 2, figsize=(12, 4.2 * len(corpora)), squeeze=False)
  for j, (corpus, r) in enumerate(corpora.items()):
    ax = axes[j, 0]
    for l, p in r["paired"].items():
      mean, std = np.asarray(p["ratio_mean"]), np.asarray(p["ratio_std"])
      line, = ax.plot(p["steps"], mean, marker="o", ms=3, label=f"{l} / {uniform}")
      ax.fill_between(p["steps"], mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.axhline(1.0, color="0.5", lw=0.8, ls="--")
    ax.set(xlabel="step", ylabel=f"val PPL ratio to {uniform} (paired, mean ± std)",
           title=f"{corpus}: where the gap opens and closes")
    ax.legend(fontsize=8)
    ax = axes[j, 1]
    for l, c in r["curves"].items():
      mean, std = np.asarray(c["mean"]), np.asarray(c["std"])
      line, = ax.plot(c["steps"], mean, marker="o", ms=3, label=f"{l} ({len(c['seeds'])} seeds)")
      ax.fill_between(c["steps"], mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="average val PPL (mean ± std over seeds)",
           title=f"{corpus}: validation PPL")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out / "gap.png", dpi=120)
  plt.close(fig)
  _write(out, command, "Dynamics: why DoGraph's gain over Uniform fades", body, data)


# ---------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                      datefmt="%H:%M:%S", force=True)
  for noisy in ("absl", "orbax", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split("\n\n", 1)[1])
  sub = parser.add_subparsers(dest="analysis", required=True)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--out", required=True, help="results directory to write")
  runs = argparse.ArgumentParser(add_help=False)
  runs.add_argument("--runs", required=True, help="RUNS/<corpus>/<label>/seed<k> (ablate.py)")
  runs.add_argument("--dograph", default="dograph",
                    help="label of the DoGraph runs (domains, dynamics: comma-separated labels)")
  runs.add_argument("--uniform", default="uniform", help="label of the Uniform runs")
  runs.add_argument("--stratified", default="stratified", help="label of the Stratified runs")
  p = sub.add_parser("objectives", parents=[common])
  p.add_argument("--study", required=True, help="study.json of ablate.py")
  p.add_argument("--bench", default="", help="benchmarks/bench_core.py --json output")
  p = sub.add_parser("granularity", parents=[common])
  p.add_argument("--study", required=True)
  p = sub.add_parser("domains", parents=[common, runs])
  p.add_argument("--probe_rows", type=int, default=32, help="validation rows per human domain")
  p.add_argument("--keep_sketches", action="store_true",
                 help="also store the snapshots' probe sketches in analysis.json (large)")
  p = sub.add_parser("weights", parents=[common, runs])
  p.add_argument("--window", type=int, default=200, help="last steps averaged")
  p = sub.add_parser("cost", parents=[common, runs])
  p.add_argument("--bench", default="", help="benchmarks/bench_step.py --json output")
  p = sub.add_parser("dynamics", parents=[common, runs])
  p.add_argument("--at", default="400,1000",
                 help="comma-separated steps at which the weights are summarised")
  p.add_argument("--window", type=int, default=100,
                 help="the weights at step s: training records in (s - window, s]")
  args = parser.parse_args(argv)
  out = Path(args.out)
  command = "python experiments/analyses.py " + " ".join(shlex.quote(a) for a in argv)
  bench = json.loads(Path(args.bench).read_text()) if getattr(args, "bench", "") else None
  if args.analysis == "objectives":
    write_objectives(objectives(read_study(args.study), bench), out, command)
  elif args.analysis == "granularity":
    write_granularity(granularity(read_study(args.study)), out, command)
  elif args.analysis == "domains":
    if args.probe_rows < 2:
      parser.error("--probe_rows must be at least 2")
    dograph = [x for x in args.dograph.split(",") if x]
    write_domains(domains(Path(args.runs), [args.uniform, *dograph], args.probe_rows,
                          args.keep_sketches), out, command, dograph, args.uniform)
  elif args.analysis == "weights":
    write_weights(weights(Path(args.runs), args.dograph, args.uniform, args.stratified,
                          args.window), out, command)
  elif args.analysis == "dynamics":
    try:
      at = [int(x) for x in args.at.split(",") if x.strip()]
    except ValueError:
      parser.error(f"--at {args.at!r}: comma-separated steps")
    if not at or min(at) < 1 or args.window < 1:
      parser.error("--at needs steps >= 1 and --window must be at least 1")
    labels = [x for x in args.dograph.split(",") if x]
    write_dynamics(dynamics(Path(args.runs), args.uniform, labels, at, args.window), out,
                   command)
  else:
    write_cost(cost(Path(args.runs), args.dograph, args.uniform, bench), out, command)
  print((out / "table.md").read_text())
  return 0


if __name__ == "__main__":
  sys.exit(main())
