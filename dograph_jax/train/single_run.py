"""One training run: data, model, the jitted loop, checkpoints, logs, summary.

:func:`train_run` trains (or resumes) one run of an online method
(``dograph``, ``uniform``, the online baselines and the offline pipelines'
proxy runs). ``experiments/pretrain.py`` is the command line and dispatches
the offline pipelines (``dograph_jax/train/offline.py``), which call
:func:`train_run` for each of their stages; both import this module and it
imports neither, so the import graph has no circle.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dograph_jax import agreement, sharding
from dograph_jax.data import (DynamicMixIterator, FileSplit, SkipCounts, load_tokenizer, with_context,
                              make_eval_batches, make_train_iterator, pack_split_cached,
                              resolve_proportions, train_bpe_tokenizer, write_synthetic_corpus)
from dograph_jax.models import count_params
from dograph_jax.train import distributed, methods, reporting, run_dir, training
from dograph_jax.train.checkpointing import CheckpointSaveError, Checkpointer
from dograph_jax.train.method import MixerState
from dograph_jax.train import config
from dograph_jax.train.config import TrainConfig
from dograph_jax.train.tracking import Progress, Tracker

log = logging.getLogger("pretrain")
DEFAULT_DATA_DIR = TrainConfig().data.data_dir


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
  rows: dict = dataclasses.field(default_factory=dict)  # name -> training rows (sequences)
  probe_tokens: np.ndarray | None = None  # (D, P, L + 1) Aioli's held-out rows
  val_missing: list[str] = dataclasses.field(default_factory=list)  # training domains without validation rows
  tokenizer: Any = None     # the run's tokenizer (saved into the run directory)
  # Each evaluated domain's share of the validation split's tokens: the
  # weights of the natural-mixture perplexity. From the validation split, so
  # that every labelling of a corpus (e.g. its coarse-label version, whose
  # hidden source has no training label) weighs the same domains alike.
  token_shares: dict = dataclasses.field(default_factory=dict)
  # What the run trains and is judged on (corpus_changes compares two):
  # domain names, rows per domain, and the packing fingerprints of both
  # splits (texts, tokenizer, seq_len; see CORPUS_FINGERPRINT).
  corpus: dict = dataclasses.field(default_factory=dict)


# The definition of the split fingerprints in RunData.corpus: 2 since the
# packed rows are cached by file metadata (issue 24). Version 1 hashed the
# texts domain after domain, which a streamed reading cannot reproduce; a
# record of version 1 is compared on its domains and rows only.
CORPUS_FINGERPRINT = 2


def _tokenizer(cfg: TrainConfig, train):
  """The run's tokenizer: ``--tokenizer``, the one cached for the corpus, or
  a byte-level BPE trained on the documents of ``train`` (a split source),
  streamed (BPE training counts words, so the reading order does not
  matter)."""
  if cfg.data.tokenizer:
    return load_tokenizer(cfg.data.tokenizer)
  cached = cfg.data.tokenizer_cache()
  if (cached / "tokenizer.json").exists():
    log.info("using the tokenizer cached in %s", cached)
    return load_tokenizer(cached)
  log.info("training a byte-level BPE tokenizer (vocab %d) on %s -> %s",
           cfg.data.vocab_size, train.where, cached)
  texts = (text for _, text in train.documents(SkipCounts()))
  return train_bpe_tokenizer(texts, cached, vocab_size=cfg.data.vocab_size)


def data_splits(cfg: TrainConfig) -> tuple[Any, Any]:
  """The train and validation split sources of ``cfg`` (nothing is read):
  ``FileSplit`` of ``--data_dir`` (the bundled synthetic corpus is written
  first if it is the default and absent), or ``HFSplit`` of ``--hf_dataset``.

  Raises:
    FileNotFoundError, ValueError: a missing folder or split, or an
      ``--hf_dataset`` that is neither local nor cached.
  """
  fields = dict(domain_field=cfg.data.domain_field, text_field=cfg.data.text_field)
  if cfg.data.hf_dataset:
    from dograph_jax.data.hf import hf_splits  # imports datasets (slow): only when asked
    train, val = hf_splits(cfg.data.hf_dataset, ("train", "validation"),
                           cache_dir=cfg.data.hf_cache_dir, **fields)
  else:
    data_dir = Path(cfg.data.data_dir)
    if cfg.data.data_dir == DEFAULT_DATA_DIR and not data_dir.exists():
      log.info("generating the bundled synthetic corpus in %s", data_dir)
      # Write aside and rename, so an interrupted generation is never mistaken
      # for the corpus by the next run.
      partial = data_dir.with_name(data_dir.name + ".partial")
      shutil.rmtree(partial, ignore_errors=True)
      write_synthetic_corpus(partial, seed=0)
      partial.rename(data_dir)
    train, val = FileSplit(data_dir, "train", **fields), FileSplit(data_dir, "validation", **fields)
  for split in (train, val):  # a missing folder or split fails here, before any work
    split.signature()
  return train, val


def load_data(cfg: TrainConfig) -> RunData:
  """The run's data. With the tokenizer and both splits' packed rows cached,
  no document is read: the rows are memory-mapped from the cache, and the
  token counts (proportions, token shares) and skip counts come from its
  metadata (``pack_split_cached``)."""
  train_split, val_split = data_splits(cfg)
  tokenizer = _tokenizer(cfg, train_split)
  cache = cfg.data.packing_cache()
  packed, train_skips = pack_split_cached(train_split, tokenizer, cfg.optim.seq_len, cache)
  # A validation domain too short for one row is left out with a warning,
  # like a missing one (val_missing), not an error about training data.
  packed_val, val_skips = pack_split_cached(val_split, tokenizer, cfg.optim.seq_len, cache,
                                            drop_short=True)
  resolved = resolve_proportions(packed, dict(cfg.data.proportions) or cfg.data.sampling)
  corpus = {"domains": list(packed.names), "rows": dict(zip(packed.names, packed.num_rows)),
            "train": packed.fingerprint, "validation": packed_val.fingerprint,
            "fingerprint_version": CORPUS_FINGERPRINT}
  probe = None
  if methods.kind(cfg.method) == "online" and "probe_losses" in _mixer(cfg, len(packed.names)).needs:
    packed, probe = _hold_out_probe(packed, cfg.offline.probe_rows)
  log.info("domains: %s", ", ".join(
      f"{n} ({r} rows, p={resolved[n]:.3f})" for n, r in zip(packed.names, packed.num_rows)))
  log.info("skipped records: train %s, validation %s", train_skips.as_dict(),
           val_skips.as_dict())
  for reason in methods.inert_settings(cfg.method, cfg.method_args, cfg.optim.steps):
    log.warning("this run trains as uniform does: %s", reason)
  # --eval_domains validation: the validation split's own domains (a run on
  # regrouped clusters is judged on the human domains, like every other run).
  own = cfg.data.eval_domains == "validation"
  eval_batches = make_eval_batches(packed_val, cfg.optim.batch_size,
                                   max_rows_per_domain=cfg.run.eval_rows or None,
                                   domain_names=None if own else packed.names)
  missing = [] if own else [n for n in packed.names if n not in eval_batches]
  if len(missing) == len(packed.names):
    raise ValueError(f"the validation split {val_split.where} has no rows of any training "
                     f"domain ({', '.join(packed.names)}): nothing to evaluate")
  if missing:
    log.warning("the validation split has no rows of training domain(s) %s: their "
                "validation loss is not measured and the average perplexity is over "
                "the other %d domain(s) (summary.json: val_missing)",
                ", ".join(missing), len(packed.names) - len(missing))
  evaluated = [n for n in packed_val.names if n in eval_batches]
  val_tokens = dict(zip(packed_val.names, packed_val.tokens_per_domain))
  total = sum(val_tokens[n] for n in evaluated)
  return RunData(
      token_shares={n: val_tokens[n] / total for n in evaluated},
      corpus=corpus,
      names=list(packed.names),
      train_iter=(DynamicMixIterator if samples(cfg, len(packed.names)) else make_train_iterator)(
          packed, cfg.optim.batch_size, proportions=resolved, seed=cfg.run.seed,
          **distributed.host_data_shard()),
      eval_batches=eval_batches,
      vocab_size=len(tokenizer),
      proportions=resolved,
      rows=dict(zip(packed.names, packed.num_rows)),
      probe_tokens=probe,
      val_missing=missing,
      tokenizer=tokenizer)


def _mixer(cfg: TrainConfig, num_domains: int):
  static, traced = methods.parse_method_args(cfg.method, cfg.method_args)
  return methods.build_mixer(cfg.method, num_domains, static, traced)


def samples(cfg: TrainConfig, num_domains: int) -> bool:
  """Whether the run draws each batch with its method's current proportions
  (an online mixer in the ``sample`` form, or DoGraph with ``--apply_weights
  sample``; DoGraph's ``paper`` form weights the batch)."""
  if cfg.method == "dograph":
    return cfg.apply_weights == "sample"
  if methods.kind(cfg.method) != "online":
    return False
  return methods.weights_form(cfg.method, cfg.apply_weights,
                               _mixer(cfg, num_domains).form) == "sample"


def _hold_out_probe(packed, rows: int):
  """Moves the last ``rows`` training rows of every domain into a probe set
  ``(D, rows, L + 1)`` (Aioli's held-out losses): they are not trained on,
  and the validation split stays untouched for the reported perplexities."""
  short = [n for n, r in zip(packed.names, packed.rows) if len(r) <= 2 * rows]
  if short:
    raise ValueError(f"--probe_rows {rows}: domain(s) {short} have too few training rows "
                     f"to hold {rows} out (need more than {2 * rows})")
  probe = np.stack([r[-rows:] for r in packed.rows])
  kept = dataclasses.replace(packed, rows=[r[:-rows] for r in packed.rows])
  return kept, probe


def batch_drawer(cfg: TrainConfig, data: RunData):
  """``draw(state) -> batch``: the next training batch of ``data.train_iter``.

  In the sample form (``data.train_iter`` a ``DynamicMixIterator``) the
  sampler first gets the method's proportions for step ``state.step``,
  computed from ``state`` (the state after the previous step): a small
  device-to-host copy per step, which waits for the previous step to finish.
  """
  if not isinstance(data.train_iter, DynamicMixIterator):
    return lambda state: next(data.train_iter)
  base = np.asarray([data.proportions[n] for n in data.names])
  proportions_of = training.make_proportions_fn(cfg, base)

  def draw(state):
    p = jax.device_get(proportions_of(state.method, state.step))
    data.train_iter.set_proportions(np.asarray(p, np.float64))
    return next(data.train_iter)
  return draw


def _restore_newest_intact(checkpointer: Checkpointer, abstract, cfg: TrainConfig, data: RunData):
  """``(step, state, data state, meta, corrupt steps)`` of the newest checkpoint
  that restores, or None without any checkpoint.

  Each checkpoint's settings and corpus are compared with the run's before
  its state is read (a refusal names them: ``check_resumable``,
  :func:`check_corpus`). One that cannot be read (a missing or truncated
  file) is skipped for the next older one, with a warning naming both.

  Raises:
    ValueError: changed settings or corpus, a checkpoint older than 0.2, or
      no readable checkpoint at all (the message lists each step's error).
  """
  steps = sorted(checkpointer.all_steps(), reverse=True)
  if not steps:
    return None
  corrupt, errors = [], []
  for step in steps:
    try:
      saved_meta = checkpointer.restore_meta(step)
    except Exception as e:  # pylint: disable=broad-except  (orbax raises many kinds)
      corrupt.append(step)
      errors.append(f"step {step}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
      continue
    saved_config = saved_meta["config"]
    check_resumable(saved_config, cfg)  # before the restore: a clear message, not a shape error
    check_corpus(saved_meta.get("corpus", {"domains": saved_meta.get("domains", data.names)}),
                 data.corpus, f"--resume from {checkpointer.directory}")
    if not any(s in saved_config for s in config.SECTIONS):
      raise ValueError(
          f"--resume: the checkpoint in {checkpointer.directory} was written before the "
          "trainer's state became a typed TrainState (dograph_jax 0.2): its optimizer state "
          "has another structure and cannot be resumed by this version. Its parameters "
          "still evaluate and export (python -m dograph_jax.models.export); continue the "
          "run with the version that wrote it, or start a new --out_dir.")
    try:
      state, data_state, meta = checkpointer.restore(step, abstract)
    except Exception as e:  # pylint: disable=broad-except
      corrupt.append(step)
      errors.append(f"step {step}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
      continue
    if corrupt:
      log.warning("--resume: checkpoint(s) %s in %s cannot be read (%s); resuming from step "
                  "%d, the newest intact one (the unreadable ones are moved to "
                  "corrupt_checkpoints/)", corrupt, checkpointer.directory, "; ".join(errors), step)
    return step, state, data_state, meta, corrupt
  raise ValueError(
      f"--resume: no checkpoint in {checkpointer.directory} can be read ({'; '.join(errors)}). "
      "Start a new --out_dir, or --overwrite to move this run aside and start again.")


def load_run_state(run_dir: str | Path, step: int | None = None) -> tuple[training.TrainState, dict, TrainConfig]:
  """``(train state, checkpoint meta, run config)`` of the run in ``run_dir``
  at checkpoint ``step`` (default: the last complete one), restored through
  that run's own config (its model, optimizer and mixer)."""
  run_dir = Path(run_dir)
  config_file = run_dir / "config.json"
  if not config_file.exists():
    raise FileNotFoundError(f"{run_dir} holds no run (no config.json)")
  run_cfg = config.from_dict(json.loads(config_file.read_text()))
  checkpointer = Checkpointer(run_dir / "checkpoints", async_save=False)
  try:
    latest = checkpointer.latest_step()
    if latest is None:
      raise FileNotFoundError(f"{run_dir} has no complete checkpoint")
    step = latest if step is None else step
    meta = checkpointer.restore_meta(step)
    vocab_size = meta["vocab_size"]
    _, _, params = training.build_model(run_cfg, vocab_size)
    tx = training.make_optimizer(run_cfg)
    abstract = jax.eval_shape(lambda p: training.init_train_state(
        p, tx, run_cfg, len(meta["domains"]),
        ref_params=p if run_cfg.method == "doremi_proxy" else None), params)
    state, _, _ = checkpointer.restore(step, abstract)
  finally:
    checkpointer.close()
  return state, meta, run_cfg


def checkpoint_steps(run_dir: str | Path) -> list[int]:
  """The steps of the complete checkpoints of the run in ``run_dir``."""
  checkpointer = Checkpointer(Path(run_dir) / "checkpoints", async_save=False)
  try:
    return sorted(checkpointer.all_steps())
  finally:
    checkpointer.close()


def load_run_params(run_dir: str | Path):
  """The parameters of the last complete checkpoint of the run in ``run_dir``
  (e.g. DoReMi's reference model), restored through that run's own config."""
  return load_run_state(run_dir)[0].params


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
  finite = np.isfinite(losses)  # DoGraph drops (and counts) the others
  record = {"loss": float(m["loss"]), "lr": float(m["lr"]),
            "update_norm": float(m["update_norm"]),
            "train_loss": {n: float(losses[(domain == i) & finite].mean())
                           for i, n in enumerate(names) if ((domain == i) & finite).any()}}
  if "weights" in m:
    record["weights"] = [float(w) for w in m["weights"]]
  if "frequencies" in m:
    record["frequencies"] = [float(p) for p in m["frequencies"]]
  if "sampling_ratio" in m:  # DoGraph's sample form: each group's running mean B a_i
    record["sampling_ratio"] = {n: float(r) for n, r in zip(names, m["sampling_ratio"])}
  if "coefficients" in m:  # each human domain's share of the update (sum of a_i)
    a = np.asarray(m["coefficients"])
    record["update_share"] = {n: float(a[domain == i].sum()) for i, n in enumerate(names)}
  if "assignments" in m:
    assign = np.asarray(m["assignments"])
    record.update(
        cluster_sizes=[int(c) for c in m["counts"]],
        nonfinite=int(m["nonfinite"]),
        ari=agreement.adjusted_rand_index(domain, assign),
        nmi=agreement.normalized_mutual_info(domain, assign))
  return record


# Options that may change between a run and its resumption: they do not
# affect the training trajectory (a different --mesh or --micro_batches
# changes only the order of floating-point sums).
_RESUME_FREE = {"resume", "overwrite", "traceback", "cache_dir", "hf_cache_dir", "halt_after", "out_dir", "eval_every", "eval_rows", "log_every",
                "save_every", "keep_checkpoints", "plots", "mesh", "micro_batches", "trackers",
                "wandb_project"}


# DoGraph's options, and those only one of its domain modes reads: a run
# that does not read an option is not changed by it.
_DOGRAPH_ONLY = {f.name for f in dataclasses.fields(config.DoGraphConfig)} | {"sketch", "update"}
_PERSISTENT_ONLY = {"prior", "decay", "anchor", "max_ratio", "reseed_fraction", "coefficients"}
_BATCH_ONLY = {"warm_start", "buffer_size"}


def _unread_options(cfg: TrainConfig) -> set[str]:
  if cfg.method != "dograph":
    return _DOGRAPH_ONLY | ({"apply_weights"} if methods.kind(cfg.method) != "online" else set())
  return _PERSISTENT_ONLY if cfg.dograph.domains == "batch" else _BATCH_ONLY


def corpus_changes(saved: dict, now: dict) -> list[str]:
  """The differences between two ``RunData.corpus`` records, each named
  (``"domains (saved [...], now [...])"``); empty when they agree. A record
  without a field (an older run) is not compared on it."""
  changes = []
  if "domains" in saved and saved["domains"] != now["domains"]:
    added = [d for d in now["domains"] if d not in saved["domains"]]
    gone = [d for d in saved["domains"] if d not in now["domains"]]
    what = (f"added {added}" if added else "") + (", " if added and gone else "") + (
        f"removed {gone}" if gone else "") or "reordered"
    changes.append(f"domains {what} (saved {saved['domains']}, now {now['domains']})")
  else:
    for name, rows in saved.get("rows", {}).items():
      if now["rows"].get(name) != rows:
        changes.append(f"rows of domain {name!r} (saved {rows}, now {now['rows'].get(name)})")
  # Fingerprints of another definition (an older run's) are not comparable.
  comparable = saved.get("fingerprint_version", 1) == now.get("fingerprint_version", 1)
  for split in ("train", "validation"):
    if comparable and saved.get(split) and now.get(split) and saved[split] != now[split]:
      changes.append(f"the {split} split's texts or tokenizer (packing fingerprint saved "
                     f"{saved[split][:12]}, now {now[split][:12]})")
  return changes


def check_corpus(saved: dict, now: dict, where: str) -> None:
  """Raises ``ValueError`` naming every difference of the corpus records."""
  changes = corpus_changes(saved, now)
  if changes:
    raise ValueError(f"{where}: the corpus changed since it was written: " + "; ".join(changes)
                     + ". Continuing would train on other data (shifted domain ids, other "
                     "rows). Restore the corpus, or start a new --out_dir.")


def finished_summary(run_dir: str | Path, cfg: TrainConfig) -> dict | None:
  """The summary of the finished run in ``run_dir`` if it is *this* run:
  ``None`` if it has not finished; the same settings (``check_resumable``)
  and the same corpus (the summary's ``corpus`` record against
  ``load_data(cfg)``'s) are required, else ``ValueError`` names what differs.
  What studies and offline pipelines reuse instead of retraining."""
  run_dir = Path(run_dir)
  done = run_dir / "summary.json"
  if not done.exists() or not (run_dir / "config.json").exists():
    return None
  check_resumable(json.loads((run_dir / "config.json").read_text()), cfg)
  summary = json.loads(done.read_text())
  if "corpus" in summary:
    check_corpus(summary["corpus"], load_data(cfg).corpus, f"finished run {run_dir}")
  return summary


def check_resumable(saved: dict, cfg: TrainConfig) -> None:
  current = config.flatten(cfg)
  # An option the checkpoint's code did not have yet is read at its default;
  # a config of before the sections (flat, string-typed) reads as today's.
  saved = config.flatten(config.from_dict(saved))
  ignored = _RESUME_FREE | _unread_options(cfg)
  if saved.get("method") != cfg.method or (
      cfg.method == "dograph" and saved.get("domains") != cfg.dograph.domains):
    ignored = _RESUME_FREE  # a different method or domain mode is always a change
  changed = sorted(k for k in current if k not in ignored and saved.get(k) != current[k])
  if changed:
    raise ValueError(
        "--resume: the checkpoint was written with different settings for "
        + ", ".join(f"{k} (saved {saved.get(k)!r}, now {current[k]!r})" for k in changed)
        + "; resuming would not continue the same run. Use a new --out_dir.")


@contextlib.contextmanager
def owned_run_dir(cfg: TrainConfig):
  """Holds the run directory's :class:`~dograph_jax.train.run_dir.RunLock`
  (on the main process; other hosts write only their checkpoint shards),
  after refusing a new run over an old one (``run_dir.prepare``)."""
  out_dir = Path(cfg.run.out_dir)
  if not distributed.is_main_process():
    out_dir.mkdir(parents=True, exist_ok=True)
    yield
    return
  with run_dir.RunLock(out_dir):
    run_dir.prepare(out_dir, resume=cfg.run.resume, overwrite=cfg.run.overwrite)
    yield


def train_run(cfg: TrainConfig) -> dict:
  """Runs (or resumes) one training run; returns the summary dict.

  The run owns ``--out_dir`` while it runs (``run_dir.RunLock``); a new run
  over an old one is refused unless ``--overwrite``. An offline method
  (``stratified``, ``temperature``, ``doremi``, ``doge``, ``regmix``,
  ``mixing_law``, ``rnb``) is a pipeline of such runs: ``pretrain.train`` runs it.
  """
  if methods.kind(cfg.method) == "offline":
    raise ValueError(f"method {cfg.method!r} is an offline pipeline of several runs: "
                     "use dograph_jax.train.pretrain.train (or offline.run)")
  if jax.process_count() > 1 and not cfg.run.mesh:
    raise ValueError("several processes need --mesh over all hosts' devices, e.g. "
                     f"data={jax.device_count()}")
  with owned_run_dir(cfg):
    return _train_run(cfg)


def _train_run(cfg: TrainConfig) -> dict:
  wall0 = time.perf_counter()
  mesh = sharding.make_mesh(cfg.run.mesh) if cfg.run.mesh else None  # a bad spec fails before any work
  out_dir = Path(cfg.run.out_dir)
  saved = out_dir / "config.json"
  if cfg.run.resume and saved.exists():
    # Compared before anything is restored or rewritten: a refused resume
    # names the changed options and leaves the run directory as it was.
    check_resumable(json.loads(saved.read_text()), cfg)
  # Data and model before config.json: a corpus that fails to load, or a
  # model that cannot take --seq_len, leaves no run behind.
  data = load_data(cfg)
  model_cfg, graphdef, params = training.build_model(cfg, data.vocab_size)
  if distributed.is_main_process():  # other hosts write nothing but their checkpoint shards
    saved.write_text(json.dumps(config.to_dict(cfg), indent=2))
  if distributed.is_main_process() and not (out_dir / "tokenizer" / "tokenizer.json").exists():
    # beside the checkpoints, so evaluation and export find the run's own
    # tokenizer, which truncates at the model's context (model_max_length)
    with_context(data.tokenizer, model_cfg.n_positions).save_pretrained(str(out_dir / "tokenizer"))
  log.info("model %s: %s parameters", cfg.model.name, f"{count_params(params):,}")
  tx = training.make_optimizer(cfg)
  ref_params = None
  if cfg.method == "doremi_proxy":
    if not cfg.offline.reference_dir:
      raise ValueError("--method doremi_proxy needs --reference_dir (a finished reference run)")
    ref_params = load_run_params(cfg.offline.reference_dir)
    if jax.tree.structure(ref_params) != jax.tree.structure(params) or any(
        a.shape != b.shape for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params))):
      raise ValueError(f"the reference model in {cfg.offline.reference_dir} does not match --model "
                       f"{cfg.model.name} with this tokenizer")
  state = training.init_train_state(params, tx, cfg, len(data.names), ref_params=ref_params)
  put = put_train = lambda batch: batch
  step_shardings = {}
  if mesh is not None:
    state_sharding = sharding.state_shardings(state, mesh, params=state.params)
    state = jax.device_put(state, state_sharding)
    put = lambda batch: sharding.shard_batch(batch, mesh)  # eval: the same rows on every host
    # train: each host holds its own rows of the global batch (per-host loading)
    put_train = lambda batch: sharding.shard_host_batch(batch, mesh)
    step_shardings = dict(state_sharding=state_sharding,
                          batch_sharding=sharding.batch_sharding(mesh))
    log.info("mesh %s: %d %s devices, %d process(es)", dict(mesh.shape), mesh.size,
             mesh.devices.flat[0].platform, jax.process_count())
  train_step = training.make_train_step(graphdef, tx, cfg, probe_tokens=data.probe_tokens,
                                        **step_shardings)
  # The sample form: each batch is drawn with the method's proportions of
  # that step, read from the state after the previous step (a small
  # device-to-host copy per step; the step before it must have finished).
  draw = batch_drawer(cfg, data)
  eval_step = training.make_eval_step(graphdef, mesh)

  checkpointer = Checkpointer(out_dir / "checkpoints", keep=cfg.run.keep_checkpoints)
  start, wall_before = 0, 0.0  # wall_before: seconds spent on this run before a resume
  if cfg.run.resume:
    found = _restore_newest_intact(checkpointer, training.abstract_like(state), cfg, data)
    if found is None:
      log.info("--resume: no complete checkpoint in %s; starting from scratch",
               checkpointer.directory)
    else:
      step, state, data_state, meta, corrupt = found
      if corrupt:  # out of orbax's way: the run will save these steps again
        checkpointer.close()
        aside = out_dir / "corrupt_checkpoints"
        aside.mkdir(exist_ok=True)
        for bad in corrupt:
          (checkpointer.directory / str(bad)).rename(aside / f"{bad}-{time.strftime('%Y%m%d-%H%M%S')}")
        checkpointer = Checkpointer(out_dir / "checkpoints", keep=cfg.run.keep_checkpoints)
      if meta.get("process_count", 1) != jax.process_count():
        raise ValueError(
            f"--resume: the checkpoint was written by {meta.get('process_count', 1)} "
            f"process(es), this run has {jax.process_count()}; each host's share of the data "
            "would differ, so the run would not continue exactly. Use a new --out_dir.")
      wall_before = float(meta.get("wall_s", 0.0))
      data.train_iter.set_state(data_state)
      start = int(state.step)
      log.info("resumed from step %d (%s)", start, checkpointer.directory)
  tracker = Tracker(out_dir, resume_step=start if cfg.run.resume else None,
                    sinks=cfg.run.trackers, config=config.to_dict(cfg),
                    wandb_project=cfg.run.wandb_project)
  contingency = np.zeros((len(data.names), cfg.dograph.num_domains), np.int64)
  for r in tracker.records:  # re-accumulate the heatmap of the resumed history
    if "contingency" in r:
      contingency += np.asarray(r["contingency"], np.int64)

  def save(step: int) -> None:
    checkpointer.save(step, state, data.train_iter.get_state(),
                      {"config": config.to_dict(cfg), "step": step,
                       "vocab_size": data.vocab_size, "domains": data.names,
                       "corpus": data.corpus,
                       "process_count": jax.process_count(),
                       "wall_s": wall_before + time.perf_counter() - wall0})

  progress = Progress(start, cfg.optim.steps, cfg.optim.batch_size * cfg.optim.seq_len, cfg.run.log_every)

  def finish(done: int, metrics: dict) -> None:
    """Host-side work for a finished step: NaN check, progress, logs."""
    nonlocal contingency, first_done
    loss = float(metrics["loss"])
    kept_only = " over the samples DoGraph kept" if cfg.method == "dograph" else ""
    if not math.isfinite(loss):
      raise NonFiniteLossError(
          f"non-finite training loss{kept_only} ({loss}) at step {done}; stopping. "
          f"Checkpoints in {checkpointer.directory} hold only steps before it.")
    if not bool(metrics["update_finite"]):
      raise NonFiniteLossError(
          f"non-finite update at step {done} (finite loss {loss:.4g}); it was not applied; "
          f"stopping. Checkpoints in {checkpointer.directory} hold only steps before it.")
    checkpointer.check()  # a failed asynchronous save stops the run now, not at the next save
    if first_done is None:  # the speed in the summary starts after the compiled first step
      first_done = (done, time.perf_counter())
    dropped = int(metrics.get("nonfinite", 0))
    skipped = bool(metrics["skipped"])
    if dropped:
      log.warning("step %d: dropped %d non-finite sample(s) of %d%s", done, dropped,
                  cfg.optim.batch_size, "; step skipped (second_backward cannot leave them out)"
                  if skipped else "")
    progress.update(done - 1, loss)
    if done % cfg.run.log_every == 0 or done == cfg.optim.steps or dropped:
      record = _host_record(metrics, data.names)
      record["skipped"] = int(skipped)
      # seconds since this process's loop began (steady-state speed between
      # two records, without the first step's compilation)
      record["elapsed_s"] = time.perf_counter() - t0
      if cfg.method == "dograph":
        table = agreement.contingency(np.asarray(metrics["domain_id"]),
                                      np.asarray(metrics["assignments"]),
                                      len(data.names), cfg.dograph.num_domains)
        contingency += table
        record["contingency"] = table.tolist()
      tracker.log(done, record)

  t0 = time.perf_counter()
  first_done = None  # (step, time) when the first step of this process had finished
  pending = None  # (step, metrics) of the step whose results are not fetched yet
  failed = False
  try:
    for step in range(start, cfg.optim.steps):
      batch = put_train(draw(state))
      state, metrics = train_step(state, batch)  # dispatched, runs asynchronously
      done = step + 1
      # Fetch the previous step's metrics while this one runs (nanodo-style),
      # so logging never stalls the device.
      if pending is not None:
        finish(*pending)
      pending = (done, metrics)
      evaluating = (cfg.run.eval_every and done % cfg.run.eval_every == 0) or done == cfg.optim.steps
      halting = cfg.run.halt_after and done - start >= cfg.run.halt_after
      saving = (cfg.run.save_every and done % cfg.run.save_every == 0) or done == cfg.optim.steps or halting
      if not (evaluating or saving):
        continue
      finish(*pending)  # this step's loss is checked before anything is saved
      pending = None
      if evaluating:
        val = evaluate(eval_step, state.params, data.eval_batches, put)
        tracker.log(done, {"val_loss": val,
                           "val_ppl": {n: reporting.perplexity(v) for n, v in val.items()}})
      if saving:
        save(done)
      if halting:
        log.info("halting after step %d as asked (--halt_after %d)", done, cfg.run.halt_after)
        return {"halted_at": done}
  except BaseException:
    failed = True
    raise
  finally:
    progress.close()
    tracker.close()
    try:
      checkpointer.close()
    except CheckpointSaveError:
      if not failed:  # else the error on its way out already says it
        raise

  # Steady speed: from the end of this process's first step (which includes
  # the compilation) to the end; the whole loop if only one step ran.
  elapsed = time.perf_counter() - t0
  steps_run = cfg.optim.steps - start
  if first_done is not None and first_done[0] < cfg.optim.steps:
    elapsed = time.perf_counter() - first_done[1]
    steps_run = cfg.optim.steps - first_done[0]
  final = [r for r in tracker.records if "val_loss" in r][-1]["val_loss"]
  summary = {"method": cfg.method, "objective": cfg.dograph.objective, "model": cfg.model.name,
             "method_args": dict(cfg.method_args), "proportions": data.proportions,
             "steps": cfg.optim.steps, "steps_per_s": steps_run / elapsed if elapsed else 0.0,
             "wall_s": wall_before + time.perf_counter() - wall0,  # whole run, resumes included
             "tokens_per_s": steps_run * cfg.optim.batch_size * cfg.optim.seq_len / elapsed if elapsed else 0.0,
             "val_loss": final, "token_shares": data.token_shares, "corpus": data.corpus,
             **reporting.perplexities(final, data.token_shares),
             "val_missing": data.val_missing,  # left out of the averages (warned)
             # the failure policy's counts over the whole run (resumes included)
             "nonfinite_samples": sum(int(r.get("nonfinite", 0)) for r in tracker.records),
             "skipped_steps": sum(int(r.get("skipped", 0)) for r in tracker.records)}
  mixing = isinstance(state.method, MixerState)
  if mixing:  # the time-averaged domain weights (DoReMi/DoGE's output)
    mixer = jax.device_get(state.method.mixer)
    summary["mixer_average"] = dict(zip(
        data.names, (np.asarray(mixer.weights_sum) / max(int(mixer.count), 1)).tolist()))
    summary["mixer_final"] = dict(zip(data.names, np.asarray(mixer.weights).tolist()))
  title = (f"{cfg.method}{'/' + cfg.dograph.objective if cfg.method == 'dograph' else ''} "
           f"{cfg.model.name}, {cfg.optim.steps} steps, batch {cfg.optim.batch_size} x {cfg.optim.seq_len}")
  if not distributed.is_main_process():
    return summary
  text = reporting.summary_table(title, final, summary["steps_per_s"], shares=data.token_shares)
  (out_dir / "summary.txt").write_text(text + "\n")
  (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
  if cfg.run.plots:
    plots = reporting.write_plots(tracker.records, out_dir, data.names,
                                  contingency if cfg.method == "dograph" else None,
                                  weight_labels=data.names if mixing else None)
    summary["plots"] = [str(p) for p in plots]
  print(text)
  return summary
