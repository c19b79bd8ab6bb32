"""Sweep hyperparameters that do not change shapes, with one compiled step.

    python experiments/sweep.py --sweep lr=1e-3,3e-3 --sweep temperature=0.5,2 \\
        --objective robust --steps 100

Every ``--sweep name=v1,v2,...`` names a traced hyperparameter (``lr``,
``weight_decay``, ``temperature``, ``lambda_graph``, ``lambda_dir``,
``lambda_align``, ``ema``, ``weight_floor``, and for persistent domains
``decay``, ``anchor``, ``max_ratio``, ``reseed_fraction``); the grid is their Cartesian
product. All other options are those of ``pretrain.py`` and are shared by
every run. Each run starts from the same initial parameters and data
position; its hyperparameters are written into the optimizer state
(``optax.inject_hyperparams``), so the jitted train step is traced and
compiled once for the whole sweep. Prints a table of validation perplexity
per setting and writes ``sweep.json`` in ``--out_dir``.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax

from experiments import pretrain, reporting, training
from experiments.configs import TrainConfig, parse_config

log = logging.getLogger("sweep")


def parse_grid(specs: Sequence[str]) -> dict[str, list[float]]:
  grid = {}
  for spec in specs:
    name, _, values = spec.partition("=")
    if name not in training.SWEEPABLE:
      raise ValueError(f"--sweep {spec!r}: {name!r} is not a sweepable hyperparameter; "
                       f"choose from {sorted(training.SWEEPABLE)}")
    if not values:
      raise ValueError(f"--sweep {spec!r}: give values as name=v1,v2")
    grid[name] = [float(v) for v in values.split(",")]
  if not grid:
    raise ValueError("give at least one --sweep name=v1,v2")
  return grid


def run_sweep(cfg: TrainConfig, grid: dict[str, list[float]]):
  """Runs every point of ``grid``; returns ``(results, train_step)``."""
  data = pretrain.load_data(cfg)
  _, graphdef, params = training.build_model(cfg, data.vocab_size)
  tx = training.make_optimizer(cfg)
  train_step = training.make_train_step(graphdef, tx, cfg, probe_tokens=data.probe_tokens)
  eval_step = training.make_eval_step(graphdef)
  start_position = data.train_iter.get_state()
  results = []
  names = list(grid)
  for values in itertools.product(*(grid[n] for n in names)):
    setting = dict(zip(names, values))
    state = training.init_train_state(jax.tree.map(lambda x: x.copy(), params), tx, cfg,
                                      len(data.names))
    state["opt_state"] = training.set_hyperparams(state["opt_state"], **setting)
    data.train_iter.set_state(start_position)
    for step in range(cfg.steps):
      state, metrics = train_step(state, next(data.train_iter))
    loss = float(metrics["loss"])
    val = pretrain.evaluate(eval_step, state["params"], data.eval_batches)
    p = reporting.perplexities(val) if all(map(math.isfinite, val.values())) else {}
    results.append({"setting": setting, "final_train_loss": loss, "val_loss": val,
                    "average_ppl": p.get("average", math.inf), "worst_ppl": p.get("worst", math.inf)})
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
  cfg = parse_config(rest, base=TrainConfig(out_dir="runs/sweep"),
                     description=__doc__.splitlines()[0])
  results, train_step = run_sweep(cfg, parse_grid(specs))
  out = Path(cfg.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "sweep.json").write_text(json.dumps(results, indent=2))
  print(f"{'setting':<40} {'train loss':>10} {'avg val ppl':>12} {'worst':>9}")
  for r in results:
    setting = ", ".join(f"{k}={v:g}" for k, v in r["setting"].items())
    print(f"{setting:<40} {r['final_train_loss']:10.4f} {r['average_ppl']:12.3f} "
          f"{r['worst_ppl']:9.3f}")
  print(f"train step compiled {len(train_step.traces)} time(s) for {len(results)} runs")
  return 0


if __name__ == "__main__":
  sys.exit(main())
