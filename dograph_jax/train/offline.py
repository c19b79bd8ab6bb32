"""Offline data-mixing methods: proxy runs, then one final run at the mixture.

Every offline method ends in sampling proportions for a final run of the
plain trainer (``--method uniform --proportions ...``, grain's stratified
mix). They differ in how they get there:

* ``stratified`` — equal rows per domain; no proxy run.
* ``temperature`` — ``p_d ∝ n_d^(1/T)`` over the domains' training rows
  (``--method_args T=...``; ``max_epochs=E`` caps each domain at ``E``
  passes over its rows within the run's ``steps * batch_size`` rows,
  UniMax-style; ``dograph_jax/mixing/temperature.py``); no proxy run.
* ``doremi`` (Xie et al. 2023) — a reference run on the natural mixture, then
  a proxy run (``doremi_proxy``) whose domain weights follow DoReMi's
  exponentiated-gradient rule on the excess loss over the reference; the
  output is the proxy's time-averaged weights.
* ``doge`` (Fan et al. 2024) — a proxy run (``doge_proxy``) whose weights
  follow DoGE's generalisation-estimation rule; time-averaged weights.
* ``regmix`` (Liu et al. 2024) — ``--proxy_runs`` short runs at Dirichlet
  mixtures around the natural prior^0.5, a regression from mixture to the
  average validation loss (gradient-boosted trees, as RegMix's LightGBM), and
  the mean of the top-k predicted mixtures.
* ``mixing_law`` (Ye et al. 2024) — the same kind of proxy runs, a fitted
  law ``L_i(r) = c_i + k_i exp(t_i . r)`` per domain, and the mixture
  minimising the predicted average loss.
* ``rnb`` (R&B, Ge et al. 2025) — no proxy run: a *regroup* stage embeds
  every training document (``--regroup_embedder``: TF-IDF + SVD, or a local
  sentence-embedding model), clusters the embeddings with K-means, ``k``
  from ``--regroup_k`` by silhouette (``dograph_jax/mixing/regroup.py``),
  and writes the corpus again under ``out_dir/regrouped`` with the clusters
  as domains (``train/cluster_NN.jsonl``, each record keeping its
  ``human_domain``) and the validation split as it was; the final run then
  trains on the clusters with R&B's round rule (``rnb_rounds``,
  ``dograph_jax/mixing/rnb.py``; ``--method_args`` go to it), its target
  ``q`` each cluster's share of the validation split (every human domain
  weighted equally), and reports the human domains' validation perplexity
  (``--eval_domains validation``) with the original tokenizer.
  ``regroup.json``: ``k``, the silhouette of every ``k`` tried, ``q``, the
  human-domain x cluster contingency of the training documents.

Proxy and reference runs use the run's model and batch with
``--proxy_steps`` steps (default ``steps // 4``); they evaluate only at their
end. RegMix and the mixing law select on the validation split's losses (as
both papers do with their validation sets). Their wall-clock time counts in
the method's cost (``summary["wall_s"]``; per stage in ``summary["stages"]``).

Layout of ``--out_dir``: ``stages/<name>/`` holds every run (each a normal
run directory), ``mixture.json`` the proportions, ``summary.json``/``.txt``
the final run's perplexities with the method's name and total cost. A
finished stage (its ``summary.json`` exists) is never rerun, an unfinished
one resumes from its last checkpoint: rerunning a crashed method loses
nothing that was finished.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from dograph_jax.train import config, distributed, reporting, single_run
from dograph_jax.train.config import TrainConfig
from dograph_jax.train.methods import FINAL_MIXER, PROXY, parse_method_args

log = logging.getLogger("offline")

# grain's mix rejects zero weights and turns weights into integers scaled by
# the smallest: proportions are floored here (then renormalised).
MIN_PROPORTION = 1e-3


def _floor(mixture: dict[str, float]) -> dict[str, float]:
  """``mixture`` normalised with every proportion >= ``MIN_PROPORTION``: the
  domains below it are raised to it and the others scaled down together
  (repeated until none falls below)."""
  values = np.asarray(list(mixture.values()), np.float64)
  if not np.all(np.isfinite(values)) or np.any(values < 0) or values.sum() <= 0:
    raise ValueError(f"not a mixture: {mixture}")
  values = values / values.sum()
  low = values < MIN_PROPORTION
  while True:
    free = 1.0 - MIN_PROPORTION * low.sum()
    out = np.where(low, MIN_PROPORTION, values * free / values[~low].sum())
    if not np.any(out[~low] < MIN_PROPORTION):
      return dict(zip(mixture, out.tolist()))
    low |= out < MIN_PROPORTION


class _Stages:
  """Runs the stages of one offline method under ``out_dir/stages``."""

  def __init__(self, cfg: TrainConfig):
    self.cfg = cfg
    self.root = Path(cfg.run.out_dir) / "stages"
    self.proxy_steps = cfg.offline.proxy_steps or max(cfg.optim.steps // 4, 1)
    self.cost: dict[str, float] = {}

  def run(self, name: str, *, proxy: bool = True, **overrides) -> dict:
    """The summary of stage ``name`` (trained now unless already finished)."""
    out_dir = self.root / name
    base = dict(out_dir=str(out_dir), method="uniform", method_args={}, proportions={},
                sampling="natural",
                reference_dir="", resume=True, halt_after=0)
    if proxy:
      base.update(steps=self.proxy_steps, warmup_steps=min(self.cfg.optim.warmup_steps, self.proxy_steps),
                  eval_every=0, save_every=0, keep_checkpoints=1, plots=False)
    stage_cfg = config.replace(self.cfg, **{**base, **overrides})
    summary = single_run.finished_summary(out_dir, stage_cfg)  # same settings and corpus
    if summary is not None:
      log.info("stage %s: finished before (%.1f s); reusing it", name, summary["wall_s"])
    else:
      log.info("stage %s: %s", name, {k: v for k, v in overrides.items() if v})
      summary = single_run.train_run(stage_cfg)
      if "halted_at" in summary:
        raise RuntimeError(f"stage {name} halted at step {summary['halted_at']}")
    self.cost[name] = float(summary["wall_s"])
    return summary


def _load(cfg: TrainConfig) -> single_run.RunData:
  """The corpus as a plain run would load it (natural proportions)."""
  return single_run.load_data(config.replace(cfg, method="uniform", method_args={},
                                                  proportions={}, sampling="natural"))



def _proxy_mixtures(cfg: TrainConfig, stages: _Stages, prior: dict[str, float]):
  """RegMix/mixing-law proxy runs: ``(mixtures (N, D), val_losses (N, D))``."""
  from dograph_jax.mixing import regmix
  names = list(prior)
  mixtures = regmix.sample_mixtures(cfg.run.seed, np.asarray(list(prior.values())), cfg.offline.proxy_runs)
  rows, losses = [], []
  for n, mixture in enumerate(mixtures):
    floored = _floor(dict(zip(names, mixture)))
    summary = stages.run(f"proxy_{n:02d}",
                         proportions=floored)
    rows.append([floored[d] for d in names])
    # A training domain without validation rows has no loss to fit (the run
    # warned): the target is the domains that have one (columns M <= D).
    losses.append([summary["val_loss"][d] for d in names if d in summary["val_loss"]])
  return np.asarray(rows), np.asarray(losses)


def mixture_for(cfg: TrainConfig, stages: _Stages) -> dict[str, float]:
  """Runs the method's proxy stages and returns its sampling proportions."""
  data = _load(cfg)
  prior = dict(data.proportions)  # natural (token) proportions, in domain-id order
  names = list(prior)
  if cfg.method == "mixing_law" and cfg.offline.proxy_runs < len(names) + 1:
    # Checked before any proxy run: the law has D + 2 parameters per domain.
    raise ValueError(f"--method mixing_law needs --proxy_runs >= {len(names) + 1} "
                     f"(D + 1 for {len(names)} domains), got {cfg.offline.proxy_runs}")
  if cfg.method == "stratified":
    return {n: 1.0 / len(names) for n in names}
  if cfg.method == "temperature":
    from dograph_jax.mixing.temperature import temperature_proportions
    _, traced = parse_method_args(cfg.method, cfg.method_args)
    p = temperature_proportions([data.rows[n] for n in names], budget=cfg.optim.steps * cfg.optim.batch_size,
                                **traced)
    return dict(zip(names, p.tolist()))
  if cfg.method in PROXY:
    overrides = dict(method=PROXY[cfg.method], method_args=cfg.method_args)
    if cfg.method == "doremi":
      stages.run("reference")
      overrides["reference_dir"] = str(stages.root / "reference")
    return stages.run("proxy", **overrides)["mixer_average"]
  mixtures, losses = _proxy_mixtures(cfg, stages, prior)
  if cfg.method == "regmix":
    from dograph_jax.mixing import regmix
    # RegMix's regressor is gradient boosting (LightGBM; here scikit-learn's
    # histogram GBM). Its linear alternative is not used: a linear fit is
    # minimised at a vertex of the simplex, and with a handful of proxy runs
    # that extrapolation put 99.6% of the data on one domain (measured on
    # data/local with 8 runs); trees stay near the mixtures that were run.
    predictor = regmix.fit_regression(mixtures, losses.mean(1), model="gbm")
    best = regmix.top_k_mixture(predictor, cfg.run.seed, np.asarray(list(prior.values())))
  else:
    from dograph_jax.mixing import mixing_law
    params = mixing_law.fit_mixing_law(mixtures, losses, seed=cfg.run.seed)
    best = mixing_law.optimal_mixture(params)
  return dict(zip(names, np.asarray(best, np.float64).tolist()))


def run(cfg: TrainConfig) -> dict:
  """Runs (or resumes) offline method ``cfg.method``; returns its summary.

  The pipeline owns ``--out_dir`` (each stage its own ``stages/<name>``);
  a new pipeline over an old run is refused unless ``--overwrite``, and
  ``--resume`` reuses the finished stages."""
  with single_run.owned_run_dir(cfg):
    return _run(cfg)


def _run(cfg: TrainConfig) -> dict:
  out_dir = Path(cfg.run.out_dir)
  main = distributed.is_main_process()  # other hosts only train
  saved = out_dir / "config.json"
  if cfg.run.resume and saved.exists():  # compared before anything is rewritten
    single_run.check_resumable(json.loads(saved.read_text()), cfg)
  if main:
    saved.write_text(json.dumps(config.to_dict(cfg), indent=2))
  stages = _Stages(cfg)
  t0 = time.perf_counter()
  extra = {}
  if cfg.method in FINAL_MIXER:  # R&B: regroup, then one online run on the clusters
    regrouped, info, t_regroup = _regroup_on_main(cfg, out_dir / "regrouped")
    stages.cost["regroup"] = t_regroup
    final = stages.run("final", proxy=False, **final_overrides(cfg, regrouped, info))
    mixture = final["mixer_average"]
    extra = {"regroup": {k: info[k] for k in ("k", "silhouette", "target", "embedder")}}
  else:
    mixture = _floor(mixture_for(cfg, stages))
    log.info("%s mixture: %s", cfg.method, ", ".join(f"{n}={w:.3f}" for n, w in mixture.items()))
    final = stages.run("final", proxy=False, proportions=mixture)
  if main:
    (out_dir / "mixture.json").write_text(json.dumps(mixture, indent=2))
  # The corpus the pipeline was given: the final run's, but for R&B, whose
  # final run trains on its clusters (or a final run of before 0.3).
  corpus = None if cfg.method in FINAL_MIXER else final.get("corpus")
  summary = {**final, "method": cfg.method, "mixture": mixture, **extra,
             "corpus": corpus or _load(cfg).corpus,
             "stages": dict(stages.cost), "wall_s": sum(stages.cost.values()),
             "orchestration_s": time.perf_counter() - t0}
  proxies = sum(1 for n in stages.cost if n not in ("final", "regroup"))
  title = (f"{cfg.method} {cfg.model.name}, {cfg.optim.steps} steps + {proxies} proxy "
           f"run(s), batch {cfg.optim.batch_size} x {cfg.optim.seq_len}")
  if not main:
    return summary
  text = reporting.summary_table(title, final["val_loss"], final["steps_per_s"],
                                 shares=final.get("token_shares"))
  (out_dir / "summary.txt").write_text(text + "\n")
  (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
  print(text)
  return summary


def _k_range(cfg: TrainConfig, num_human: int) -> range:
  if cfg.offline.regroup_k == "auto":
    return range(max(num_human, 2), 3 * max(num_human, 2) + 1)
  lo, hi = (int(v) for v in cfg.offline.regroup_k.split(":"))
  return range(lo, hi + 1)


def _regroup_on_main(cfg: TrainConfig, folder: Path) -> tuple[Path, dict, float]:
  """:func:`regroup_stage` on the main process; the others wait for it and
  read its result (``out_dir`` is shared, as for the checkpoints)."""
  import jax
  if distributed.is_main_process():
    result = regroup_stage(cfg, folder)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("rnb regroup")
  if not distributed.is_main_process():
    info = json.loads((folder / "regroup.json").read_text())
    result = folder, info, float(info["wall_s"])
  return result


def regroup_stage(cfg: TrainConfig, folder: Path) -> tuple[Path, dict, float]:
  """R&B's regrouping of ``cfg.data.data_dir`` into ``folder`` (once: reused when
  ``folder/regroup.json`` exists); returns ``(folder, info, seconds)``."""
  from dograph_jax.data.corpus import read_split
  from dograph_jax.mixing import regroup
  done = folder / "regroup.json"
  if done.exists():
    info = json.loads(done.read_text())
    log.info("regroup: finished before (k=%d); reusing it", info["k"])
    return folder, info, float(info["wall_s"])
  t0 = time.perf_counter()
  _load(cfg)  # generates the bundled corpus if absent and trains/caches its tokenizer
  fields = dict(domain_field=cfg.data.domain_field, text_field=cfg.data.text_field)
  train, _ = read_split(cfg.data.data_dir, "train", **fields)
  val, _ = read_split(cfg.data.data_dir, "validation", **fields)
  texts = [t for docs in train.values() for t in docs]
  human = [d for d, docs in train.items() for _ in docs]
  embed = regroup.make_embedder(cfg.offline.regroup_embedder, seed=cfg.run.seed)
  z = embed(texts)
  grouping = regroup.choose_k(z, _k_range(cfg, len(train)), seed=cfg.run.seed)
  k = grouping.k
  # zero-padded: the corpus reader sorts domains by name, so ids follow c
  names = [f"cluster_{c:0{max(2, len(str(k - 1)))}d}" for c in range(k)]
  # q: each cluster's share of the validation split, every human domain
  # weighted equally (the reported average perplexity weights them so) and
  # its documents by length (its loss is a mean over tokens).
  target = np.zeros(k)
  for docs in val.values():
    if not docs:
      continue
    assigned = grouping.assign(embed(list(docs)))
    lengths = np.asarray([len(t) for t in docs], np.float64)
    target += np.bincount(assigned, weights=lengths, minlength=k) / lengths.sum() / len(val)
  domains = list(train)
  contingency = np.zeros((len(domains), k), np.int64)
  np.add.at(contingency, ([domains.index(d) for d in human], grouping.labels), 1)
  partial = folder.with_name(folder.name + ".partial")
  shutil.rmtree(partial, ignore_errors=True)
  (partial / "train").mkdir(parents=True)
  (partial / "validation").mkdir(parents=True)
  files = [open(partial / "train" / f"{n}.jsonl", "w", encoding="utf-8") for n in names]
  for text, d, c in zip(texts, human, grouping.labels):
    files[c].write(json.dumps({"text": text, "domain": names[c], "human_domain": d}) + "\n")
  for f in files:
    f.close()
  with open(partial / "validation" / "validation.jsonl", "w", encoding="utf-8") as f:
    for d, docs in val.items():
      for text in docs:
        f.write(json.dumps({"text": text, "domain": d}) + "\n")
  info = {"k": k, "silhouette": {str(kk): v for kk, v in grouping.scores.items()},
          "target": dict(zip(names, target.tolist())), "embedder": cfg.offline.regroup_embedder,
          "human_domains": domains, "contingency": contingency.tolist(),
          "documents": len(texts), "source": str(cfg.data.data_dir),
          "wall_s": time.perf_counter() - t0}
  (partial / "regroup.json").write_text(json.dumps(info, indent=2))
  shutil.rmtree(folder, ignore_errors=True)
  partial.rename(folder)
  log.info("regroup: %d documents -> k=%d clusters (silhouette %s) in %.1f s", len(texts), k,
           ", ".join(f"{kk}:{v:.3f}" for kk, v in grouping.scores.items()), info["wall_s"])
  return folder, info, info["wall_s"]


def final_overrides(cfg: TrainConfig, regrouped: Path, info: dict) -> dict:
  """The R&B final run's settings: the clusters as domains, the human
  domains evaluated, the original tokenizer, the round rule with target q."""
  tokenizer = cfg.data.tokenizer or str(cfg.data.tokenizer_cache())
  args = dict(cfg.method_args)
  args.setdefault("target", ":".join(repr(v) for v in info["target"].values()))
  return dict(method=FINAL_MIXER[cfg.method], method_args=args,
              data_dir=str(regrouped), domain_field="domain", tokenizer=tokenizer,
              eval_domains="validation")
