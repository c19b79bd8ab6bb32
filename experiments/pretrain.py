"""Pretrain a GPT-2 with DoGraph (or a baseline) on a multi-domain corpus.

Default (no arguments): the ``mini`` GPT-2 trained with DoGraph on the bundled
synthetic corpus (generated into ``data/synthetic`` on first use) on the CPU
in a few minutes; prints the per-domain validation summary.

    python experiments/pretrain.py                         # default CPU run
    python experiments/pretrain.py --method uniform        # the baseline
    python experiments/pretrain.py --data_dir /data/slimpajama --tokenizer /tok \\
        --model paper-small --batch_size 48 --seq_len 512 --steps 20000 \\
        --warmup_steps 500 --lr 6e-4 --out_dir runs/paper-small   # GPU host

Every option is ``--name value`` (see ``experiments/configs/pretrain.py``).
The run directory holds ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/``,
``config.json``, ``summary.txt``/``summary.json`` and PNG plots;
``--resume true`` continues from the last complete checkpoint exactly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # `python experiments/pretrain.py`
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np

from dograph_jax import agreement, sharding
from dograph_jax.data import (load_tokenizer, make_eval_batches, make_train_iterator,
                              pack_domains_cached, read_split, resolve_proportions,
                              train_bpe_tokenizer, write_synthetic_corpus)
from dograph_jax.models import count_params
from experiments import distributed, reporting, training
from experiments.checkpointing import Checkpointer
from experiments.configs import TrainConfig, parse_config
from experiments.tracking import Progress, Tracker

log = logging.getLogger("pretrain")
DEFAULT_DATA_DIR = TrainConfig.data_dir


class NonFiniteLossError(RuntimeError):
  """The training loss became NaN or infinite."""


@dataclasses.dataclass
class RunData:
  """Everything the loop needs from the data layer."""
  names: list[str]          # human domain names; position = domain_id
  train_iter: Any           # grain.DatasetIterator of {"tokens", "domain_id"}
  eval_batches: dict        # name -> list of {"tokens", "domain_id", "mask"}
  vocab_size: int
  proportions: dict


def _tokenizer(cfg: TrainConfig, data_dir: Path, train_docs: dict):
  if cfg.tokenizer:
    return load_tokenizer(cfg.tokenizer)
  cached = data_dir / f"tokenizer-bpe-{cfg.vocab_size}"
  if (cached / "tokenizer.json").exists():
    log.info("using the tokenizer cached in %s", cached)
    return load_tokenizer(cached)
  log.info("training a byte-level BPE tokenizer (vocab %d) on the train split -> %s",
           cfg.vocab_size, cached)
  texts = (t for docs in train_docs.values() for t in docs)
  return train_bpe_tokenizer(texts, cached, vocab_size=cfg.vocab_size)


def load_data(cfg: TrainConfig) -> RunData:
  data_dir = Path(cfg.data_dir)
  if cfg.data_dir == DEFAULT_DATA_DIR and not data_dir.exists():
    log.info("generating the bundled synthetic corpus in %s", data_dir)
    # Write aside and rename, so an interrupted generation is never mistaken
    # for the corpus by the next run.
    partial = data_dir.with_name(data_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    write_synthetic_corpus(partial, seed=0)
    partial.rename(data_dir)
  train_docs, train_skips = read_split(data_dir, "train", domain_field=cfg.domain_field)
  val_docs, val_skips = read_split(data_dir, "validation", domain_field=cfg.domain_field)
  tokenizer = _tokenizer(cfg, data_dir, train_docs)
  cache = data_dir / ".packed"
  packed = pack_domains_cached(train_docs, tokenizer, cfg.seq_len, cache)
  packed_val = pack_domains_cached(val_docs, tokenizer, cfg.seq_len, cache)
  resolved = resolve_proportions(packed, cfg.proportions or "natural")
  log.info("domains: %s", ", ".join(
      f"{n} ({r} rows, p={resolved[n]:.3f})" for n, r in zip(packed.names, packed.num_rows)))
  log.info("skipped records: train %s, validation %s", train_skips.as_dict(),
           val_skips.as_dict())
  return RunData(
      names=list(packed.names),
      train_iter=make_train_iterator(packed, cfg.batch_size, proportions=resolved,
                                     seed=cfg.seed),
      eval_batches=make_eval_batches(packed_val, cfg.batch_size,
                                     max_rows_per_domain=cfg.eval_rows or None,
                                     domain_names=packed.names),
      vocab_size=len(tokenizer),
      proportions=resolved)


def evaluate(eval_step, params, eval_batches: dict, put=lambda tokens: tokens) -> dict[str, float]:
  """Mean token loss of each domain's validation rows (padding excluded);
  ``put`` places the tokens (on the mesh)."""
  out = {}
  for name, batches in eval_batches.items():
    total, rows = 0.0, 0
    for batch in batches:
      losses = np.asarray(eval_step(params, put(batch["tokens"])))
      mask = np.asarray(batch["mask"])
      total += float(losses[mask].sum())
      rows += int(mask.sum())
    if rows:
      out[name] = total / rows
  return out


def _host_record(metrics: dict, names: list[str]) -> dict:
  """Scalars of a step's metrics for the logs (fetches them from the device)."""
  m = jax.device_get(metrics)
  losses, domain = np.asarray(m["losses"]), np.asarray(m["domain_id"])
  record = {"loss": float(m["loss"]), "lr": float(m["lr"]),
            "update_norm": float(m["update_norm"]),
            "train_loss": {n: float(losses[domain == i].mean())
                           for i, n in enumerate(names) if (domain == i).any()}}
  if "weights" in m:
    assign = np.asarray(m["assignments"])
    record.update(
        weights=[float(w) for w in m["weights"]],
        cluster_sizes=[int(c) for c in m["counts"]],
        nonfinite=int(m["nonfinite"]),
        ari=agreement.adjusted_rand_index(domain, assign),
        nmi=agreement.normalized_mutual_info(domain, assign))
  return record


# Options that may change between a run and its resumption: they do not
# affect the training trajectory (a different --mesh changes only the order
# of floating-point sums).
_RESUME_FREE = {"resume", "halt_after", "out_dir", "eval_every", "eval_rows", "log_every",
                "save_every", "keep_checkpoints", "plots", "mesh"}


def _check_resumable(saved: dict, cfg: TrainConfig) -> None:
  current = dataclasses.asdict(cfg)
  changed = sorted(k for k in current if k not in _RESUME_FREE and saved.get(k) != current[k])
  if changed:
    raise ValueError(
        "--resume: the checkpoint was written with different settings for "
        + ", ".join(f"{k} (saved {saved.get(k)!r}, now {current[k]!r})" for k in changed)
        + "; resuming would not continue the same run. Use a new --out_dir.")


def train(cfg: TrainConfig) -> dict:
  """Runs (or resumes) training; returns the summary dict."""
  mesh = sharding.make_mesh(cfg.mesh) if cfg.mesh else None  # a bad spec fails before any work
  out_dir = Path(cfg.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
  data = load_data(cfg)
  model_cfg, graphdef, params = training.build_model(cfg, data.vocab_size)
  log.info("model %s: %s parameters", cfg.model, f"{count_params(params):,}")
  tx = training.make_optimizer(cfg)
  state = training.init_train_state(params, tx)
  put, step_shardings = (lambda batch: batch), {}
  if mesh is not None:
    state_sharding = sharding.state_shardings(state, mesh)
    state = jax.device_put(state, state_sharding)
    put = lambda batch: sharding.shard_batch(batch, mesh)
    step_shardings = dict(state_sharding=state_sharding,
                          batch_sharding=sharding.batch_sharding(mesh))
    log.info("mesh %s: %d %s devices, %d process(es)", dict(mesh.shape), mesh.size,
             mesh.devices.flat[0].platform, jax.process_count())
  train_step = training.make_train_step(graphdef, tx, cfg, **step_shardings)
  eval_step = training.make_eval_step(graphdef, mesh)

  checkpointer = Checkpointer(out_dir / "checkpoints", keep=cfg.keep_checkpoints)
  start = 0
  if cfg.resume:
    step = checkpointer.latest_step()
    if step is None:
      log.info("--resume: no complete checkpoint in %s; starting from scratch",
               checkpointer.directory)
    else:
      state, data_state, meta = checkpointer.restore(step, training.abstract_like(state))
      _check_resumable(meta["config"], cfg)
      data.train_iter.set_state(data_state)
      start = int(state["step"])
      log.info("resumed from step %d (%s)", start, checkpointer.directory)
  tracker = Tracker(out_dir, resume_step=start if cfg.resume else None)
  contingency = np.zeros((len(data.names), cfg.num_domains), np.int64)
  for r in tracker.records:  # re-accumulate the heatmap of the resumed history
    if "contingency" in r:
      contingency += np.asarray(r["contingency"], np.int64)

  def save(step: int) -> None:
    checkpointer.save(step, state, data.train_iter.get_state(),
                      {"config": dataclasses.asdict(cfg), "step": step})

  progress = Progress(start, cfg.steps, cfg.batch_size * cfg.seq_len, cfg.log_every)

  def finish(done: int, metrics: dict) -> None:
    """Host-side work for a finished step: NaN check, progress, logs."""
    nonlocal contingency
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
      raise NonFiniteLossError(
          f"non-finite training loss ({loss}) at step {done}; stopping. "
          f"Checkpoints in {checkpointer.directory} hold only steps before it.")
    progress.update(done - 1, loss)
    if done % cfg.log_every == 0 or done == cfg.steps:
      record = _host_record(metrics, data.names)
      if cfg.method == "dograph":
        table = agreement.contingency(np.asarray(metrics["domain_id"]),
                                      np.asarray(metrics["assignments"]),
                                      len(data.names), cfg.num_domains)
        contingency += table
        record["contingency"] = table.tolist()
      tracker.log(done, record)

  t0 = time.perf_counter()
  pending = None  # (step, metrics) of the step whose results are not fetched yet
  try:
    for step in range(start, cfg.steps):
      batch = put(next(data.train_iter))
      state, metrics = train_step(state, batch)  # dispatched, runs asynchronously
      done = step + 1
      # Fetch the previous step's metrics while this one runs (nanodo-style),
      # so logging never stalls the device.
      if pending is not None:
        finish(*pending)
      pending = (done, metrics)
      evaluating = (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps
      halting = cfg.halt_after and done - start >= cfg.halt_after
      saving = (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps or halting
      if not (evaluating or saving):
        continue
      finish(*pending)  # this step's loss is checked before anything is saved
      pending = None
      if evaluating:
        val = evaluate(eval_step, state["params"], data.eval_batches, put)
        tracker.log(done, {"val_loss": val,
                           "val_ppl": {n: math.exp(v) for n, v in val.items()}})
      if saving:
        save(done)
      if halting:
        log.info("halting after step %d as asked (--halt_after %d)", done, cfg.halt_after)
        return {"halted_at": done}
  finally:
    progress.close()
    checkpointer.close()
    tracker.close()

  elapsed = time.perf_counter() - t0
  steps_run = cfg.steps - start
  final = [r for r in tracker.records if "val_loss" in r][-1]["val_loss"]
  summary = {"method": cfg.method, "objective": cfg.objective, "model": cfg.model,
             "steps": cfg.steps, "steps_per_s": steps_run / elapsed if elapsed else 0.0,
             "tokens_per_s": steps_run * cfg.batch_size * cfg.seq_len / elapsed if elapsed else 0.0,
             "val_loss": final, **reporting.perplexities(final)}
  title = (f"{cfg.method}{'/' + cfg.objective if cfg.method == 'dograph' else ''} "
           f"{cfg.model}, {cfg.steps} steps, batch {cfg.batch_size} x {cfg.seq_len}")
  text = reporting.summary_table(title, final, summary["steps_per_s"])
  (out_dir / "summary.txt").write_text(text + "\n")
  (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
  if cfg.plots:
    plots = reporting.write_plots(tracker.records, out_dir, data.names,
                                  contingency if cfg.method == "dograph" else None)
    summary["plots"] = [str(p) for p in plots]
  print(text)
  return summary


def main(argv: Sequence[str] | None = None) -> int:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                      datefmt="%H:%M:%S", force=True)
  for noisy in ("absl", "orbax", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  cfg = parse_config(argv, description=__doc__.splitlines()[0])
  distributed.maybe_initialize_distributed()  # several hosts only; before any JAX call
  try:
    train(cfg)
  except NonFiniteLossError as e:
    log.error("%s", e)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
