"""Runs that never lose or mix results (issue 23): one owner per run
directory, no silent reuse of an old run, resume that compares before it
writes, a corrupt checkpoint skipped for an intact one, divergence reported,
a failed save that stops the run, and errors a person can act on."""

from __future__ import annotations

import errno
import gc
import json
import logging
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from dograph_jax.data import read_split, write_synthetic_corpus
from dograph_jax.train import config, pretrain, run_dir, single_run
from dograph_jax.train.checkpointing import CheckpointSaveError, Checkpointer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_synthetic_corpus(tmp_path_factory.mktemp("corpus"), seed=1, total_docs=200)


def _cfg(corpus, out_dir, **kw):
  base = dict(data_dir=str(corpus), vocab_size=300, model="mini", steps=4, batch_size=4,
              seq_len=16, eval_every=0, eval_rows=4, save_every=2, log_every=1,
              warmup_steps=1, lr=3e-3, method="uniform", out_dir=str(out_dir), plots=False)
  base.update(kw)
  return config.make_config(**base)


_HOLD = textwrap.dedent("""
    import sys, time
    from dograph_jax.train.run_dir import RunLock
    with RunLock(sys.argv[1]):
      print("locked", flush=True)
      time.sleep(120)
""")


def _holder(out_dir: Path) -> subprocess.Popen:
  """Another process that owns ``out_dir`` (until killed)."""
  proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(out_dir)], stdout=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline().strip() == "locked"
  return proc


def test_second_writer_is_refused_and_a_killed_owners_lock_is_taken_over(corpus, tmp_path):
  out = tmp_path / "run"
  holder = _holder(out)
  try:
    with pytest.raises(run_dir.RunDirectoryBusy, match=f"process {holder.pid}"):
      single_run.train_run(_cfg(corpus, out))
    assert not (out / "config.json").exists()  # the refused run wrote nothing
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # The killed owner left its record; the lock itself died with it.
  assert run_dir.read_owner(out / run_dir.LOCK_NAME)["pid"] == holder.pid
  summary = single_run.train_run(_cfg(corpus, out))
  assert summary["steps"] == 4
  assert run_dir.read_owner(out / run_dir.LOCK_NAME) == {}  # released on a normal end


def test_new_run_over_an_old_one_is_refused_unless_overwrite(corpus, tmp_path):
  out = tmp_path / "run"
  cfg = _cfg(corpus, out)
  single_run.train_run(config.replace(cfg, halt_after=2))  # an unfinished run, as if killed
  run_files = lambda: {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ".lock"}
  before = run_files()
  with pytest.raises(FileExistsError, match="--resume to continue it, --overwrite"):
    single_run.train_run(cfg)
  assert run_files() == before  # untouched
  single_run.train_run(config.replace(cfg, overwrite=True))
  moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
  assert len(moved) == 1
  # The old run moved whole: its checkpoint of step 2 and its 2 steps of metrics.
  assert (moved[0] / "checkpoints" / "2").is_dir()
  old = [json.loads(line) for line in (moved[0] / "metrics.jsonl").read_text().splitlines()]
  assert max(r["step"] for r in old) == 2
  new = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in new if "loss" in r] == [1, 2, 3, 4]


def test_refused_resume_leaves_config_byte_identical(corpus, tmp_path):
  out = tmp_path / "run"
  cfg = _cfg(corpus, out)
  single_run.train_run(config.replace(cfg, halt_after=2))
  text = (out / "config.json").read_bytes()
  with pytest.raises(ValueError, match=r"batch_size \(saved 4, now 8\)"):
    single_run.train_run(config.replace(cfg, resume=True, batch_size=8))
  assert (out / "config.json").read_bytes() == text


def test_a_changed_corpus_is_refused_by_name(corpus, tmp_path):
  data = tmp_path / "data"

  def write(keep):  # the corpus's records of the domains `keep`, one file per split
    for split in ("train", "validation"):
      (data / split).mkdir(parents=True, exist_ok=True)
      docs, _ = read_split(corpus, split)
      (data / split / "part.jsonl").write_text("".join(
          json.dumps({"text": t, "domain": name}) + "\n"
          for name in sorted(keep) for t in docs[name]))
  write({"code", "prose", "numbers"})
  out = tmp_path / "run"
  cfg = _cfg(data, out)
  single_run.train_run(config.replace(cfg, halt_after=2))
  write({"code", "prose", "numbers", "dna"})  # a domain is added to the corpus
  with pytest.raises(ValueError, match=r"the corpus changed.*domains added \['dna'\]"):
    single_run.train_run(config.replace(cfg, resume=True))


def test_a_corrupt_latest_checkpoint_falls_back_to_the_newest_intact_one(corpus, tmp_path, caplog):
  straight = tmp_path / "straight"
  single_run.train_run(_cfg(corpus, straight, steps=6, keep_checkpoints=3))
  out = tmp_path / "run"
  cfg = _cfg(corpus, out, steps=6, keep_checkpoints=3)
  single_run.train_run(config.replace(cfg, halt_after=4))  # checkpoints 2 and 4
  # Damage checkpoint 4: truncate one array file of its state.
  files = sorted(p for p in (out / "checkpoints" / "4" / "state").rglob("*") if p.is_file()
                 and p.stat().st_size > 64 and "d" in p.parent.name)
  assert files
  for f in files:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  summary = single_run.train_run(config.replace(cfg, resume=True))
  assert "checkpoint(s) [4]" in caplog.text and "resuming from step 2" in caplog.text
  assert (out / "corrupt_checkpoints").is_dir()
  # From step 2 the run is the same as the one never interrupted.
  a = json.loads((straight / "summary.json").read_text())["val_loss"]
  assert summary["val_loss"] == a


def test_divergence_is_reported_not_a_crash(corpus, tmp_path, monkeypatch):
  monkeypatch.setattr(single_run, "evaluate",
                      lambda step, params, batches, put=None: {n: 800.0 for n in batches})
  out = tmp_path / "run"
  summary = single_run.train_run(_cfg(corpus, out))
  assert summary["average"] == float("inf") and summary["worst"] == float("inf")
  assert json.loads((out / "summary.json").read_text())["average"] == float("inf")
  assert (out / "checkpoints" / "4").is_dir()
  for bad in (dict(lr=-1.0), dict(lr=float("nan")), dict(lr=0.0)):
    with pytest.raises(ValueError, match="--lr must be a finite number > 0"):
      config.make_config(**bad)


def test_a_failed_save_stops_the_run_and_keeps_the_last_good_checkpoint(corpus, tmp_path,
                                                                         monkeypatch):
  real_save = Checkpointer.save

  def full_disk(self, step, *args):
    if step >= 4:  # the file system fills up after the checkpoint of step 2
      raise CheckpointSaveError(self._failed(
          f"saving the checkpoint of step {step}", OSError(errno.ENOSPC, "No space left on device")))
    return real_save(self, step, *args)

  # One level lower as well: the manager's write itself fails.
  out = tmp_path / "run"
  cfg = _cfg(corpus, out, steps=6)
  monkeypatch.setattr(Checkpointer, "save", full_disk)
  with pytest.raises(CheckpointSaveError, match=r"No space left.*step 2, is intact.*--resume"):
    single_run.train_run(cfg)
  monkeypatch.setattr(Checkpointer, "save", real_save)
  records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  assert max(r["step"] for r in records) == 4  # stopped at the failed save, not later
  summary = single_run.train_run(config.replace(cfg, resume=True))
  assert summary["steps"] == 6


def test_checkpointer_turns_a_writer_error_into_one_message(tmp_path, monkeypatch):
  ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
  ckpt.save(1, {"x": np.zeros(3)}, {}, {})

  def broken(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(ckpt._manager, "save", broken)
  with pytest.raises(CheckpointSaveError, match=r"step 2 .*No space left.*step 1, is intact"):
    ckpt.save(2, {"x": np.zeros(3)}, {}, {})
  ckpt.close()


@pytest.fixture
def root_handlers():
  """main() reconfigures logging to this test's captured stderr: put the
  handlers back afterwards (later tests would log to a closed stream)."""
  root = logging.getLogger()
  saved, level = root.handlers[:], root.level
  yield
  root.handlers[:] = saved
  root.setLevel(level)


def _records_of(err: str, *names: str) -> list[str]:
  """The log records in ``err`` (``HH:MM:SS logger: message``, continuation
  lines included) of the loggers ``names`` (and their children)."""
  records = re.split(r"(?m)^(?=\d\d:\d\d:\d\d \S+: )", err)
  return [r for r in records if r.split(" ", 2)[1:2]
          and r.split(" ", 2)[1].rstrip(":").split(".")[0] in names]


def test_user_errors_exit_2_with_one_paragraph(corpus, tmp_path, capsys, root_handlers):
  # Tasks an earlier test's orbax restore left unfinished are collected now,
  # not while main() logs to this test's stderr (asyncio logs a "Task
  # exception was never retrieved" traceback when it collects one).
  gc.collect()
  capsys.readouterr()
  out = tmp_path / "run"
  args = ["--data_dir", str(corpus), "--vocab_size", "300", "--steps", "2", "--batch_size", "4",
          "--seq_len", "16", "--method", "uniform", "--no_plots", "--out_dir", str(out)]
  assert pretrain.main(args) == 0
  assert pretrain.main(args) == 2  # a second run into the same directory
  err = capsys.readouterr().err  # main() logs to stderr
  ours = "".join(_records_of(err, "pretrain", "dograph_jax"))
  assert "already holds a run" in ours and "Traceback" not in ours
  with pytest.raises(FileExistsError):
    pretrain.main(args + ["--traceback"])
  assert pretrain.main(args[:-2] + ["--out_dir", str(tmp_path / "x"),
                                    "--data_dir", str(tmp_path / "nothing")]) == 2
  assert not (tmp_path / "x" / "config.json").exists()  # no run left behind


def test_negative_method_args_are_refused():
  with pytest.raises(ValueError, match="burn_in=.*non-negative"):
    config.make_config(method="loss_based", method_args={"burn_in": "-5"})


def test_a_sigkilled_run_is_not_silently_replaced(corpus, tmp_path):
  """A training process killed mid-run: rerunning it without --resume is
  refused (its checkpoints are not overwritten), --resume takes over its
  stale lock and continues."""
  out = tmp_path / "run"
  args = ["--data_dir", str(corpus), "--vocab_size", "300", "--steps", "400", "--batch_size",
          "4", "--seq_len", "16", "--method", "uniform", "--no_plots", "--save_every", "2",
          "--eval_every", "0", "--out_dir", str(out)]
  proc = subprocess.Popen([sys.executable, "-c",
                           "import sys; from dograph_jax.train import pretrain; "
                           "sys.exit(pretrain.main(sys.argv[1:]))", *args],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "4").is_dir():  # two complete checkpoints
      assert proc.poll() is None and time.monotonic() < deadline, "the run did not get going"
      time.sleep(0.2)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert run_dir.read_owner(out / run_dir.LOCK_NAME)["pid"] == proc.pid  # a stale lock
  steps = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit())
  cfg = config.from_dict(json.loads((out / "config.json").read_text()))  # the same run
  with pytest.raises(FileExistsError, match="already holds a run"):
    single_run.train_run(cfg)
  assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == steps
  summary = single_run.train_run(config.replace(cfg, resume=True, halt_after=2))
  assert summary["halted_at"] >= 6


def test_a_finished_run_is_reused_only_for_the_same_settings_and_corpus(corpus, tmp_path):
  data = tmp_path / "data"

  def write(keep):
    for split in ("train", "validation"):
      (data / split).mkdir(parents=True, exist_ok=True)
      docs, _ = read_split(corpus, split)
      (data / split / "part.jsonl").write_text("".join(
          json.dumps({"text": t, "domain": name}) + "\n" for name in sorted(keep) for t in docs[name]))
  write({"code", "prose"})
  out = tmp_path / "run"
  cfg = _cfg(data, out, steps=2)
  summary = single_run.train_run(cfg)
  assert single_run.finished_summary(out, cfg) == summary
  assert single_run.finished_summary(tmp_path / "elsewhere", cfg) is None
  with pytest.raises(ValueError, match=r"lr \(saved 0.003, now 0.01\)"):
    single_run.finished_summary(out, config.replace(cfg, lr=1e-2))
  write({"code", "prose", "dna"})  # same settings, another corpus
  with pytest.raises(ValueError, match=r"finished run .* the corpus changed.*added \['dna'\]"):
    single_run.finished_summary(out, cfg)


def test_a_validation_domain_too_short_for_a_row_is_left_out_with_a_warning(corpus, tmp_path,
                                                                             caplog):
  data = tmp_path / "data"
  for split in ("train", "validation"):
    (data / split).mkdir(parents=True)
    docs, _ = read_split(corpus, split)
    records = [{"text": t, "domain": n} for n in ("code", "prose") for t in docs[n]]
    if split == "validation":
      records.append({"text": "tiny", "domain": "dna"})  # a few tokens: less than a row
    else:
      records += [{"text": t, "domain": "dna"} for t in docs["dna"]]
    (data / split / "part.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  run = single_run.load_data(_cfg(data, tmp_path / "run"))
  assert run.names == ["code", "dna", "prose"]
  assert run.val_missing == ["dna"] and set(run.eval_batches) == {"code", "prose"}
  assert "'dna' has" in caplog.text and "left out" in caplog.text
