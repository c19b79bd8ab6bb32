"""Offline data-mixing methods: proxy runs, then one final run at the mixture.

Every offline method ends in sampling proportions for a final run of the
plain trainer (``--method uniform --proportions ...``, grain's stratified
mix). They differ in how they get there:

* ``stratified`` — equal rows per domain; no proxy run.
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

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np

from experiments import distributed, reporting, single_run
from experiments.configs import TrainConfig
from experiments.methods import PROXY

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
    self.root = Path(cfg.out_dir) / "stages"
    self.proxy_steps = cfg.proxy_steps or max(cfg.steps // 4, 1)
    self.cost: dict[str, float] = {}

  def run(self, name: str, *, proxy: bool = True, **overrides) -> dict:
    """The summary of stage ``name`` (trained now unless already finished)."""
    out_dir = self.root / name
    base = dict(out_dir=str(out_dir), method="uniform", method_args="", proportions="",
                reference_dir="", resume=True, halt_after=0)
    if proxy:
      base.update(steps=self.proxy_steps, warmup_steps=min(self.cfg.warmup_steps, self.proxy_steps),
                  eval_every=0, save_every=0, keep_checkpoints=1, plots=False)
    stage_cfg = dataclasses.replace(self.cfg, **{**base, **overrides})
    done = out_dir / "summary.json"
    if done.exists():
      single_run._check_resumable(json.loads((out_dir / "config.json").read_text()), stage_cfg)
      summary = json.loads(done.read_text())
      log.info("stage %s: finished before (%.1f s); reusing it", name, summary["wall_s"])
    else:
      log.info("stage %s: %s", name, {k: v for k, v in overrides.items() if v})
      summary = single_run.train_run(stage_cfg)
      if "halted_at" in summary:
        raise RuntimeError(f"stage {name} halted at step {summary['halted_at']}")
    self.cost[name] = float(summary["wall_s"])
    return summary


def _natural(cfg: TrainConfig) -> dict[str, float]:
  """Natural (token) proportions of the corpus, in domain-id order."""
  return dict(single_run.load_data(dataclasses.replace(
      cfg, method="uniform", method_args="", proportions="")).proportions)


def _proxy_mixtures(cfg: TrainConfig, stages: _Stages, prior: dict[str, float]):
  """RegMix/mixing-law proxy runs: ``(mixtures (N, D), val_losses (N, D))``."""
  from dograph_jax.mixing import regmix
  names = list(prior)
  mixtures = regmix.sample_mixtures(cfg.seed, np.asarray(list(prior.values())), cfg.proxy_runs)
  rows, losses = [], []
  for n, mixture in enumerate(mixtures):
    floored = _floor(dict(zip(names, mixture)))
    summary = stages.run(f"proxy_{n:02d}",
                         proportions=single_run.format_proportions(floored))
    rows.append([floored[d] for d in names])
    # A training domain without validation rows has no loss to fit (the run
    # warned): the target is the domains that have one (columns M <= D).
    losses.append([summary["val_loss"][d] for d in names if d in summary["val_loss"]])
  return np.asarray(rows), np.asarray(losses)


def mixture_for(cfg: TrainConfig, stages: _Stages) -> dict[str, float]:
  """Runs the method's proxy stages and returns its sampling proportions."""
  prior = _natural(cfg)
  names = list(prior)
  if cfg.method == "mixing_law" and cfg.proxy_runs < len(names) + 1:
    # Checked before any proxy run: the law has D + 2 parameters per domain.
    raise ValueError(f"--method mixing_law needs --proxy_runs >= {len(names) + 1} "
                     f"(D + 1 for {len(names)} domains), got {cfg.proxy_runs}")
  if cfg.method == "stratified":
    return {n: 1.0 / len(names) for n in names}
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
    best = regmix.top_k_mixture(predictor, cfg.seed, np.asarray(list(prior.values())))
  else:
    from dograph_jax.mixing import mixing_law
    params = mixing_law.fit_mixing_law(mixtures, losses, seed=cfg.seed)
    best = mixing_law.optimal_mixture(params)
  return dict(zip(names, np.asarray(best, np.float64).tolist()))


def run(cfg: TrainConfig) -> dict:
  """Runs (or resumes) offline method ``cfg.method``; returns its summary."""
  out_dir = Path(cfg.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  main = distributed.is_main_process()  # other hosts only train
  if main:
    (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
  stages = _Stages(cfg)
  t0 = time.perf_counter()
  mixture = _floor(mixture_for(cfg, stages))
  if main:
    (out_dir / "mixture.json").write_text(json.dumps(mixture, indent=2))
  log.info("%s mixture: %s", cfg.method, ", ".join(f"{n}={w:.3f}" for n, w in mixture.items()))
  final = stages.run("final", proxy=False, proportions=single_run.format_proportions(mixture))
  summary = {**final, "method": cfg.method, "mixture": mixture,
             "stages": dict(stages.cost), "wall_s": sum(stages.cost.values()),
             "orchestration_s": time.perf_counter() - t0}
  title = (f"{cfg.method} {cfg.model}, {cfg.steps} steps + {len(stages.cost) - 1} proxy "
           f"run(s), batch {cfg.batch_size} x {cfg.seq_len}")
  if not main:
    return summary
  text = reporting.summary_table(title, final["val_loss"], final["steps_per_s"])
  (out_dir / "summary.txt").write_text(text + "\n")
  (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
  print(text)
  return summary
