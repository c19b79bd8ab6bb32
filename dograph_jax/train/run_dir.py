"""Who may write a run directory, and what a new run does with an old one.

A run directory (``--out_dir``) has **one owner**: :class:`RunLock` holds an
exclusive ``fcntl`` lock on ``<out_dir>/.lock`` for the whole run and writes
the owner's process id, host and start time into it. A second process that
tries to write the same directory is refused at once with that owner named.
The kernel releases the lock when its process ends, however it ends (a
SIGKILL included), so a lock file left by a killed run is *stale*: the next
run finds it unlocked and takes it over, saying whose it was.

A **new** run (no ``--resume``) into a directory that already holds a run is
refused (:func:`prepare`), unless ``--overwrite`` asks to replace it: the old
run is then moved aside *as a whole* to ``<out_dir>.replaced-<time>`` (never
mixed with the new one, never deleted by us).

Locks are advisory and local: they protect against two trainers of this
package on one machine (or on a file system with working ``flock``, which
many network file systems do not provide).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger("pretrain")

LOCK_NAME = ".lock"
# What makes a directory hold a run (written by the trainer).
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "checkpoints", "stages")


class RunDirectoryBusy(RuntimeError):
  """Another live process owns the run directory."""


class RunLock:
  """Exclusive ownership of a run directory while the ``with`` block runs.

  Raises:
    RunDirectoryBusy: another process holds the lock (its pid, host and
      start time are in the message).
  """

  def __init__(self, out_dir: str | Path):
    self.path = Path(out_dir) / LOCK_NAME
    self._fd: int | None = None

  def __enter__(self) -> RunLock:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise
      raise RunDirectoryBusy(
          f"{self.path.parent} is being written by {describe_owner(self.path)}; two runs "
          "in one directory would mix their metrics and checkpoints. Wait for it to end, "
          "stop it, or use another --out_dir.") from None
    previous = read_owner(self.path)
    if previous and previous.get("pid") != os.getpid():
      log.info("taking over the stale lock of %s (process %s on %s ended without releasing "
               "it)", self.path.parent, previous.get("pid"), previous.get("host"))
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
    os.fsync(fd)
    self._fd = fd
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      # The file stays (removing it would race with a process that has just
      # opened it), emptied: only a run that did not get here (killed)
      # leaves its owner record behind, the mark of a stale lock.
      os.ftruncate(self._fd, 0)
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


def read_owner(path: Path) -> dict:
  """The owner record of a lock file ({} if absent or unreadable)."""
  try:
    return json.loads(path.read_text() or "{}")
  except (OSError, ValueError):
    return {}


def describe_owner(path: Path) -> str:
  owner = read_owner(path)
  if not owner:
    return "another process"
  return (f"process {owner.get('pid')} on {owner.get('host')} (started "
          f"{owner.get('started')})")


def holds_run(out_dir: str | Path) -> list[str]:
  """The run files present in ``out_dir`` (empty: no run there)."""
  out_dir = Path(out_dir)
  return [name for name in RUN_FILES if (out_dir / name).exists()]


def prepare(out_dir: str | Path, *, resume: bool, overwrite: bool) -> None:
  """Makes ``out_dir`` ready for a run: refuses to start a new run over an
  old one unless ``overwrite`` (then the old one is moved aside whole).
  Call it while holding the directory's :class:`RunLock`.

  Raises:
    FileExistsError: ``out_dir`` holds a run and neither ``resume`` nor
      ``overwrite`` is set (the message names what it holds and the fixes).
  """
  out_dir = Path(out_dir)
  present = holds_run(out_dir)
  if resume or not present:
    return
  if not overwrite:
    raise FileExistsError(
        f"{out_dir} already holds a run ({', '.join(present)}). Pass --resume to continue "
        "it, --overwrite to replace it (the old run is moved to "
        f"{out_dir.name}.replaced-<time> beside it), or choose another --out_dir.")
  aside = out_dir.with_name(f"{out_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
  aside.mkdir()
  for entry in out_dir.iterdir():
    if entry.name != LOCK_NAME:
      entry.rename(aside / entry.name)
  log.warning("--overwrite: moved the previous run in %s to %s", out_dir, aside)
