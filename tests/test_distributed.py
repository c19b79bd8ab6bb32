"""Several processes: host-local batches, process-0-only writing, and a real
two-process ``jax.distributed`` run on this machine.

JAX fixes its device count at the first JAX operation of a process, and a
process joins a distributed run only once, so the multi-device parts run in
child processes: this module runs itself as a script
(``PYTHONPATH=. python tests/test_distributed.py MODE ...``), which sets the
flags first and writes what it saw to a JSON file for the tests to check.

* ``devices8``: one process with 8 CPU devices. With one process the local
  batch is the global batch, so ``shard_host_batch`` must give each device
  the rows that ``batch_sharding`` assigns it (device ``k`` of the mesh in
  row-major order holds rows ``[k B / 8, (k + 1) B / 8)``) and agree with
  ``shard_batch``.
* ``multi``: two processes with 2 CPU devices each, joined by
  ``maybe_initialize_distributed`` from the ``JAX_*`` variables (coordinator
  on localhost, CPU collectives over gloo). Each loads its own shard of the
  train iterator and assembles the global batch with ``shard_host_batch``;
  a jitted sum and a ``shard_map`` psum over the 4 devices of both processes
  must equal the sum of the single-host iterator's batch (computed in numpy),
  and the all-gathered global batch must be that batch's rows.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from dograph_jax import sharding
from dograph_jax.data import PackedDomains, make_train_iterator
from dograph_jax.train import config, distributed, tracking, single_run

ROOT = Path(__file__).resolve().parents[1]
MESHES_8 = ("data=4,fsdp=2", "data=8,fsdp=1", "data=1,fsdp=8")
SIZES = (40, 20, 10)  # rows per domain of the toy data (divisible by 2)
PROPORTIONS = {"d0": 0.5, "d1": 0.25, "d2": 0.25}
BATCH = 8  # global
STEPS = 3
CHILD_TIMEOUT_S = 180


def _toy_packed(sizes=SIZES, seq_len=3) -> PackedDomains:
  """Row r of domain d holds ``10**6 d + 10 r + k`` (as in test_data.py)."""
  rows = [(np.arange(n)[:, None] * 10 + np.arange(seq_len + 1)[None, :] + 10**6 * d)
          .astype(np.int32) for d, n in enumerate(sizes)]
  return PackedDomains(names=[f"d{d}" for d in range(len(sizes))], rows=rows,
                       tokens_per_domain=[n * (seq_len + 1) for n in sizes], seq_len=seq_len)


def _row_ids(tokens) -> list[list[int]]:
  t0 = np.asarray(tokens)[:, 0].astype(np.int64)
  return sorted([int(t // 10**6), int(t % 10**6) // 10] for t in t0)


# --------------------------------------------------------------------------
# Children.


def _devices8(out: str) -> None:
  assert jax.device_count() == 8, jax.devices()
  rng = np.random.default_rng(0)
  batch = {"tokens": rng.integers(0, 1000, (16, 3)).astype(np.int32),
           "domain_id": np.arange(16, dtype=np.int32)}
  info = {}
  for spec in MESHES_8:
    mesh = sharding.make_mesh(spec)
    got = sharding.shard_host_batch(batch, mesh)
    direct = sharding.shard_batch(batch, mesh)
    via_distributed = distributed.global_batch(batch, mesh)
    position = {d: k for k, d in enumerate(mesh.devices.flat)}  # row-major
    per_device_ok = True
    for key, x in got.items():
      for shard in x.addressable_shards:
        k = position[shard.device]
        rows = slice(2 * k, 2 * k + 2)  # 16 rows / 8 devices, in mesh order
        per_device_ok &= (shard.index[0] == rows
                          and np.array_equal(np.asarray(shard.data), batch[key][rows]))
    info[spec] = {
        "shapes": {k: list(v.shape) for k, v in got.items()},
        "dtypes": {k: str(v.dtype) for k, v in got.items()},
        "sharding_ok": all(v.sharding.is_equivalent_to(sharding.batch_sharding(mesh), v.ndim)
                           for v in got.values()),
        "values_ok": all(np.array_equal(np.asarray(got[k]), batch[k]) for k in batch),
        "per_device_ok": bool(per_device_ok),
        "equals_shard_batch": all(
            np.array_equal(np.asarray(got[k]), np.asarray(direct[k]))
            and got[k].sharding.is_equivalent_to(direct[k].sharding, got[k].ndim)
            and np.array_equal(np.asarray(via_distributed[k]), batch[k]) for k in batch),
    }
  mesh = sharding.make_mesh(MESHES_8[0])
  try:  # 12 rows cannot go to 8 devices
    sharding.shard_host_batch({"tokens": np.zeros((12, 4), np.int32)}, mesh)
    info["indivisible_error"] = None
  except ValueError as e:
    info["indivisible_error"] = str(e)
  Path(out).write_text(json.dumps(info))


def _multi(out: str, shared: str) -> None:
  assert distributed.maybe_initialize_distributed()  # from the JAX_* variables
  from jax.experimental import multihost_utils
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

  shard = distributed.host_data_shard()
  info = {"process_index": jax.process_index(), "process_count": jax.process_count(),
          "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
          "is_main": distributed.is_main_process(), "shard": shard, "steps": []}
  packed = _toy_packed()
  it = make_train_iterator(packed, BATCH, proportions=PROPORTIONS, seed=3, **shard)
  single = make_train_iterator(packed, BATCH, proportions=PROPORTIONS, seed=3)  # the oracle
  mesh = sharding.make_mesh("data=2,fsdp=2")
  replicated = sharding.replicated(mesh)
  total = jax.jit(lambda b: b["tokens"].sum(), out_shardings=replicated)
  # Each device sums its rows; psum over both mesh axes, i.e. all 4 devices
  # of both processes (a cross-process all-reduce over gloo).
  psum = jax.jit(jax.shard_map(lambda t: jax.lax.psum(t.sum(), sharding.AXES), mesh=mesh,
                               in_specs=P(sharding.AXES), out_specs=P()))
  # No TensorBoard: tensorboardX imports torch, seconds of a child's time
  # (test_tracker_and_progress_write_only_on_process_0 covers it).
  tracker = tracking.Tracker(Path(shared), tensorboard=False)
  for step in range(STEPS):
    local = next(it)
    want = next(single)
    batch = sharding.shard_host_batch(local, mesh)
    gathered = multihost_utils.process_allgather(batch["tokens"], tiled=True)
    info["steps"].append({
        "local_ids": _row_ids(local["tokens"]),
        "global_shape": list(batch["tokens"].shape),
        "global_ids": _row_ids(gathered),
        "want_ids": _row_ids(want["tokens"]),
        "sum": int(total(batch)),
        "psum": int(psum(batch["tokens"])),
        "want_sum": int(want["tokens"].astype(np.int64).sum()),
        "fully_addressable": bool(batch["tokens"].is_fully_addressable),
    })
    tracker.log(step + 1, {"loss": float(step)})
  tracker.close()
  info["iterator_state"] = it.get_state()
  Path(out).write_text(json.dumps(info))
  jax.distributed.shutdown()


def _train(out: str, cfg_json: str) -> None:
  """``pretrain.train`` in one of two processes; writes its summary (or error)."""
  assert distributed.maybe_initialize_distributed()
  from dograph_jax.train import pretrain
  cfg = config.from_dict(json.loads(cfg_json))
  try:
    result = {"summary": pretrain.train(cfg)}
  except ValueError as e:
    result = {"error": str(e)}
  result["process_index"] = jax.process_index()
  Path(out).write_text(json.dumps(result))
  jax.distributed.shutdown()


# --------------------------------------------------------------------------
# Parent.


def _child_env(**extra) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items()
         if k not in (distributed.COORDINATOR, distributed.NUM_PROCESSES, distributed.PROCESS_ID)}
  env.update(JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  env.update(extra)
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_shard_host_batch_on_8_devices(tmp_path):
  out = tmp_path / "devices8.json"
  proc = subprocess.run([sys.executable, __file__, "devices8", str(out)], cwd=ROOT,
                        env=_child_env(), capture_output=True, text=True,
                        timeout=CHILD_TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-4000:]
  info = json.loads(out.read_text())
  for spec in MESHES_8:
    run = info[spec]
    assert run["shapes"] == {"tokens": [16, 3], "domain_id": [16]}, spec
    assert run["dtypes"] == {"tokens": "int32", "domain_id": "int32"}, spec
    assert run["sharding_ok"] and run["values_ok"] and run["per_device_ok"], (spec, run)
    assert run["equals_shard_batch"], spec
  assert "divisible by this process's 8 devices" in info["indivisible_error"]


def test_two_processes_with_jax_distributed(tmp_path):
  """Two real JAX processes (2 CPU devices each) joined over localhost."""
  shared = tmp_path / "run"
  shared.mkdir()
  infos = _two_processes(tmp_path, "multi", str(shared), "process", CHILD_TIMEOUT_S)
  for pid, info in enumerate(infos):
    assert info["process_index"] == pid and info["process_count"] == 2
    assert info["device_count"] == 4 and info["local_device_count"] == 2
    assert info["is_main"] == (pid == 0)
    assert info["shard"] == {"shard_index": pid, "shard_count": 2}
  for step in range(STEPS):
    a, b = (info["steps"][step] for info in infos)
    for s in (a, b):
      assert s["global_shape"] == [BATCH, 4] and not s["fully_addressable"]
      assert s["sum"] == s["psum"] == s["want_sum"], s
      assert s["global_ids"] == s["want_ids"]
      assert len(s["local_ids"]) == BATCH // 2
    # Each process loaded different rows; together, the single-host batch.
    assert not {tuple(r) for r in a["local_ids"]} & {tuple(r) for r in b["local_ids"]}
    assert sorted(a["local_ids"] + b["local_ids"]) == a["want_ids"]
  assert infos[0]["iterator_state"] == infos[1]["iterator_state"]
  # One writer: process 1's Tracker wrote nothing into the shared directory.
  lines = (shared / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(x)["step"] for x in lines] == list(range(1, STEPS + 1))
  assert [p.name for p in shared.iterdir()] == ["metrics.jsonl"]


def _two_processes(tmp_path, mode: str, arg: str, tag: str,
                   timeout_s: int = 2 * CHILD_TIMEOUT_S) -> list[dict]:
  """Runs this module's ``mode`` in two joined processes; their JSON outputs."""
  address = f"localhost:{_free_port()}"
  procs, outs = [], []
  for pid in range(2):
    outs.append(tmp_path / f"{tag}{pid}.json")
    env = _child_env(**{distributed.COORDINATOR: address, distributed.NUM_PROCESSES: "2",
                        distributed.PROCESS_ID: str(pid)})
    procs.append(subprocess.Popen([sys.executable, __file__, mode, str(outs[-1]), arg],
                                  cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE))
  errors = []
  for pid, p in enumerate(procs):
    try:
      _, err = p.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail(f"{tag}: process {pid} did not finish")
    if p.returncode:
      errors.append(f"process {pid} exited {p.returncode}:\n{err[-3000:]}")
  if errors and all("jax_cpu_collectives_implementation" in e and "Unrecognized" in e
                    for e in errors):
    pytest.skip("this jax has no CPU collectives option (gloo): " + errors[0][-300:])
  assert not errors, "\n".join(errors)
  return [json.loads(o.read_text()) for o in outs]


def test_pretrain_train_across_two_processes_saves_resumes_and_refuses(tmp_path):
  """``pretrain.train`` over 2 processes x 2 CPU devices: a collective save
  (halt after 2 of 4 steps, --mesh data=4), a collective restore on another
  mesh (data=2,fsdp=2) that continues the straight two-process run, the same
  metrics on both processes, files written by process 0 only; then a
  one-process resume of that checkpoint is refused. (Two hosts' batches are
  a stratified stream of their own, equal to one host's only under the
  divisibility conditions of ``make_train_iterator``, so the oracle is a
  straight two-process run.)"""
  from dograph_jax.data import write_synthetic_corpus
  from dograph_jax.train import pretrain

  corpus = write_synthetic_corpus(tmp_path / "corpus", seed=1, total_docs=200)
  base = config.make_config(data_dir=str(corpus), vocab_size=300, model="mini", steps=4,
                     batch_size=8, seq_len=32, num_domains=3, sketch_dim=64, eval_every=2,
                     eval_rows=8, save_every=2, log_every=1, warmup_steps=1, plots=False,
                     mesh="data=4")
  single_run.load_data(base)  # caches the tokenizer and packed rows: the processes only read them
  cfg_json = lambda **kw: json.dumps(config.to_dict(config.replace(base, **kw)))
  straight = _two_processes(tmp_path, "train", cfg_json(out_dir=str(tmp_path / "straight")),
                            "straight")
  run = tmp_path / "two"
  first = _two_processes(tmp_path, "train", cfg_json(out_dir=str(run), halt_after=2), "halt")
  assert [r["summary"] for r in first] == [{"halted_at": 2}] * 2
  second = _two_processes(tmp_path, "train", cfg_json(out_dir=str(run), resume=True,
                                                    mesh="data=2,fsdp=2"), "resume")
  a, b = (r["summary"] for r in second)
  assert a["val_loss"] == b["val_loss"] and a["steps"] == b["steps"] == 4  # same on both
  want = straight[0]["summary"]
  assert straight[1]["summary"]["val_loss"] == want["val_loss"]
  for name, loss in want["val_loss"].items():
    assert a["val_loss"][name] == pytest.approx(loss, rel=1e-5)  # the mesh reorders sums only
  losses = lambda d: [(r["step"], r["loss"]) for r in tracking.read_records(d / "metrics.jsonl")
                      if "loss" in r]
  got, ref = losses(run), losses(tmp_path / "straight")
  assert [s for s, _ in got] == [s for s, _ in ref] == [1, 2, 3, 4]  # one history
  np.testing.assert_allclose([x for _, x in got], [x for _, x in ref], rtol=1e-5)
  assert got[:2] == ref[:2]  # before the save: the same mesh, the same numbers
  # Process 0 wrote the run's files; process 1 only its checkpoint shards.
  # (.lock: process 0's ownership of the run directory, released and emptied.)
  assert sorted(p.name for p in run.iterdir() if p.name != "tensorboard") == [
      ".lock", "checkpoints", "config.json", "metrics.jsonl", "summary.json", "summary.txt",
      "tokenizer"]
  assert (run / ".lock").read_text() == ""
  # One process cannot continue what two wrote (each host's share of the data).
  with pytest.raises(ValueError, match="written by 2 process"):
    pretrain.train(config.replace(base, out_dir=str(run), resume=True, mesh=""))


@pytest.fixture
def as_process(monkeypatch):
  """Pretend to be process ``index`` of ``count`` (jax's own functions)."""
  def set_(index: int, count: int):
    monkeypatch.setattr(jax, "process_index", lambda *a, **k: index)
    monkeypatch.setattr(jax, "process_count", lambda *a, **k: count)
  return set_


def test_process_helpers(as_process):
  assert distributed.is_main_process()
  assert distributed.host_data_shard() == {"shard_index": 0, "shard_count": 1}
  as_process(1, 2)
  assert not distributed.is_main_process()
  assert distributed.host_data_shard() == {"shard_index": 1, "shard_count": 2}
  assert distributed.host_batch_size(8) == 4
  with pytest.raises(ValueError, match="not divisible"):
    distributed.host_batch_size(9)
  as_process(0, 2)
  assert distributed.is_main_process()


def test_tracker_and_progress_write_only_on_process_0(as_process, tmp_path, caplog):
  caplog.set_level(logging.INFO, logger="pretrain")
  as_process(1, 2)
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n')
  before = sorted(p.name for p in tmp_path.iterdir())
  tracker = tracking.Tracker(tmp_path, resume_step=1)
  tracker.log(2, {"loss": 1.5, "val_loss": {"d0": 2.0}})
  tracker.close()
  progress = tracking.Progress(0, 2, 16, every=1)
  progress.update(0, 1.5)
  progress.update(1, 1.0)
  progress.close()
  assert not tracker.enabled and not progress.enabled
  assert tracker.records == [{"step": 2, "loss": 1.5, "val_loss": {"d0": 2.0}}]
  # Nothing created, and the main process's file untouched (not truncated).
  assert sorted(p.name for p in tmp_path.iterdir()) == before
  assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2
  assert not caplog.records

  as_process(0, 2)
  tracker = tracking.Tracker(tmp_path, resume_step=1, tensorboard=False)
  tracker.log(2, {"loss": 1.5})
  tracker.close()
  progress = tracking.Progress(0, 2, 16, every=1)
  progress.update(1, 1.0)
  assert tracker.enabled and progress.enabled
  assert tracking.read_records(tmp_path / "metrics.jsonl") == [
      {"step": 1, "loss": 5.0}, {"step": 2, "loss": 1.5}]
  assert any("loss 1.0000" in r.getMessage() for r in caplog.records)


if __name__ == "__main__":
  # Before any JAX operation (the imports above run none).
  if sys.argv[1] == "devices8":
    jax.config.update("jax_num_cpu_devices", 8)
    _devices8(sys.argv[2])
  elif sys.argv[1] in ("multi", "train"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", 2)
    (_multi if sys.argv[1] == "multi" else _train)(sys.argv[2], sys.argv[3])
  else:
    raise SystemExit(f"unknown mode {sys.argv[1]!r}")
