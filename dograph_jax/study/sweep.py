"""Sweep hyperparameters that do not change shapes, with one compiled step.

    python experiments/sweep.py --sweep lr=1e-3,3e-3 --sweep temperature=0.5,2 \\
        --objective robust --steps 100

Every ``--sweep name=v1,v2,...`` names a traced hyperparameter (``lr``,
``weight_decay``, ``temperature``, ``lambda_graph``, ``lambda_dir``,
``lambda_align``, ``ema``, ``weight_floor``, and for persistent domains
``decay``, ``anchor``, ``max_ratio``, ``reseed_fraction``), or a float
hyperparameter of ``--method``: an online mixer's (``step_size`` of
``group_dro``, ``lam`` of ``rnb``, ...: kept in the train state, so traced
too) or temperature sampling's ``T`` and ``max_epochs`` (the sampling
proportions: each setting gets its own data iterator, the step is still
compiled once); the grid is their Cartesian product. ``--method rnb``
regroups the corpus first (once, into ``--out_dir/regrouped``) and sweeps its
round rule on the clusters. All other options are those of ``pretrain.py`` and are shared by
every run. Each run starts from the same initial parameters and data
position; its hyperparameters are written into the optimizer state
(``optax.inject_hyperparams``), so the jitted train step is traced and
compiled once for the whole sweep. Prints a table of validation perplexity
per setting (average over domains, natural mixture — the per-domain loss
weighted by the domains' shares of the validation split's tokens — and worst
domain) and writes ``sweep.json`` in ``--out_dir``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import math
import sys
from pathlib import Path
from typing import Sequence


import jax
import jax.numpy as jnp

from dograph_jax.train import config, methods, offline, reporting, single_run, training
from dograph_jax.train.config import TrainConfig, parse_config

log = logging.getLogger("sweep")


def _method_floats(method: str) -> set[str]:
  """The float hyperparameters of ``method`` (its --method_args)."""
  return set(methods.parse_method_args(method, {})[1])


def parse_grid(specs: Sequence[str], method: str = "dograph") -> dict[str, list[float]]:
  own = _method_floats(method)
  grid = {}
  for spec in specs:
    name, _, values = spec.partition("=")
    if name not in training.SWEEPABLE and name not in own:
      raise ValueError(f"--sweep {spec!r}: {name!r} is not a sweepable hyperparameter; "
                       f"choose from {sorted(training.SWEEPABLE)}"
                       + (f" or method {method!r}'s {sorted(own)}" if own else ""))
    if not values:
      raise ValueError(f"--sweep {spec!r}: give values as name=v1,v2")
    grid[name] = [float(v) for v in values.split(",")]
  if not grid:
    raise ValueError("give at least one --sweep name=v1,v2")
  return grid


def _trained_config(cfg: TrainConfig) -> TrainConfig:
  """The config of the runs the sweep trains (an offline method's final run)."""
  if cfg.method in methods.FINAL_MIXER:  # R&B: the clusters, once, then its round rule
    folder, info, _ = offline.regroup_stage(cfg, Path(cfg.run.out_dir) / "regrouped")
    return config.replace(cfg, **offline.final_overrides(cfg, folder, info))
  if cfg.method == "temperature":  # a plain run at each setting's proportions
    return config.replace(cfg, method="uniform", method_args={})
  if methods.kind(cfg.method) == "offline":
    raise ValueError(f"sweep: method {cfg.method!r} is a pipeline of several runs; sweep its "
                     "final run instead (--method uniform --proportions ...)")
  return cfg


def run_sweep(cfg: TrainConfig, grid: dict[str, list[float]]):
  """Runs every point of ``grid``; returns ``(results, train_step)``."""
  method = cfg.method
  cfg = _trained_config(cfg)
  data = single_run.load_data(cfg)
  _, graphdef, params = training.build_model(cfg, data.vocab_size)
  tx = training.make_optimizer(cfg)
  train_step = training.make_train_step(graphdef, tx, cfg, probe_tokens=data.probe_tokens)
  eval_step = training.make_eval_step(graphdef)
  start_position = data.train_iter.get_state()
  # The natural mixture's weights: the evaluated domains' shares of the
  # validation split's tokens (as every run's summary.json).
  shares = data.token_shares
  _, sampling_defaults = methods.parse_method_args(method, {}) if method == "temperature" \
      else (None, {})
  results = []
  names = list(grid)
  for values in itertools.product(*(grid[n] for n in names)):
    setting = dict(zip(names, values))
    state = training.init_train_state(jax.tree.map(lambda x: x.copy(), params), tx, cfg,
                                      len(data.names))
    state = state._replace(opt_state=training.set_hyperparams(
        state.opt_state, **{k: v for k, v in setting.items() if k in training.SWEEPABLE}))
    own = getattr(state.method, "hparams", {})  # an online mixer's floats, traced in its state
    mixing = {k: v for k, v in setting.items() if k in own}
    if mixing:
      hparams = {**state.method.hparams,
                 **{k: jnp.asarray(v, jnp.float32) for k, v in mixing.items()}}
      state = state._replace(method=state.method._replace(hparams=hparams))
    train_iter = data.train_iter
    if sampling_defaults:
      from dograph_jax.mixing.temperature import temperature_proportions
      args = {**sampling_defaults, **{k: v for k, v in setting.items() if k in sampling_defaults}}
      p = temperature_proportions([data.rows[n] for n in data.names],
                                  budget=cfg.optim.steps * cfg.optim.batch_size, **args)
      proportions = offline._floor(dict(zip(data.names, p.tolist())))
      train_iter = single_run.load_data(config.replace(cfg, proportions=proportions)).train_iter
    else:
      train_iter.set_state(start_position)
    # The sample form draws each batch with the method's proportions of the step.
    draw = single_run.batch_drawer(cfg, dataclasses.replace(data, train_iter=train_iter))
    for step in range(cfg.optim.steps):
      state, metrics = train_step(state, draw(state))
    loss = float(metrics["loss"])
    val = single_run.evaluate(eval_step, state.params, data.eval_batches)
    p = reporting.perplexities(val) if all(map(math.isfinite, val.values())) else {}
    try:
      natural = reporting.perplexities(val, shares)["natural"] if p else math.inf
    except ValueError:  # no finite validation loss to weigh
      natural = None
    results.append({"setting": setting, "final_train_loss": loss, "val_loss": val,
                    "token_shares": shares,
                    "average_ppl": p.get("average", math.inf), "worst_ppl": p.get("worst", math.inf),
                    "natural_ppl": natural})
    log.info("%s: average val ppl %.3f", setting, results[-1]["average_ppl"])
  return results, train_step


def main(argv: Sequence[str] | None = None) -> int:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                      datefmt="%H:%M:%S", force=True)
  argv = list(sys.argv[1:] if argv is None else argv)
  specs, rest = [], []
  while argv:
    arg = argv.pop(0)
    if arg == "--sweep":
      specs.append(argv.pop(0))
    elif arg.startswith("--sweep="):
      specs.append(arg.split("=", 1)[1])
    else:
      rest.append(arg)
  own = argparse.ArgumentParser(add_help=False)
  own.add_argument("--sweep", action="append", metavar="NAME=V1,V2,...",
                   help="a hyperparameter and its values (repeatable: the grid is their product); "
                        f"one of {', '.join(sorted(training.SWEEPABLE))} or the method's float "
                        "--method_args")
  cfg = parse_config(rest,
                     base=config.make_config(out_dir="runs/sweep"),
                     description=__doc__.splitlines()[0], own_parser=own)
  results, train_step = run_sweep(cfg, parse_grid(specs, cfg.method))
  out = Path(cfg.run.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "sweep.json").write_text(json.dumps(results, indent=2))
  print(f"{'setting':<40} {'train loss':>10} {'avg val ppl':>12} {'natural':>9} {'worst':>9}")
  for r in results:
    setting = ", ".join(f"{k}={v:g}" for k, v in r["setting"].items())
    natural = "n/a" if r["natural_ppl"] is None else f"{r['natural_ppl']:.3f}"
    print(f"{setting:<40} {r['final_train_loss']:10.4f} {r['average_ppl']:12.3f} "
          f"{natural:>9} {r['worst_ppl']:9.3f}")
  print(f"train step compiled {len(train_step.traces)} time(s) for {len(results)} runs")
  return 0


if __name__ == "__main__":
  sys.exit(main())
