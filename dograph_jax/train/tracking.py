"""Metric sinks of a run: a JSONL file, TensorBoard (tensorboardX) and a
progress display (a tqdm bar on a terminal, log lines elsewhere).

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
import sys
import time
from pathlib import Path
from typing import Any

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


class Tracker:
  """Writes scalar records to ``metrics.jsonl`` and TensorBoard.

  On resume, records after the restored step (written by the interrupted
  run after its last checkpoint) are dropped so the file describes exactly
  one history.

  Off the main process (``enabled=False``, the default there) it writes,
  reads and creates nothing: ``log`` only appends to ``records`` (which
  then start empty, also on resume: the main process may be rewriting the
  file at that moment).
  """

  def __init__(self, out_dir: Path, *, resume_step: int | None = None, tensorboard: bool = True,
               enabled: bool | None = None):
    """Args: ``enabled``: write files; default: on the main process only."""
    self.enabled = distributed.is_main_process() if enabled is None else enabled
    self.path = out_dir / "metrics.jsonl"
    self._file = self._tb = None
    self.records: list[dict] = []
    if not self.enabled:
      return
    kept = read_records(self.path, up_to_step=resume_step) if resume_step is not None else []
    self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    self.records = kept
    self._file = self.path.open("a")
    if tensorboard:
      from tensorboardX import SummaryWriter  # no TensorFlow needed
      self._tb = SummaryWriter(str(out_dir / "tensorboard"))

  def log(self, step: int, record: dict[str, Any]) -> None:
    record = {"step": int(step), **record}
    self.records.append(record)
    if self._file is None:  # not the main process
      return
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)):
          self._tb.add_scalar(key, value, step)
        elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
          for i, v in enumerate(value):
            self._tb.add_scalar(f"{key}/{i}", v, step)
        elif isinstance(value, dict):
          for name, v in value.items():
            if isinstance(v, (int, float)):
              self._tb.add_scalar(f"{key}/{name}", v, step)

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


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
