"""Atomic, asynchronous checkpoints of a training run (orbax).

One checkpoint per saved step holds three items:

* ``state`` — the train state pytree (parameters, optimizer state including
  DoGraph's centroids, weights and PRNG key, step), ``StandardSave``;
* ``data`` — the data iterator's position, as JSON;
* ``meta`` — the run's config and bookkeeping, as JSON.

orbax writes every checkpoint into a temporary directory and renames it into
place only when all items are complete, so a run killed in the middle of a
save leaves the previous checkpoints intact and resume picks the last
complete one (temporary directories are never listed as steps).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written (disk full, permissions, ...)."""


class Checkpointer:
  """Thin wrapper over ``ocp.CheckpointManager`` for (state, data, meta)."""

  def __init__(self, directory: str | Path, *, keep: int = 2, async_save: bool = True):
    self.directory = Path(directory).absolute()
    # Remove what an interrupted save left behind here, synchronously: orbax's
    # own `cleanup_tmp_directories` runs in a background thread that can race
    # with the next manager opened on the same directory (seen under load).
    if jax.process_index() == 0 and self.directory.exists():
      for partial in self.directory.glob("*.orbax-checkpoint-tmp*"):  # with or without a -timestamp
        shutil.rmtree(partial, ignore_errors=True)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=False),
        item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of the complete checkpoints (temporary directories excluded)."""
    return list(self._manager.all_steps())

  def _failed(self, what: str, error: BaseException) -> CheckpointSaveError:
    good = self.all_steps()
    return CheckpointSaveError(
        f"{what} in {self.directory} failed ({type(error).__name__}: "
        f"{str(error).splitlines()[0][:300] if str(error) else 'no message'}); stopping. "
        + (f"The last complete checkpoint, step {max(good)}, is intact: free space (or fix "
           "the directory) and run again with --resume." if good else
           "No checkpoint of this run is complete yet."))

  def check(self) -> None:
    """Raises :class:`CheckpointSaveError` if an asynchronous save has failed
    (cheap: call it every step, so a failed save stops the run at once)."""
    try:
      self._manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except  (whatever the writer raised)
      raise self._failed("an asynchronous checkpoint save", e) from e

  def save(self, step: int, state: Any, data: dict, meta: dict) -> None:
    """Start saving ``step`` (returns before the write finishes if async).

    Raises:
      CheckpointSaveError: this save, or an earlier asynchronous one, failed.
    """
    self.check()
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
          meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed(f"saving the checkpoint of step {step}", e) from e

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
    """Restore ``step`` into the structure/dtypes of ``abstract_state``."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    return out.state, out.data, out.meta

  def restore_meta(self, step: int) -> dict:
    """Only the ``meta`` item of ``step`` (config, vocabulary, domains)."""
    return self._manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore())).meta

  def wait(self) -> None:
    """Block until pending asynchronous saves are on disk.

    Raises:
      CheckpointSaveError: one of them failed.
    """
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed("finishing an asynchronous checkpoint save", e) from e
    self.check()

  def close(self) -> None:
    """Waits for pending saves, then releases the manager (also when a save
    failed: the error is raised after the manager is closed)."""
    try:
      self.wait()
    finally:
      self._manager.close()
