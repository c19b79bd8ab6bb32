"""Metric sinks of a run: a JSONL file, TensorBoard (tensorboardX), Weights &
Biases (optional), behind one ``Tracker``; and a progress display (a tqdm bar
on a terminal, log lines elsewhere).

``Tracker(out_dir, sinks=("jsonl", "tensorboard", "wandb"), config=...)``
sends every record to each named sink (``SINKS``; each implements ``Sink``:
``log``, ``log_config``, ``close``). The default is ``metrics.jsonl`` and
TensorBoard.

With several processes (hosts) only the main one (``jax.process_index() ==
0``) writes or prints: every process runs the same trainer, and N writers of
one ``metrics.jsonl`` in a shared run directory would interleave or clobber
each other's lines. The others get a ``Tracker`` that only keeps its records
in memory (the trainer reads them back, e.g. for the final validation loss)
and a silent ``Progress``. The metrics are the same on every process (the
train step returns them replicated), so nothing is lost.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import string
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

from dograph_jax.train import distributed

log = logging.getLogger("pretrain")


def read_records(path: Path, *, up_to_step: int | None = None) -> list[dict]:
  """Records of a metrics JSONL file, optionally only those with step <= N."""
  if not path.exists():
    return []
  text = path.read_text()
  lines = text.split("\n")
  if lines and lines[-1].strip():
    # No newline at the end: a process killed while writing its last record.
    # That record is incomplete; the history before it is whole.
    log.warning("%s: dropping an unfinished last record (%d characters) left by an "
                "interrupted run", path, len(lines[-1]))
  out = []
  for number, line in enumerate(lines[:-1], 1):
    if line.strip():
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {number}: not a JSON record ({e})") from e
      if up_to_step is None or record.get("step", 0) <= up_to_step:
        out.append(record)
  return out


class Sink(Protocol):
  """Where a ``Tracker`` sends a run's records (one per logged step).

  ``log`` gets every record with its ``"step"`` key already set (the same
  value as ``step``); ``log_config`` gets the run's configuration as plain
  JSON values (dicts, lists, strings, numbers, bools, None); ``close``
  flushes and releases whatever the sink holds. A sink is only built on the
  main process, so it may write files and open connections freely.
  """

  def log(self, step: int, record: dict[str, Any]) -> None: ...

  def log_config(self, config: dict[str, Any]) -> None: ...

  def close(self) -> None: ...


def scalars(record: dict[str, Any]) -> Iterator[tuple[str, int | float]]:
  """The plottable numbers of a record, as ``(tag, value)`` pairs.

  A number is its own tag; a list of numbers (e.g. the mixture weights)
  gives ``key/0``, ``key/1``, ...; a dict (e.g. per-domain validation
  losses) gives ``key/name`` for its numeric values. Everything else (the
  ``step`` itself, lists of lists such as the contingency table, strings) is
  left to ``metrics.jsonl``. Shared by TensorBoard and W&B so that both show
  the same tags.
  """
  for key, value in record.items():
    if key != "step" and isinstance(value, (int, float)):
      yield key, value
    elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
      for i, v in enumerate(value):
        yield f"{key}/{i}", v
    elif isinstance(value, dict):
      for name, v in value.items():
        if isinstance(v, (int, float)):
          yield f"{key}/{name}", v


class JsonlSink:
  """``out_dir/metrics.jsonl``: one JSON record per line, each with its step.

  On resume (``resume_step`` set) the records after the restored step,
  written by the interrupted run after its last checkpoint, are dropped, so
  the file describes exactly one history; without ``resume_step`` the file
  starts empty. ``kept`` holds the records that survived.

  ``log_config`` writes nothing: ``read_records`` and the study code
  (``dograph_jax.study``) expect one record per step with a ``"step"`` key,
  so a config line cannot go into this file, and the trainer already writes
  the configuration to ``out_dir/config.json``, which a second copy would
  only risk contradicting.
  """

  def __init__(self, out_dir: Path, *, resume_step: int | None = None):
    self.path = out_dir / "metrics.jsonl"
    self.kept = read_records(self.path, up_to_step=resume_step) if resume_step is not None else []
    # Rewritten whole rather than truncated in place: read_records also left
    # out an unfinished last line of a killed run, which must not stay in
    # front of the records appended from here on.
    self.path.write_text("".join(json.dumps(r) + "\n" for r in self.kept))
    self._file = self.path.open("a")

  def log(self, step: int, record: dict[str, Any]) -> None:
    self._file.write(json.dumps(record) + "\n")
    # Flushed per record: a killed run keeps every record up to the last
    # one, which a resume then trims to the checkpoint.
    self._file.flush()

  def log_config(self, config: dict[str, Any]) -> None:
    """Nothing: see the class docstring (``config.json`` holds it)."""

  def close(self) -> None:
    self._file.close()


class TensorBoardSink:
  """TensorBoard event files in ``out_dir/tensorboard`` (tensorboardX).

  Scalars are tagged as ``scalars`` names them. The config is a text entry
  ``config`` (tab TEXT; in the event file the tag is
  ``config/text_summary``): its JSON, indented by four spaces, because
  TensorBoard renders text as Markdown and an indented block is shown
  verbatim, while bare JSON would be reflowed into one paragraph.

  On resume a new event file starts with ``purge_step = resume_step + 1``:
  TensorBoard then hides the older files' events from that step on (those
  of the interrupted run after its last checkpoint), the same one history
  that ``JsonlSink`` keeps.
  """

  def __init__(self, out_dir: Path, *, resume_step: int | None = None):
    from tensorboardX import SummaryWriter  # no TensorFlow needed; imported late (it is slow)
    self._start = 0 if resume_step is None else resume_step
    # The suffix: tensorboardX names a file by the second and the host only,
    # and opens it with "wb", so a writer started within the same second as
    # the previous one (a quick resume) would erase its events. Nanoseconds
    # keep the names distinct and in order (TensorBoard reads files sorted).
    self._writer = SummaryWriter(str(out_dir / "tensorboard"), filename_suffix=f".{time.time_ns()}",
                                 purge_step=None if resume_step is None else resume_step + 1)

  def log(self, step: int, record: dict[str, Any]) -> None:
    for tag, value in scalars(record):
      self._writer.add_scalar(tag, value, step)

  def log_config(self, config: dict[str, Any]) -> None:
    # At the step the run (re)starts from: a resumed run's config appears as
    # a second entry instead of replacing the first one's.
    text = json.dumps(config, indent=2)
    self._writer.add_text("config", textwrap.indent(text, "    ", lambda line: True), self._start)
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


WANDB_ID_FILE = "wandb_id"
"""The W&B run id, in the run directory: a resumed run continues that run."""


class WandbSink:
  """A Weights & Biases run (the optional dependency ``wandb``).

  ``mode``: ``"online"``, ``"offline"`` or ``"disabled"``; default: the
  ``WANDB_MODE`` environment variable, else ``"offline"``. Offline is the
  safe default: a run never blocks on a network, a login or a server, and
  ``wandb sync OUT_DIR/wandb/offline-run-*`` uploads it later (the several
  directories of a resumed run in order, as one run, since they share the
  id). Pass ``"online"`` (or set ``WANDB_MODE=online``) to stream.

  The run's files go to ``out_dir/wandb``; it is named ``name`` (default:
  the run directory's name). Its id is stored in ``out_dir/wandb_id``: on
  resume (``resume_step`` set) the stored id is reused (``resume="allow"``),
  so the W&B run continues; a fresh run (no ``resume_step``) gets a new id.

  Records are flattened like TensorBoard's tags (``scalars``: ``val_loss/d0``
  rather than W&B's own ``val_loss.d0``). The record's ``step`` is logged as
  a metric and defined as every metric's x-axis, instead of being passed as
  W&B's internal step: W&B drops a row whose internal step is below the
  run's latest, and after a resume the first rows are exactly that (the
  interrupted run logged past its last checkpoint). So W&B keeps every row;
  unlike ``metrics.jsonl`` it also keeps the interrupted run's rows after
  the checkpoint (its history cannot be rewritten), plotted at the same
  steps as the resumed run's.
  """

  def __init__(self, out_dir: Path, *, resume_step: int | None = None,
               project: str = "dograph_jax", name: str | None = None, mode: str | None = None):
    try:
      import wandb
    except ImportError as e:
      raise ImportError('the "wandb" tracker needs Weights & Biases, an optional dependency: '
                        'pip install "dograph_jax[wandb]"') from e
    self.mode = mode or os.environ.get("WANDB_MODE") or "offline"
    id_file = out_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if resume_step is not None and id_file.exists() else ""
    if not run_id:
      # Our own id (W&B allows letters, digits, - and _), written before the
      # run starts so that a run killed at any point can be resumed into it.
      run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
      out_dir.mkdir(parents=True, exist_ok=True)
      id_file.write_text(run_id + "\n")
    self.run_id = run_id
    self.run = wandb.init(project=project, name=name or out_dir.name, dir=str(out_dir),
                          id=run_id, resume="allow", mode=self.mode)
    self.run.define_metric("step")
    self.run.define_metric("*", step_metric="step")

  def log(self, step: int, record: dict[str, Any]) -> None:
    self.run.log({"step": int(step), **dict(scalars(record))})

  def log_config(self, config: dict[str, Any]) -> None:
    # allow_val_change: a resumed run's config may differ from the stored
    # one in what a resume may change (e.g. the resume flag itself).
    self.run.config.update(config, allow_val_change=True)

  def close(self) -> None:
    self.run.finish()


SINKS: dict[str, Callable[..., Sink]] = {
    "jsonl": JsonlSink,
    "tensorboard": TensorBoardSink,
    "wandb": WandbSink,
}
"""The sinks ``Tracker(sinks=...)`` can name. Each is called as
``SINKS[name](out_dir, resume_step=..., **options)``, with options only for
``"wandb"`` (project, name, mode)."""


def sink_names(sinks: str | Sequence[str]) -> list[str]:
  """The names of ``sinks`` (a sequence, or one comma-separated string),
  without repeats; ValueError for a name not in ``SINKS``."""
  if isinstance(sinks, str):
    sinks = sinks.split(",")
  names = list(dict.fromkeys(s.strip() for s in sinks if s.strip()))
  unknown = [n for n in names if n not in SINKS]
  if unknown:
    raise ValueError(f"unknown tracker sink(s) {', '.join(map(repr, unknown))}; "
                     f"choose from {', '.join(map(repr, SINKS))}")
  return names


class Tracker:
  """Sends a run's records to its sinks: by default ``metrics.jsonl`` and
  TensorBoard; ``sinks`` names others from ``SINKS`` (e.g. adds ``"wandb"``).

  On resume (``resume_step`` set) each sink keeps one history (see
  ``JsonlSink``, ``TensorBoardSink``, ``WandbSink``), and ``records`` starts
  with the kept records of ``metrics.jsonl`` (empty without the ``"jsonl"``
  sink: no file is maintained then). ``config``, if given, is logged to
  every sink at the start (converted to plain JSON values first, with
  ``str`` for anything else, e.g. paths).

  Off the main process (``enabled=False``, the default there) it writes,
  reads and creates nothing: ``log`` only appends to ``records`` (which
  then start empty, also on resume: the main process may be rewriting the
  file at that moment).
  """

  def __init__(self, out_dir: Path, *, resume_step: int | None = None, tensorboard: bool = True,
               enabled: bool | None = None, sinks: str | Sequence[str] = ("jsonl", "tensorboard"),
               config: dict[str, Any] | None = None, wandb_project: str = "dograph_jax",
               wandb_mode: str | None = None, wandb_name: str | None = None):
    """Args:
      enabled: write anything; default: on the main process only.
      tensorboard: ``False`` leaves ``"tensorboard"`` out of ``sinks``.
      sinks: names in ``SINKS``, or one comma-separated string.
      config: the run's configuration, logged to every sink.
      wandb_project, wandb_mode, wandb_name: ``WandbSink``'s project, mode
        (default: ``$WANDB_MODE``, else offline) and run name (default: the
        run directory's name).
    """
    # Checked on every process, enabled or not: a misspelt name fails
    # everywhere at once instead of leaving the other hosts waiting for a
    # main process that died.
    names = sink_names(sinks)
    if not tensorboard:
      names = [n for n in names if n != "tensorboard"]
    self.enabled = distributed.is_main_process() if enabled is None else enabled
    self.path = out_dir / "metrics.jsonl"
    self.records: list[dict] = []
    self.sinks: list[Sink] = []
    if not self.enabled:
      return
    options = {"wandb": {"project": wandb_project, "mode": wandb_mode, "name": wandb_name}}
    try:
      for name in names:
        self.sinks.append(SINKS[name](out_dir, resume_step=resume_step, **options.get(name, {})))
      if config is not None:
        self.log_config(config)
    except BaseException:
      self.close()  # the sinks already open (an open W&B run, an event file)
      raise
    for sink in self.sinks:
      if isinstance(sink, JsonlSink):
        self.records = list(sink.kept)

  def log_config(self, config: dict[str, Any]) -> None:
    """Log the run's configuration to every sink (nothing off the main process)."""
    # One plain-JSON copy for all sinks: W&B and json reject paths, tuples
    # would come back as lists from one sink and not another.
    config = json.loads(json.dumps(config, default=str))
    for sink in self.sinks:
      sink.log_config(config)

  def log(self, step: int, record: dict[str, Any]) -> None:
    record = {"step": int(step), **record}
    self.records.append(record)
    for sink in self.sinks:  # none off the main process
      sink.log(step, record)

  def close(self) -> None:
    """Close every sink, even if one fails (the first error is raised)."""
    sinks, self.sinks = self.sinks, []
    error = None
    for sink in sinks:
      try:
        sink.close()
      except Exception as e:  # noqa: BLE001 -- re-raised below, after the others closed
        error = error or e
    if error is not None:
      raise error


class Progress:
  """A tqdm bar with loss and tokens/s on a terminal; log lines otherwise."""

  def __init__(self, start: int, total: int, tokens_per_step: int, every: int,
               enabled: bool | None = None):
    """``enabled``: show anything; default: on the main process only."""
    self.tokens_per_step, self.every, self.total = tokens_per_step, max(every, 1), total
    self._last_time, self._last_step = time.perf_counter(), start
    self._bar = None
    self.enabled = distributed.is_main_process() if enabled is None else enabled
    if self.enabled and sys.stderr.isatty():
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

  def update(self, step: int, loss: float) -> None:
    """Call after step ``step`` (0-based) finished with mean loss ``loss``."""
    if not self.enabled:
      return
    now = time.perf_counter()
    done = step + 1
    if self._bar is not None:
      self._bar.update(done - self._bar.n)
    if done % self.every and done != self.total:
      return
    rate = (done - self._last_step) * self.tokens_per_step / max(now - self._last_time, 1e-9)
    self._last_time, self._last_step = now, done
    if self._bar is not None:
      self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}")
    else:
      log.info("step %d/%d loss %.4f %.0f tok/s", done, self.total, loss, rate)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
