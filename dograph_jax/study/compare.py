"""Run data-mixing methods side by side and tabulate them like the paper's Table 2.

    python experiments/compare.py                                  # all methods, 3 seeds, defaults
    python experiments/compare.py --methods uniform,doremi,dograph --seeds 0,1 \\
        --data_dir data/local --steps 500 --out_dir runs/compare

Every method trains the same model on the same corpus for the same number of
steps and batch (equal token budget for the final model); offline methods'
proxy and reference runs come on top and count in their wall-clock cost.
Any ``pretrain.py`` option (``--model``, ``--steps``, ``--batch_size``, ...)
is shared by all runs; ``--method_args`` is not: each method keeps its
defaults unless ``--args METHOD:name=value,...`` sets them (e.g. a burn-in
scaled to a short budget).

Resumable: each (method, seed) run lives in ``out_dir/<method>/seed<k>``; a
finished run (its ``summary.json``) is read back, an unfinished one resumes
from its last checkpoint, and a run that crashes is logged and recorded in
``failures.json`` while the others go on — rerun the same command to retry it.

Writes ``compare.md`` (the table), ``compare.json`` (every run's summary and
the aggregates), ``per_domain_ppl.png`` (per-domain validation perplexity,
then the average, natural-mixture and worst-domain figures,
mean ± std over seeds) and ``weights.png`` (each method's weight trajectory
of the first seed: online weights, offline proxies' weights, final
mixtures).

Table columns: average validation perplexity (``exp`` of the mean over
domains of the per-domain token loss), worst-domain perplexity and
natural-mixture perplexity (``exp`` of the token-share-weighted mean of the
per-domain loss: the corpus as a whole; recomputed from each run's
``val_loss`` and ``token_shares``, "n/a" for runs written before
``token_shares`` existed), mean ± std over seeds; per-domain perplexity
(means); wall-clock time relative to Uniform (mean over seeds, proxy runs
included).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import traceback
from pathlib import Path
from typing import Sequence


import numpy as np

from dograph_jax.eval import evaluate
from dograph_jax.train import config, methods, pretrain, reporting, single_run
from dograph_jax.train.config import TrainConfig, parse_config
from dograph_jax.train.tracking import read_records

log = logging.getLogger("compare")


def run_dir(out_dir: Path, method: str, seed: int) -> Path:
  return out_dir / method / f"seed{seed}"


def run_one(base: TrainConfig, method: str, seed: int, out_dir: Path,
            method_args: dict | None = None) -> dict:
  """The summary of one (method, seed) run; trains it unless it finished."""
  directory = run_dir(out_dir, method, seed)
  cfg = config.replace(base, method=method, seed=seed, out_dir=str(directory),
                       method_args=dict(method_args or {}), resume=True, halt_after=0)
  summary = single_run.finished_summary(directory, cfg)  # same settings and corpus, or refused
  if summary is not None:
    log.info("%s seed %d: finished before; reusing it", method, seed)
    return summary
  log.info("%s seed %d: training -> %s", method, seed, directory)
  return pretrain.train(cfg)


def aggregate(summaries: dict[str, list[dict]], baseline: str = "uniform") -> dict[str, dict]:
  """Mean/std over seeds of each method's average/worst/natural-mixture/per-domain
  PPL and cost.

  The natural-mixture PPL (``reporting.perplexities``) is recomputed from each
  run's ``val_loss`` and ``token_shares``. ``natural_mean``/``natural_std`` are
  ``None`` (shown "n/a") unless every run of the method has it: a mean over
  only some seeds would not be comparable with the other columns.
  ``natural_runs`` counts the runs that have it.
  """
  base_wall = (float(np.mean([s["wall_s"] for s in summaries[baseline]]))
               if summaries.get(baseline) else None)
  out = {}
  for method, runs in summaries.items():
    if not runs:
      continue
    ppl = [reporting.perplexities(r["val_loss"]) for r in runs]
    average = np.asarray([p["average"] for p in ppl])
    worst = np.asarray([p["worst"] for p in ppl])
    natural = [reporting.run_natural(r) for r in runs]
    have = [v for v in natural if v is not None]
    complete = len(have) == len(runs)
    names = list(runs[0]["val_loss"])
    per_domain = {n: np.asarray([p["per_domain"][n] for p in ppl]) for n in names}
    wall = float(np.mean([r["wall_s"] for r in runs]))
    evals = [r["eval"] for r in runs if r.get("eval")]
    tasks = [t for t in (evals[0] if evals else {}) if all(t in e for e in evals)]
    out[method] = {
        # downstream scores (--eval_tasks): primary metric per task over the
        # seeds that have it
        "eval_mean": {t: float(np.mean([e[t] for e in evals])) for t in tasks},
        "eval_std": {t: float(np.std([e[t] for e in evals])) for t in tasks},
        "seeds": [r.get("seed") for r in runs], "runs": len(runs),
        "average_mean": float(average.mean()), "average_std": float(average.std(ddof=0)),
        "worst_mean": float(worst.mean()), "worst_std": float(worst.std(ddof=0)),
        "natural_mean": float(np.mean(have)) if complete else None,
        "natural_std": float(np.std(have, ddof=0)) if complete else None,
        "natural_runs": len(have),
        "worst_domains": [p["worst_domain"] for p in ppl],
        "per_domain_mean": {n: float(v.mean()) for n, v in per_domain.items()},
        "per_domain_std": {n: float(v.std(ddof=0)) for n, v in per_domain.items()},
        "wall_s": wall, "wall_vs_uniform": wall / base_wall if base_wall else None,
        # what the first seed trained on: an offline method's mixture, an
        # online one's time-averaged weights, else the sampling proportions
        "mixture": (runs[0].get("mixture") or runs[0].get("mixer_average")
                    or runs[0].get("proportions")),
    }
  return out


def failure_kind(trace: str) -> str:
  """``"diverged"`` (a non-finite loss or update stopped the run) or ``"failed"``."""
  return "diverged" if "NonFiniteLossError" in trace else "failed"


def table(agg: dict[str, dict], title: str, failures: dict[str, str] | None = None,
          method_names: Sequence[str] = ()) -> str:
  """A Markdown table in the shape of the paper's Table 2.

  ``failures``: ``{"method/seedK": traceback}`` of the runs that crashed or
  diverged. They are counted in each method's "runs" column (``2/3, 1
  diverged``), a method none of whose runs finished still gets a row, and a
  list under the table names every such run with the last line of its error.
  ``method_names``: the row order (default: the finished methods').
  The natural-mixture PPL column (after the worst-domain one) is there when
  the aggregates come from :func:`aggregate` (aggregates of before it have no
  ``natural_mean`` key and keep their old columns); a method whose runs lack
  ``token_shares`` shows "n/a".
  """
  failures = failures or {}
  lost: dict[str, list[tuple[str, str]]] = {}
  for run, trace in failures.items():
    method, _, seed = run.rpartition("/seed")
    lost.setdefault(method, []).append((seed, trace))
  order = list(method_names) or list(agg)
  order += [m for m in list(agg) + list(lost) if m not in order]
  if not agg and not lost:
    return f"{title}\n\n(no finished runs)\n"
  names = list(next(iter(agg.values()))["per_domain_mean"]) if agg else []
  tasks = []
  for a in agg.values():
    tasks += [t for t in a.get("eval_mean", {}) if t not in tasks]
  eval_head = [*tasks, "eval mean"] if tasks else []
  natural = any("natural_mean" in a for a in agg.values())
  nat_head = ["natural-mix PPL"] if natural else []
  head = ["method", "runs", "avg val PPL", "worst-domain PPL", *nat_head, *names, *eval_head,
          "wall vs uniform"]
  lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for method in order:
    a, bad = agg.get(method), lost.get(method, [])
    kinds = [failure_kind(t) for _, t in bad]
    runs = str(a["runs"] if a else 0)
    if bad:
      runs = f"{runs}/{len(bad) + (a['runs'] if a else 0)}, " + ", ".join(
          f"{kinds.count(k)} {k}" for k in ("diverged", "failed") if k in kinds)
    if a is None:
      lines.append("| " + " | ".join([method, runs, "-", "-", *("-" for _ in nat_head),
                                       *("-" for _ in names),
                                       *("-" for _ in eval_head), "-"]) + " |")
      continue
    rel = f"{a['wall_vs_uniform']:.2f}x" if a["wall_vs_uniform"] else "-"
    row = [method, runs, f"{a['average_mean']:.3f} ± {a['average_std']:.3f}",
           f"{a['worst_mean']:.3f} ± {a['worst_std']:.3f}",
           *([natural_cell(a)] if natural else []),
           *(f"{a['per_domain_mean'][n]:.3f}" for n in names),
           *_eval_cells(a, tasks), rel]
    lines.append("| " + " | ".join(row) + " |")
  if failures:
    lines += ["", "Runs that did not finish (left out of the means above; "
              "`failures.json` has the tracebacks):", ""]
    for method in order:
      for seed, trace in lost.get(method, []):
        last = next((x.strip() for x in reversed(trace.strip().splitlines()) if x.strip()), "")
        lines.append(f"- {method} seed {seed}: {failure_kind(trace)}: {last}")
  return "\n".join(lines) + "\n"


def natural_cell(a: dict) -> str:
  """The natural-mixture PPL of one aggregate: ``mean ± std``, or ``n/a``
  where some runs have no ``token_shares`` (with how many do, if any)."""
  if a.get("natural_mean") is None:
    k = a.get("natural_runs", 0)
    return f"n/a ({k}/{a['runs']} runs)" if k else "n/a"
  return f"{a['natural_mean']:.3f} ± {a['natural_std']:.3f}"


def _eval_cells(a: dict, tasks: Sequence[str]) -> list[str]:
  """The downstream columns of one method: each task's primary metric (mean
  ± std over seeds) and their mean."""
  if not tasks:
    return []
  means, stds = a.get("eval_mean", {}), a.get("eval_std", {})
  cells = [f"{means[t]:.4f} ± {stds[t]:.4f}" if t in means else "-" for t in tasks]
  have = [means[t] for t in tasks if t in means]
  return cells + [f"{np.mean(have):.4f}" if len(have) == len(tasks) else "-"]


def run_eval(directory: Path, tasks: Sequence[str], include_path: str | None,
             limit: float | None, batch_size: int) -> dict[str, float]:
  """``{task: primary metric}`` of one finished run; evaluates it unless its
  ``eval.json`` already holds these tasks at this limit."""
  done = directory / "eval.json"
  if done.exists():
    result = json.loads(done.read_text())
    if (set(tasks) <= set(result["tasks"]) and result.get("limit") == limit
        and result.get("num_fewshot", 0) == 0):
      log.info("%s: evaluated before; reusing eval.json", directory)
      return {t: result["tasks"][t]["value"] for t in tasks}
  result = evaluate.evaluate_run(directory, tasks, include_path=include_path, limit=limit,
                                 batch_size=batch_size)
  if result["failed"]:
    raise RuntimeError(f"evaluation of {directory} could not run "
                       + "; ".join(f"{t}: {why}" for t, why in result["failed"].items()))
  return {t: result["tasks"][t]["value"] for t in tasks}


def _weight_records(directory: Path) -> tuple[list[int], np.ndarray] | None:
  for candidate in (directory / "metrics.jsonl", directory / "stages" / "proxy" / "metrics.jsonl"):
    records = [r for r in read_records(candidate) if "weights" in r]
    if records:
      return [r["step"] for r in records], np.asarray([r["weights"] for r in records])
  return None


def write_plots(agg: dict[str, dict], out_dir: Path, seed: int) -> list[Path]:
  """``per_domain_ppl.png`` and ``weights.png``; returns the written paths."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  written = []
  if not agg:
    return written
  domains = list(next(iter(agg.values()))["per_domain_mean"])
  # The three headline figures after the domains: equal-weight average,
  # natural mixture (0 bar where a method lacks it) and worst domain.
  figures = ["average", "natural", "worst"]
  names = domains + [f"[{f}]" for f in figures]

  def values(a, key):
    if key in domains:
      return a["per_domain_mean"][key], a["per_domain_std"][key]
    f = key.strip("[]")
    return a.get(f"{f}_mean") or 0.0, a.get(f"{f}_std") or 0.0

  fig, ax = plt.subplots(figsize=(max(7, 1.2 * len(names) * len(agg) / 4), 4.5))
  width = 0.8 / len(agg)
  x = np.arange(len(names))
  for j, (method, a) in enumerate(agg.items()):
    mean_std = [values(a, n) for n in names]
    ax.bar(x + j * width, [m for m, _ in mean_std], width, yerr=[s for _, s in mean_std],
           label=method, capsize=2)
  ax.axvline(len(domains) - 0.1, color="grey", lw=0.8)
  ax.set_xticks(x + 0.4 - width / 2, names)
  ax.set(ylabel="validation perplexity", yscale="log",
         title="Per-domain, average, natural-mixture and worst validation perplexity "
               "(mean ± std over seeds)")
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  written.append(out_dir / "per_domain_ppl.png")
  fig.savefig(written[-1], dpi=120)
  plt.close(fig)

  cols = 3
  rows = math.ceil(len(agg) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
  for ax, (method, a) in zip(axes.flat, agg.items()):
    traj = _weight_records(run_dir(out_dir, method, seed))
    if traj is not None:
      steps, w = traj
      labels = domains if w.shape[1] == len(domains) else [f"cluster {j}" for j in range(w.shape[1])]
      ax.stackplot(steps, w.T, labels=labels)
      ax.set(ylim=(0, 1), xlabel="step" + (" (proxy run)" if method in methods.PROXY else ""))
    elif a["mixture"]:
      ax.bar(range(len(a["mixture"])), list(a["mixture"].values()))
      ax.set_xticks(range(len(a["mixture"])), list(a["mixture"]), rotation=45, fontsize=7)
      ax.set(ylim=(0, 1), ylabel="proportion")
    ax.set_title(method, fontsize=9)
  for ax in list(axes.flat)[len(agg):]:
    ax.axis("off")
  for ax in axes.flat:  # one legend: the domain names of the first trajectory
    handles, labels = ax.get_legend_handles_labels()
    if handles and labels[0] == domains[0]:
      fig.legend(handles, labels, fontsize=8, loc="lower right")
      break
  fig.suptitle(f"Domain weights (seed {seed}): trajectories, or the final mixture")
  fig.tight_layout()
  written.append(out_dir / "weights.png")
  fig.savefig(written[-1], dpi=120)
  plt.close(fig)
  return written


def parse_method_args_for(specs: Sequence[str]) -> dict[str, dict[str, str]]:
  """``--args METHOD:name=value,...`` (repeatable) -> {method: {name: value}}."""
  out = {}
  for spec in specs:
    method, sep, text = spec.partition(":")
    if not sep:
      raise ValueError(f"--args {spec!r}: expected METHOD:name=value,...")
    args = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
      name, eq, value = pair.partition("=")
      if not eq:
        raise ValueError(f"--args {spec!r}: expected name=value, got {pair!r}")
      args[name.strip()] = value.strip()
    methods.parse_method_args(method, args)  # fails early on a bad name or value
    out[method] = args
  return out


def compare(base: TrainConfig, method_names: Sequence[str], seeds: Sequence[int],
            out_dir: Path, method_args: dict[str, dict] | None = None,
            eval_tasks: Sequence[str] = (), eval_include_path: str | None = None,
            eval_limit: float | None = None, eval_batch_size: int = 16) -> dict:
  """Runs every (method, seed) not yet finished; writes and returns the report.

  ``method_args``: per-method ``--method_args`` (default: each method's own
  defaults). ``eval_tasks``: lm-eval tasks each finished run is evaluated on
  (``experiments/evaluate.py``; read back from its ``eval.json`` when done
  before), added to the table as columns with their mean; a run whose
  evaluation fails counts as a failed run."""
  method_args = method_args or {}
  out_dir.mkdir(parents=True, exist_ok=True)
  summaries: dict[str, list[dict]] = {m: [] for m in method_names}
  failures = {}
  for method in method_names:
    for seed in seeds:
      try:
        summary = run_one(base, method, seed, out_dir, method_args.get(method, {}))
        if eval_tasks:
          summary = {**summary, "eval": run_eval(run_dir(out_dir, method, seed), eval_tasks,
                                                 eval_include_path, eval_limit,
                                                 eval_batch_size)}
      except Exception as e:  # one crashed method must not lose the others
        log.error("%s seed %d failed: %s", method, seed, e)
        failures[f"{method}/seed{seed}"] = traceback.format_exc()
        continue
      summaries[method].append({**summary, "seed": seed})
  agg = aggregate(summaries)
  title = (f"{base.model.name}, {base.optim.steps} steps x batch {base.optim.batch_size} x {base.optim.seq_len} "
           f"on {base.data.data_dir}; seeds {list(seeds)}")
  text = table(agg, title, failures, method_names)
  (out_dir / "compare.md").write_text(text)
  (out_dir / "compare.json").write_text(json.dumps(
      {"config": config.to_dict(base), "seeds": list(seeds), "method_args": method_args,
       "aggregate": agg,
       "runs": summaries}, indent=2))
  (out_dir / "failures.json").write_text(json.dumps(failures, indent=2))
  plots = write_plots(agg, out_dir, seeds[0]) if base.run.plots else []
  print(text)
  if failures:
    print(f"{len(failures)} run(s) failed: {sorted(failures)} (see {out_dir / 'failures.json'}); "
          "rerun the same command to retry them")
  return {"aggregate": agg, "failures": failures, "plots": [str(p) for p in plots]}


def main(argv: Sequence[str] | None = None) -> int:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                      datefmt="%H:%M:%S", force=True)
  for noisy in ("absl", "orbax", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
  parser.add_argument("--methods", default="all",
                      help=f"comma-separated, or 'all' = {','.join(methods.COMPARED)}")
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
  parser.add_argument("--args", action="append", default=[],
                      help="METHOD:name=value,... a method's --method_args (repeatable), "
                           "e.g. loss_based:burn_in=100")
  parser.add_argument("--eval_tasks", default="",
                      help="comma-separated lm-eval tasks to evaluate every run on "
                           "(e.g. the paper's: " + ",".join(evaluate.PAPER_TASKS) + ")")
  parser.add_argument("--eval_include_path", default=None, help="local task YAML directory")
  parser.add_argument("--eval_limit", type=float, default=None, help="documents per task")
  parser.add_argument("--eval_batch_size", type=int, default=16)
  own, rest = parser.parse_known_args(argv)
  eval_tasks = [t for t in own.eval_tasks.split(",") if t]
  if eval_tasks:
    evaluate.set_offline(online=False)
  limit = own.eval_limit
  if limit is not None and limit >= 1:
    limit = int(limit)
  names = list(methods.COMPARED) if own.methods == "all" else own.methods.split(",")
  for name in names:
    methods.kind(name)  # an unknown method fails before any run
  seeds = [int(s) for s in own.seeds.split(",")]
  base = parse_config(rest, base=config.make_config(out_dir="runs/compare"),
                      description=__doc__.splitlines()[0], own_parser=parser)
  result = compare(base, names, seeds, Path(base.run.out_dir), parse_method_args_for(own.args),
                   eval_tasks, own.eval_include_path, limit, own.eval_batch_size)
  return 1 if result["failures"] else 0


if __name__ == "__main__":
  sys.exit(main())
