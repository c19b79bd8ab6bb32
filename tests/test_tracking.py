"""The tracker's sinks: metrics.jsonl, TensorBoard and W&B (offline), each
read back from what it wrote; the sink registry and its errors.

Fast (seconds) and offline: W&B runs with ``WANDB_MODE=offline`` and all its
directories under ``tmp_path``, and its files are parsed here, so nothing
reaches a network or the user's W&B settings.
"""

from __future__ import annotations

import json
import struct
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dograph_jax.train import tracking
from dograph_jax.train.tracking import JsonlSink, TensorBoardSink, Tracker, WandbSink


def _events(log_dir: Path) -> list:
  """Every ``Event`` of the event files in ``log_dir``, file by file in name
  order (TensorBoard's). TFRecord framing: an 8-byte length, its 4-byte CRC,
  the payload, its 4-byte CRC. No TensorBoard reader is installed (only
  tensorboardX, which writes), hence this one."""
  from tensorboardX.proto.event_pb2 import Event
  out = []
  for path in sorted(log_dir.glob("events.out.tfevents.*")):
    data, pos = path.read_bytes(), 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      out.append(Event.FromString(data[pos + 12:pos + 12 + length]))
      pos += 12 + length + 4
  return out


def _wandb_records(path: Path) -> list:
  """The ``Record`` protos of an offline run's ``.wandb`` file.

  wandb (0.31) keeps no Python reader of its own file; the format is
  LevelDB's log: a 7-byte file header (":W&B", magic 0xBEE1, version 0),
  then 32 KiB blocks of chunks, each a 7-byte header (CRC, length, type:
  1 full, 2 first, 3 middle, 4 last) and its bytes; a block's tail shorter
  than a header is padding.
  """
  from wandb.proto import wandb_internal_pb2
  data = path.read_bytes()
  assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
  block, header = 32768, 7
  pos, pending, out = 7, b"", []
  while pos + header <= len(data):
    if block - pos % block < header:
      pos += block - pos % block
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + header])
    if kind == 0:  # zero-filled rest of the last block
      break
    pending += data[pos + header:pos + header + length]
    pos += header + length
    if kind in (1, 4):
      out.append(wandb_internal_pb2.Record.FromString(pending))
      pending = b""
  return out


def _wandb_history_and_config(path: Path) -> tuple[list[dict], dict]:
  """The history rows (W&B's own ``_...`` keys left out) and the config of
  an offline run's ``.wandb`` file.

  Read once the file holds the run's ``exit`` record (its last): wandb-core
  writes the file from its own process, and right after ``run.finish()`` the
  file was sometimes its 7-byte header alone (this test failed so in 1 of 3
  runs alone and in one CI run; a loop of 6 runs caught one such file). A
  file that never gets it fails here after a minute."""
  deadline = time.monotonic() + 60
  while True:
    try:  # a file being written may end inside a record
      if any(r.WhichOneof("record_type") == "exit" for r in _wandb_records(path)):
        break
    except Exception:
      pass
    assert time.monotonic() < deadline, f"{path}: no exit record after 60 s"
    time.sleep(0.1)
  rows, config = [], {}
  for record in _wandb_records(path):
    kind = record.WhichOneof("record_type")
    if kind == "history":
      row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json)
             for item in record.history.item}
      rows.append({k: v for k, v in row.items() if not k.startswith("_")})
    updates = (record.run.config.update if kind == "run"
               else record.config.update if kind == "config" else [])
    for item in updates:
      config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
  return rows, config


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
  """W&B offline and silent, every directory it touches under ``tmp_path``
  (not ~/.config/wandb or ~/.cache), and a bounded start: with no network
  and offline mode it has nothing to wait for, but a stuck wandb-core
  service would fail the test in a minute instead of hanging it."""
  pytest.importorskip("wandb")
  home = tmp_path / "wandb_home"
  for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
    monkeypatch.setenv(name, str(home / name.lower()))
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  monkeypatch.setenv("WANDB_INIT_TIMEOUT", "60")
  monkeypatch.delenv("WANDB_API_KEY", raising=False)
  yield home
  # Stop wandb's service and its threads here, not at interpreter exit: left
  # running, they outlive this file and share the process with every later test.
  import wandb
  wandb.teardown()


def test_jsonl_keeps_one_history_on_resume(tmp_path):
  path = tmp_path / "metrics.jsonl"
  # Steps 1-3 and a line cut short by a kill: the restored step is 2.
  path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n'
                  '{"step": 3, "loss": 1.0}\n{"step": 4, "lo')
  tracker = Tracker(tmp_path, resume_step=2, sinks=["jsonl"], enabled=True,
                    config={"lr": 0.1, "out": tmp_path})
  assert [type(s) for s in tracker.sinks] == [JsonlSink]
  assert tracker.records == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}]
  tracker.log(3, {"loss": 1.5, "val_loss": {"d0": 2.5}})
  tracker.close()
  tracker.close()  # a second close is harmless
  assert tracking.read_records(path) == [
      {"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0},
      {"step": 3, "loss": 1.5, "val_loss": {"d0": 2.5}}]
  # The config went nowhere: metrics.jsonl stays one record per step, and no
  # other file appeared (the trainer's config.json holds it).
  assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]

  # A fresh run (no resume_step) starts the file over.
  tracker = Tracker(tmp_path, sinks=["jsonl"], enabled=True)
  assert tracker.records == []
  tracker.log(1, {"loss": 9.0})
  tracker.close()
  assert tracking.read_records(path) == [{"step": 1, "loss": 9.0}]


def test_tensorboard_has_the_scalar_tags_and_the_config(tmp_path):
  config = {"lr": 0.1, "model": {"width": 8}, "mesh": ("data", 2), "out": tmp_path}
  tracker = Tracker(tmp_path, sinks=("tensorboard",), config=config, enabled=True)
  assert [type(s) for s in tracker.sinks] == [TensorBoardSink]
  tracker.log(1, {"loss": 2.0, "weights": [0.25, 0.75], "val_loss": {"d0": 1.5, "name": "x"},
                  "contingency": [[1, 2], [3, 4]], "skipped": 0})
  tracker.log(2, {"loss": 1.0})
  tracker.close()
  assert not (tmp_path / "metrics.jsonl").exists()

  events = _events(tmp_path / "tensorboard")
  scalars = sorted((e.step, v.tag, round(v.simple_value, 6))
                   for e in events for v in e.summary.value if v.HasField("simple_value"))
  assert scalars == [(1, "loss", 2.0), (1, "skipped", 0.0), (1, "val_loss/d0", 1.5),
                     (1, "weights/0", 0.25), (1, "weights/1", 0.75), (2, "loss", 1.0)]
  texts = [(e.step, v.tag, v.tensor.string_val[0].decode())
           for e in events for v in e.summary.value if v.metadata.plugin_data.plugin_name == "text"]
  assert len(texts) == 1 and texts[0][:2] == (0, "config/text_summary")
  # Indented as a Markdown code block; the JSON itself is the config, with
  # plain values (a tuple as a list, a path as its string).
  assert json.loads(textwrap.dedent(texts[0][2])) == {
      "lr": 0.1, "model": {"width": 8}, "mesh": ["data", 2], "out": str(tmp_path)}

  # A resume from step 1 starts a second event file that tells TensorBoard
  # to hide the first file's events from step 2 on, and logs the config at
  # the restart step.
  tracker = Tracker(tmp_path, resume_step=1, sinks=("tensorboard",), config={"lr": 0.2},
                    enabled=True)
  tracker.log(2, {"loss": 0.5})
  tracker.close()
  assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
  new = _events(tmp_path / "tensorboard")[len(events):]
  assert any(e.HasField("session_log") and e.session_log.status == e.session_log.START
             and e.step == 2 for e in new)
  assert [(e.step, v.tag) for e in new for v in e.summary.value] == [
      (1, "config/text_summary"), (2, "loss")]


def test_default_sinks_and_the_tensorboard_switch(tmp_path):
  tracker = Tracker(tmp_path, enabled=True)
  assert [type(s) for s in tracker.sinks] == [JsonlSink, TensorBoardSink]
  tracker.close()
  tracker = Tracker(tmp_path, tensorboard=False, enabled=True)
  assert [type(s) for s in tracker.sinks] == [JsonlSink]
  tracker.close()
  assert tracking.sink_names("jsonl, wandb,jsonl") == ["jsonl", "wandb"]
  assert set(tracking.SINKS) == {"jsonl", "tensorboard", "wandb"}


@pytest.mark.parametrize("enabled", [True, False])
def test_an_unknown_sink_fails_naming_the_choices(tmp_path, enabled):
  # On every process, before anything is written.
  with pytest.raises(ValueError, match=r"unknown tracker sink\(s\) 'mlflow'; "
                                       r"choose from 'jsonl', 'tensorboard', 'wandb'"):
    Tracker(tmp_path, sinks=("jsonl", "mlflow"), enabled=enabled)
  assert list(tmp_path.iterdir()) == []


def test_wandb_missing_names_the_extra(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
  with pytest.raises(ImportError, match=r'pip install "dograph_jax\[wandb\]"'):
    Tracker(tmp_path, sinks=("jsonl", "wandb"), enabled=True)


def test_wandb_offline_run_holds_config_and_history_and_resumes(tmp_path, offline_wandb):
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  config = {"lr": 0.1, "model": {"width": 8}, "out": run_dir}
  tracker = Tracker(run_dir, sinks=("jsonl", "wandb"), config=config, enabled=True)
  sink = tracker.sinks[1]
  assert isinstance(sink, WandbSink) and sink.mode == "offline"  # from WANDB_MODE
  run_id = (run_dir / "wandb_id").read_text().strip()
  assert sink.run_id == sink.run.id == run_id
  assert sink.run.project == "dograph_jax" and sink.run.name == "run"
  tracker.log(1, {"loss": 2.0, "weights": [0.25, 0.75], "val_loss": {"d0": 1.5},
                  "contingency": [[1, 2], [3, 4]]})
  tracker.log(2, {"loss": 1.0, "val_loss": {"d0": 1.25}})
  summary = dict(sink.run.summary)
  assert (summary["step"], summary["loss"], summary["val_loss/d0"]) == (2, 1.0, 1.25)
  assert sink.run.config["model"] == {"width": 8} and sink.run.config["out"] == str(run_dir)
  tracker.close()

  # The offline run lives in the run directory (not $WANDB_DIR): its
  # .wandb file holds the config and both rows, nested keys as "key/name".
  (first,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}")
  rows, stored = _wandb_history_and_config(first / f"run-{run_id}.wandb")
  assert rows == [{"step": 1, "loss": 2.0, "weights/0": 0.25, "weights/1": 0.75,
                   "val_loss/d0": 1.5},
                  {"step": 2, "loss": 1.0, "val_loss/d0": 1.25}]
  assert {k: stored[k] for k in config} == {"lr": 0.1, "model": {"width": 8}, "out": str(run_dir)}
  assert not offline_wandb.joinpath("wandb_dir").exists()

  # A resume continues the same W&B run (a second offline directory with
  # the same id; `wandb sync` uploads both into one run). The directory is
  # named by its start time to the second: a resume in the second the first
  # run started (which no real run is short enough for) would reuse it.
  time.sleep(1.1)
  tracker = Tracker(run_dir, resume_step=1, sinks=("jsonl", "wandb"), config={"lr": 0.2},
                    enabled=True)
  assert tracker.sinks[1].run_id == run_id
  assert tracker.records == [{"step": 1, "loss": 2.0, "weights": [0.25, 0.75],
                              "val_loss": {"d0": 1.5}, "contingency": [[1, 2], [3, 4]]}]
  tracker.log(2, {"loss": 0.5})
  tracker.close()
  second = [d for d in (run_dir / "wandb").glob(f"offline-run-*-{run_id}") if d != first]
  assert len(second) == 1
  rows, stored = _wandb_history_and_config(second[0] / f"run-{run_id}.wandb")
  assert rows == [{"step": 2, "loss": 0.5}] and stored["lr"] == 0.2

  # A fresh run in the same directory is a new W&B run.
  tracker = Tracker(run_dir, sinks=("wandb",), wandb_mode="disabled", enabled=True)
  assert tracker.sinks[0].mode == "disabled"
  tracker.close()
  assert (run_dir / "wandb_id").read_text().strip() != run_id


def test_off_the_main_process_wandb_creates_nothing(tmp_path, offline_wandb):
  tracker = Tracker(tmp_path / "run", sinks=("jsonl", "tensorboard", "wandb"),
                    config={"lr": 0.1}, enabled=False)
  tracker.log(1, {"loss": 1.0})
  tracker.close()
  assert tracker.sinks == [] and tracker.records == [{"step": 1, "loss": 1.0}]
  assert not (tmp_path / "run").exists()
