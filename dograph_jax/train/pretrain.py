"""Pretrain a GPT-2 with DoGraph (or a baseline) on a multi-domain corpus.

Default (no arguments): the ``mini`` GPT-2 trained with DoGraph on the bundled
synthetic corpus (generated into ``data/synthetic`` on first use) on the CPU
in a few minutes; prints the per-domain validation summary.

    python experiments/pretrain.py                         # default CPU run
    python experiments/pretrain.py --method uniform        # the baseline
    python experiments/pretrain.py --data_dir /data/slimpajama --tokenizer /tok \\
        --model paper-small --batch_size 48 --seq_len 512 --steps 20000 \\
        --warmup_steps 500 --lr 6e-4 --out_dir runs/paper-small   # GPU host

Every option is ``--name value`` (``--help`` lists them with their help
text; ``dograph_jax/train/config.py``); ``--config FILE.yaml`` gives a base.
The run directory holds ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/``,
``config.json``, ``summary.txt``/``summary.json`` and PNG plots;
``--resume`` continues from the last complete checkpoint exactly.
"""

from __future__ import annotations

import logging
import sys
from typing import Sequence


import jax

from dograph_jax.train import distributed, methods, offline
from dograph_jax.train.config import TrainConfig, parse_config
from dograph_jax.train.single_run import NonFiniteLossError, train_run

log = logging.getLogger("pretrain")


def train(cfg: TrainConfig) -> dict:
  """Runs (or resumes) training; returns the summary dict.

  An online method (``dograph``, ``uniform``, the online baselines) is one
  run (:func:`dograph_jax.train.single_run.train_run`); an offline one
  (``stratified``, ``temperature``, ``doremi``, ``doge``, ``regmix``,
  ``mixing_law``, ``rnb``) runs its whole pipeline of proxy runs (or R&B's
  regrouping) and the final run (``dograph_jax/train/offline.py``).
  """
  if methods.kind(cfg.method) == "offline":
    return offline.run(cfg)
  return train_run(cfg)


def main(argv: Sequence[str] | None = None) -> int:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                      datefmt="%H:%M:%S", force=True)
  for noisy in ("absl", "orbax", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  cfg = parse_config(argv, description=__doc__.splitlines()[0])
  distributed.maybe_initialize_distributed()  # several hosts only; before any JAX call
  if jax.default_backend() == "cpu":  # no per-step page faults of XLA:CPU temporaries
    from dograph_jax.train.allocator import tune_cpu_malloc
    log.info("CPU allocator: %s", tune_cpu_malloc())
  try:
    train(cfg)
  except NonFiniteLossError as e:
    log.error("%s", e)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
