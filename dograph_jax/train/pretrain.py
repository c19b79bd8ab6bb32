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

A mistake in the settings, the data or the run directory ends the run with
one paragraph naming the problem and the fix (exit code 2); a run that fails
on its way (non-finite loss, a checkpoint that cannot be written) with exit
code 1. ``--traceback`` shows the full traceback instead.
"""

from __future__ import annotations

import logging
import sys
from typing import Sequence


import jax

from dograph_jax.train import distributed, methods, offline
from dograph_jax.train.config import TrainConfig, parse_config
from dograph_jax.train.checkpointing import CheckpointSaveError
from dograph_jax.train.run_dir import RunDirectoryBusy
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
  show_traceback = "--traceback" in (sys.argv[1:] if argv is None else argv)
  try:
    cfg = parse_config(argv, description=__doc__.splitlines()[0])
    distributed.maybe_initialize_distributed()  # several hosts only; before any JAX call
    if jax.default_backend() == "cpu":  # no per-step page faults of XLA:CPU temporaries
      from dograph_jax.train.allocator import tune_cpu_malloc
      log.info("CPU allocator: %s", tune_cpu_malloc())
    train(cfg)
  except USER_ERRORS + RUN_FAILURES as e:
    if show_traceback:
      raise
    log.error("%s\n(%s; --traceback shows where it was raised)", e, type(e).__name__)
    return 2 if isinstance(e, USER_ERRORS) else 1
  return 0


# Errors that a person fixes in the settings, the data or the run directory
# (exit code 2), and runs that failed on their way (exit code 1). Anything
# else is a bug: its traceback is shown.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, RunDirectoryBusy)
RUN_FAILURES = (NonFiniteLossError, CheckpointSaveError)


if __name__ == "__main__":
  sys.exit(main())
