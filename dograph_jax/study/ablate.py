"""A study: named training configurations x corpora x seeds, resumably, in one table.

    python experiments/ablate.py --name dograph_domains \\
        --data_dirs data/local,data/synthetic --seeds 0,1,2 \\
        --batch_size 32 --seq_len 64 --steps 400 --out_dir runs/ablate

Each configuration is a label and ``pretrain.py`` overrides
(``--config LABEL:name=value,...``, repeatable; without any, the study
``STUDIES[--name]`` below). Every (corpus, configuration, seed) run lives in
``out_dir/<corpus>/<label>/seed<k>``: a finished one (its ``summary.json``)
is read back, an unfinished one resumes from its last checkpoint, and one
that crashes is recorded in ``failures.json`` while the others go on (rerun
the same command to retry it). Options that are not ``--config`` overrides
(``--model``, ``--steps``, ``--batch_size``, ...) are shared by all runs.

Writes to ``--results_dir`` (default ``experiments/results/<name>``):
``table.md`` (the command, then per corpus a table of average, worst-domain
and natural-mixture validation perplexity, mean ± std over seeds, per-domain
means, and wall-clock vs Uniform, then the seed-paired differences to
``uniform``), ``study.json`` (every run's summary and the aggregates) and
``study.png`` (average, worst-domain and natural-mixture perplexity of every
configuration with error bars, one panel per corpus; below, where the study
has ``uniform``, each configuration's paired difference to it, average
against natural mixture). The natural-mixture
perplexity is recomputed from each run's ``val_loss`` and ``token_shares``;
runs written before ``token_shares`` existed show "n/a" for it.

``--report_only`` trains nothing: it writes the same files from the runs that
have finished, and lists the (configuration, seed) runs that have not under
each corpus's table ("not run yet"), so a long study running in the
background (or on another host writing to the same ``--out_dir``) can be
tabulated at any time without starting its missing runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import traceback
from pathlib import Path
from typing import Sequence


from dograph_jax.study import compare
from dograph_jax.train import config, pretrain, single_run
from dograph_jax.train.config import TrainConfig, parse_config

log = logging.getLogger("ablate")

# The literal per-batch mode of the first versions (paper A.3).
LITERAL = "method=dograph,domains=batch,distance=euclidean"
# Rows spell out the options they test, so they keep meaning the same runs
# when the defaults move.
COSINE = "method=dograph,distance=cosine,anchor=1.0"
DEFAULTS = "method=dograph,distance=euclidean,anchor=0.5"
STUDIES = {
    # Issue 9: persistent model-centric domains against the literal mode and
    # the two plain baselines, then the choices the design leaves open
    # (prior, objective, distance, forgetting factor, anchor). `persistent`
    # is the defaults chosen from this study (euclidean, anchor 0.5). The
    # `*_uprior*` rows were run before the frequency prior existed, by code
    # whose only prior was the uniform one.
    "dograph_domains": {
        "uniform": "method=uniform",
        "stratified": "method=stratified",
        "batch_literal": LITERAL,
        "persistent": DEFAULTS,
        "persistent_euclidean": "method=dograph,distance=euclidean,anchor=1.0",
        "persistent_cosine": COSINE,
        "persistent_cosine_anchor0.5": "method=dograph,distance=cosine,anchor=0.5",
        "persistent_cosine_decay0.99": COSINE + ",decay=0.99",
        "persistent_cosine_robust": COSINE + ",objective=robust",
        "persistent_cosine_uprior": COSINE + ",prior=uniform",
        "persistent_cosine_uprior_robust": COSINE + ",prior=uniform,objective=robust",
        "persistent_cosine_uprior_robust_t0.3":
            COSINE + ",prior=uniform,objective=robust,temperature=0.3",
        # Second round: the other objectives, per-block sketch normalisation
        # (with both priors: if the clusters follow the human domains better,
        # equalising them may pay) and M = 5, each against the defaults.
        "persistent_variance": DEFAULTS + ",objective=variance",
        "persistent_alignment": DEFAULTS + ",objective=alignment",
        "persistent_blocknorm": DEFAULTS + ",normalize_blocks=true",
        "persistent_blocknorm_uprior": DEFAULTS + ",normalize_blocks=true,prior=uniform",
        "persistent_m5": DEFAULTS + ",num_domains=5",
    },
    # Issue 22: every method at its defaults (each applying its weights the
    # way its paper does), 1000 steps, on real and synthetic corpora and on
    # their coarse-label versions (a rare source hidden in a large one;
    # run with --eval_domains validation so that every true source is
    # reported). experiments/results/mixing_1000/README.md has the command.
    "mixing_1000": {
        "uniform": "method=uniform",
        "stratified": "method=stratified",
        # Two defaults are the identity at this budget, so they are set here
        # (the first runs with them were bit-identical to Uniform): T = 1 is
        # the natural mixture (T = 4, the project's earlier tables; T = 5 in
        # Arivazhagan et al. 2019), and the authors' 1000-step burn-in is the
        # whole run (here the warm-up, 100 steps).
        "temperature": "method=temperature,method_args=T=4",
        "loss_based": "method=loss_based,method_args=burn_in=100",
        "group_dro": "method=group_dro",
        "doremi": "method=doremi",
        "doge": "method=doge",
        "regmix": "method=regmix",
        "mixing_law": "method=mixing_law",
        "aioli": "method=aioli",
        "aioli_inbatch": "method=aioli,apply_weights=reweight",
        "rnb": "method=rnb",
        # ADO's published schedule (first fit at step 1000, refits every
        # 1000 of 60k steps) scaled to a 1000-step run.
        "ado": "method=ado,method_args=update_interval=100;start_step=200;ignore_steps=50",
        "odm": "method=odm",
        "dograph": "method=dograph",
        "dograph_sample": "method=dograph,apply_weights=sample",
    },
    # The reference DoGraph cannot read on the coarse-label corpora:
    # stratified over the true sources (data/coarse.py's true_domain field).
    "mixing_1000_true_labels": {
        "stratified_true": "method=stratified,domain_field=true_domain",
    },
}


def parse_overrides(text: str) -> dict:
  """``"name=value,..."`` -> typed ``TrainConfig`` overrides (checked names)."""
  out = {}
  for pair in filter(None, (p.strip() for p in text.split(","))):
    name, sep, value = pair.partition("=")
    if name == "sketch_norm":  # the option's name before 0.2 (studies recorded with it)
      name, value = "normalize_blocks", str(value == "block")
    if not sep or name not in config.FLAGS:
      raise ValueError(f"--config: {pair!r} is not name=value with a pretrain.py option")
    if name == "method_args":  # method_args=k=v;k=v (the method's keywords)
      items = [item.partition("=") for item in filter(None, value.split(";"))]
      if any(not eq for _, eq, _ in items):
        raise ValueError(f"--config: {pair!r}: method_args takes key=value;key=value")
      out[name] = {k.strip(): v.strip() for k, _, v in items}
      continue
    kind = type(config.default_of(name))
    if kind not in (bool, int, float, str):
      raise ValueError(f"--config: option {name!r} takes a mapping or list; set it in the base "
                       "flags (--config_file) instead")
    out[name] = ({"true": True, "false": False}[value.lower()] if kind is bool
                 else kind(value))
  return out


def parse_configs(specs: Sequence[str]) -> dict[str, str]:
  out = {}
  for spec in specs:
    label, sep, text = spec.partition(":")
    if not sep or not label:
      raise ValueError(f"--config {spec!r}: expected LABEL:name=value,...")
    parse_overrides(text)
    out[label] = text
  return out


def _run_config(base: TrainConfig, overrides: str, seed: int, directory: Path) -> TrainConfig:
  return config.replace(base, **parse_overrides(overrides), seed=seed,
                        out_dir=str(directory), resume=True, halt_after=0)


def finished_run(base: TrainConfig, overrides: str, seed: int, directory: Path) -> dict | None:
  """The summary of one run if it has finished (same settings and corpus, or
  ``ValueError``), else ``None``."""
  return single_run.finished_summary(directory, _run_config(base, overrides, seed, directory))


def run_one(base: TrainConfig, overrides: str, seed: int, directory: Path) -> dict:
  """The summary of one run; trains (or resumes) it unless it finished."""
  summary = finished_run(base, overrides, seed, directory)
  if summary is not None:
    return summary
  log.info("training %s", directory)
  return pretrain.train(_run_config(base, overrides, seed, directory))


def corpus_label(data_dir: str) -> str:
  return Path(data_dir).name or "data"


def study(base: TrainConfig, configs: dict[str, str], data_dirs: Sequence[str],
          seeds: Sequence[int], out_dir: Path, train: bool = True) -> dict:
  """Runs what is not finished (nothing when ``train`` is false); returns
  ``{corpus: {"aggregate", "runs", "failures", "pending"}}`` and failures.
  ``pending``: the ``"label/seedK"`` runs that have not finished (only
  without ``train``: otherwise every run has finished or failed)."""
  results, failures = {}, {}
  run = run_one if train else finished_run
  for data_dir in data_dirs:
    corpus = corpus_label(data_dir)
    summaries = {label: [] for label in configs}
    lost = {}  # "label/seedK" -> traceback, for the table
    pending = []
    for label, overrides in configs.items():
      for seed in seeds:
        directory = out_dir / corpus / label / f"seed{seed}"
        try:
          summary = run(config.replace(base, data_dir=data_dir), overrides, seed, directory)
        except Exception:  # one crashed run must not lose the others
          log.error("%s failed:\n%s", directory, traceback.format_exc())
          failures[str(directory)] = lost[f"{label}/seed{seed}"] = traceback.format_exc()
          continue
        if summary is None:
          pending.append(f"{label}/seed{seed}")
          continue
        summaries[label].append({**summary, "seed": seed})
    results[corpus] = {"aggregate": compare.aggregate(summaries), "runs": summaries,
                       "failures": lost, "pending": pending}
  return {"corpora": results, "failures": failures}


def report(result: dict, configs: dict[str, str], base: TrainConfig, seeds: Sequence[int],
           command: str) -> str:
  lines = [f"Command: `{command}`", "",
           f"Budget: `{base.model.name}`, {base.optim.steps} steps x batch {base.optim.batch_size} x "
           f"{base.optim.seq_len} tokens; seeds {list(seeds)}; mean ± std (population) over seeds "
           "of the average (exp of the mean per-domain loss, every domain counting "
           "equally), worst-domain and natural-mixture (exp of the per-domain loss "
           "weighted by the corpus's token shares: the corpus as a whole) validation "
           "perplexity.", "",
           "Configurations (overrides of the `pretrain.py` defaults):", ""]
  lines += [f"- `{label}`: `{text}`" for label, text in configs.items()]
  for corpus, r in result["corpora"].items():
    lines += ["", compare.table(r["aggregate"], f"### {corpus}", r.get("failures"),
                                list(configs))]
    if r.get("pending"):
      lines += [f"Not run yet ({len(r['pending'])}, left out of the means): "
                + ", ".join(r["pending"]), ""]
    paired = paired_differences(r["runs"])
    if paired:
      lines += ["Paired by seed against `uniform` (same initialisation and data order): "
                "mean ± std over seeds of the difference in average / worst-domain / "
                "natural-mixture PPL (negative = better than Uniform), the seeds on "
                "which the configuration's average PPL is lower, and each seed's "
                "difference in average PPL.", "",
                "| configuration | Δ avg PPL | Δ worst PPL | Δ natural PPL | "
                "seeds better on avg | Δ avg per seed |",
                "|---|---|---|---|---|---|"]
      lines += [f"| {label} | {d['average_mean']:+.3f} ± {d['average_std']:.3f} | "
                f"{d['worst_mean']:+.3f} ± {d['worst_std']:.3f} | {_natural_delta(d)} | "
                f"{d['better']}/{d['seeds']} | "
                + ", ".join(f"{s}: {v:+.2f}" for s, v in d["average_by_seed"].items()) + " |"
                for label, d in paired.items()]
  failed = result["failures"]
  if failed:
    lines += ["", f"Failed runs ({len(failed)}): " + ", ".join(sorted(failed))]
  return "\n".join(lines) + "\n"


def _natural_delta(d: dict) -> str:
  """The paired natural-mixture cell: ``mean ± std``, "n/a" without any seed
  pair that has it, and the pair count where only some have."""
  if not d.get("natural_seeds"):
    return "n/a"
  cell = f"{d['natural_mean']:+.3f} ± {d['natural_std']:.3f}"
  return cell if d["natural_seeds"] == d["seeds"] else f"{cell} ({d['natural_seeds']} seeds)"


def paired_differences(runs: dict[str, list[dict]], baseline: str = "uniform") -> dict:
  """Per configuration, the seed-paired difference to ``baseline`` of the
  average, worst-domain and natural-mixture perplexity (mean and population
  std over the seeds both have).

  The natural-mixture difference is over the seeds where both runs have
  ``token_shares`` (``natural_seeds`` of them; ``natural_mean`` and
  ``natural_std`` are ``None`` where there are none). ``average_by_seed``:
  ``{seed: difference in average PPL}``, so that one seed's swing is visible
  behind a mean (a std over three seeds hides which seed it was)."""
  import numpy as np

  from dograph_jax.train import reporting

  def by_seed(summaries):
    return {s["seed"]: {**reporting.perplexities(s["val_loss"]),
                        "natural": reporting.run_natural(s)} for s in summaries}

  base = by_seed(runs.get(baseline, []))
  out = {}
  for label, summaries in runs.items():
    if label == baseline:
      continue
    mine = by_seed(summaries)
    seeds = sorted(set(mine) & set(base))
    if not seeds:
      continue
    avg = np.asarray([mine[s]["average"] - base[s]["average"] for s in seeds])
    worst = np.asarray([mine[s]["worst"] - base[s]["worst"] for s in seeds])
    natural = np.asarray([mine[s]["natural"] - base[s]["natural"] for s in seeds
                          if mine[s]["natural"] is not None and base[s]["natural"] is not None])
    out[label] = {"seeds": len(seeds), "better": int(np.sum(avg < 0)),
                  "average_mean": float(avg.mean()), "average_std": float(avg.std()),
                  "worst_mean": float(worst.mean()), "worst_std": float(worst.std()),
                  "average_by_seed": {s: float(a) for s, a in zip(seeds, avg)},
                  "natural_seeds": len(natural),
                  "natural_mean": float(natural.mean()) if len(natural) else None,
                  "natural_std": float(natural.std()) if len(natural) else None}
  return out


_PLOT_NAMES = {"average": "average", "natural": "natural-mixture", "worst": "worst-domain"}


def write_plot(result: dict, path: Path) -> Path:
  """One column per corpus. Top: average, natural-mixture and worst-domain
  perplexity of every configuration (mean ± std over seeds). Bottom, where
  the study has ``uniform``: each configuration's seed-paired difference to
  it, average against natural-mixture (the trade-off: a method that balances
  the labels by giving up the corpus as a whole lands top left)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  corpora = result["corpora"]
  paired = {corpus: paired_differences(r["runs"]) for corpus, r in corpora.items()}
  paired = {c: {l: d for l, d in p.items() if d["natural_mean"] is not None}
            for c, p in paired.items()}
  rows = 2 if any(paired.values()) else 1
  fig, axes = plt.subplots(rows, len(corpora), figsize=(6.5 * len(corpora), 4.5 * rows),
                           squeeze=False)
  for ax, (corpus, r) in zip(axes[0], corpora.items()):
    agg = r["aggregate"]
    labels = list(agg)
    y = np.arange(len(labels))
    for key, offset, color in (("average", -0.22, "C0"), ("natural", 0.0, "C2"),
                               ("worst", 0.22, "C3")):
      # configurations without the figure (natural: runs without token_shares)
      # get no marker
      have = [j for j, l in enumerate(labels) if agg[l].get(f"{key}_mean") is not None]
      if not have:
        continue
      ax.errorbar([agg[labels[j]][f"{key}_mean"] for j in have], y[have] + offset,
                  xerr=[agg[labels[j]][f"{key}_std"] for j in have], fmt="o", color=color,
                  capsize=3, label=f"{_PLOT_NAMES[key]} val PPL")
      if agg.get("uniform", {}).get(f"{key}_mean") is not None:
        ax.axvline(agg["uniform"][f"{key}_mean"], color=color, lw=0.8, ls="--")
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="validation perplexity (mean ± std over seeds)", title=corpus)
    ax.legend(fontsize=8)
  if rows == 2:
    for ax, corpus in zip(axes[1], corpora):
      diffs = paired[corpus]
      ax.axhline(0, color="k", lw=0.8)
      ax.axvline(0, color="k", lw=0.8)
      for j, (label, d) in enumerate(diffs.items()):
        ax.errorbar(d["average_mean"], d["natural_mean"], xerr=d["average_std"],
                    yerr=d["natural_std"], fmt="o", color=f"C{j % 10}", capsize=3)
        ax.annotate(label, (d["average_mean"], d["natural_mean"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
      ax.set(xlabel="Δ average val PPL vs uniform (paired by seed)",
             ylabel="Δ natural-mixture val PPL vs uniform",
             title=f"{corpus}: better on both = bottom left")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def main(argv: Sequence[str] | None = None) -> int:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                      datefmt="%H:%M:%S", force=True)
  for noisy in ("absl", "orbax", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
  parser.add_argument("--name", default="dograph_domains")
  parser.add_argument("--config", action="append", default=[],
                      help="LABEL:name=value,... (repeatable; default: the study --name)")
  parser.add_argument("--only", default="", help="comma-separated labels of the study to run")
  parser.add_argument("--data_dirs", default="data/local,data/synthetic")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--results_dir", default="")
  parser.add_argument("--report_only", action="store_true",
                      help="train nothing: tabulate the finished runs, list the others")
  own, rest = parser.parse_known_args(argv)
  configs = parse_configs(own.config) if own.config else dict(STUDIES[own.name])
  if own.only:
    configs = {k: configs[k] for k in own.only.split(",")}
  seeds = [int(s) for s in own.seeds.split(",")]
  base = parse_config(rest, base=config.make_config(out_dir="runs/ablate", eval_every=0,
                                             save_every=0, plots=False),
                      description=__doc__.splitlines()[0], own_parser=parser)
  data_dirs = own.data_dirs.split(",")
  result = study(base, configs, data_dirs, seeds, Path(base.run.out_dir),
                 train=not own.report_only)
  results_dir = Path(own.results_dir or f"experiments/results/{own.name}")
  results_dir.mkdir(parents=True, exist_ok=True)
  command = "python experiments/ablate.py " + " ".join(shlex.quote(a) for a in argv)
  text = report(result, configs, base, seeds, command)
  (results_dir / "table.md").write_text(f"# Study `{own.name}`\n\n" + text)
  (results_dir / "study.json").write_text(json.dumps(
      {"command": command, "config": config.to_dict(base), "configs": configs,
       "seeds": seeds, **result}, indent=2))
  write_plot(result, results_dir / "study.png")
  print(text)
  return 1 if result["failures"] else 0


if __name__ == "__main__":
  sys.exit(main())
