"""Sharding (``dograph_jax.sharding``): a data x FSDP mesh of 8 CPU devices
computes what one device computes, and keeps big leaves sharded.

The sharded train steps need 8 devices, i.e.
``jax.config.update("jax_num_cpu_devices", 8)`` before the first JAX operation
of the process. pytest runs every test module in one process and others
initialise JAX first, so this module runs them in child processes: it runs
itself as a script (``PYTHONPATH=. python tests/test_sharding.py VARIANT
OUT``), which sets the flag first, trains 2 steps on one device and on each
mesh, and writes the numbers to ``OUT.npz`` / ``OUT.json`` for the tests here
to check. Three variants of the step (DoGraph's reference and factored
paths, the uniform baseline), two children at a time: about 120 s of CPU,
60-70 s on 2 idle cores, nearly all of it XLA compiling 8 train steps.

Tolerances (float32). Every sharded reduction (matmuls over the batch and
the model width, the loss mean, the gradient reduce-scatter, K-means sums)
adds in another order, so results agree to rounding, not bitwise. Observed
gaps, relative to each quantity's largest magnitude, on this machine:

* per-sample losses, update norm, DoGraph weights: <= 3.2e-7; DoGraph
  centroids, coefficients: <= 4.9e-6; Adam moments after step 1 (the
  gradients, taken at the same parameters): <= 1.2e-6. Checked at 1e-4, a
  20x to 300x margin, and far below what a wrong reduction gives (leaving
  out one of 8 batch shards changes a batch gradient by about 1/8).
* assignments and cluster counts: equal (only a sample whose two nearest
  centroids tie to rounding could move).
* parameters: not elementwise. Adam moves coordinate j by
  ``lr * m_j / (sqrt(v_j) + eps)``, a ratio that turns rounding noise into
  an O(lr) difference wherever the gradient is as small as ``eps`` = 1e-8:
  exactly-zero gradients computed as noise (the attention key bias — the
  softmax ignores a shift shared by all keys) and sums that cancel. Observed
  up to 1.4e-2 * lr on at most 1e-4 of the coordinates, below 1e-3 * lr on
  all others. So: the difference of the two runs' parameters is < 1e-3 of
  how far the parameters moved (norms; observed <= 9e-5), and at most 0.1% of
  the coordinates differ by more than 1e-3 * lr. For the same reason the
  moments after step 2 (gradients at parameters that already differ so) are
  not compared; step 2's losses and DoGraph weights are.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

import dograph_jax as dg
from dograph_jax import sharding
from dograph_jax.train import config, distributed, training

ROOT = Path(__file__).resolve().parents[1]
N_DEVICES = 8
MESHES = ("data=4,fsdp=2", "data=8,fsdp=1")
# Train-step variants -> TrainConfig overrides and the meshes they run on.
# DoGraph's reference path (vmap(grad)) and the baseline on both meshes; the
# factored engine (the trainer's default) on the FSDP mesh, to bound the time.
VARIANTS = {
    "reference": (dict(method="dograph", sketch="reference"), MESHES),
    "uniform": (dict(method="uniform"), MESHES),
    "factored": (dict(method="dograph", sketch="factored"), MESHES[:1]),
    # The LLaMA family (RMSNorm, RoPE, GQA, SwiGLU, untied head) under FSDP 4.
    "llama_factored": (dict(method="dograph", sketch="factored", model="llama-mini"),
                       ("data=2,fsdp=4",)),
}
# A big kernel of each variant's model that FSDP must shard.
BIG_KERNEL = {"llama_factored": "['h'][0]['mlp']['gate_proj']['kernel']"}
CASES = [(variant, mesh) for variant, (_, meshes) in VARIANTS.items() for mesh in meshes]
STEPS = 2
LR = 3e-3
CONFIG = dict(model="mini", vocab_size=128, batch_size=16, seq_len=16, num_domains=3,
              sketch_dim=32, steps=10, warmup_steps=2, lr=LR, seed=0)


# --------------------------------------------------------------------------
# Child process: the computations on 8 devices.


def _worker(variant: str, out: str) -> None:
  """Train STEPS steps on one device and on each mesh; save what the tests check."""
  assert jax.device_count() == N_DEVICES, jax.devices()
  overrides, meshes = VARIANTS[variant]
  cfg = config.make_config(**{**CONFIG, **overrides})
  rng = np.random.default_rng(0)
  batches = [{"tokens": rng.integers(0, cfg.data.vocab_size, (cfg.optim.batch_size, cfg.optim.seq_len + 1),
                                     dtype=np.int32),
              "domain_id": rng.integers(0, 3, (cfg.optim.batch_size,), dtype=np.int32)}
             for _ in range(STEPS)]
  _, graphdef, params = training.build_model(cfg, cfg.data.vocab_size)
  tx = training.make_optimizer(cfg)
  state0 = training.init_train_state(params, tx, cfg)
  # The trainer jits the step with the state's shardings in and out (so that
  # it stays where it is: same layout every step, one compilation, donated
  # buffers reused) and replicated metrics. Use make_train_step's arguments
  # for it where it has them (the trainer wiring), else jit its function so.
  takes_shardings = "state_sharding" in inspect.signature(training.make_train_step).parameters

  arrays, info = {}, {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state0.params)[0]:
    arrays[f"init|params|{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
  for run in ("single",) + meshes:
    t0 = time.perf_counter()
    state = jax.tree.map(jnp.array, state0)  # a copy: the step donates it
    kwargs = {}
    if run == "single":
      put = lambda b: b
    else:
      mesh = sharding.make_mesh(run)
      intended = sharding.state_shardings(state0, mesh, params=state0.params)
      state = jax.device_put(state, intended)
      put = lambda b, mesh=mesh: sharding.shard_batch(b, mesh)
      kwargs = dict(state_sharding=intended, batch_sharding=sharding.batch_sharding(mesh))
    if takes_shardings or not kwargs:
      step = training.make_train_step(graphdef, tx, cfg, **kwargs)
    else:  # the same jit as the wiring adds to make_train_step
      step = jax.jit(training.make_train_step(graphdef, tx, cfg).__wrapped__, donate_argnums=0,
                     in_shardings=(intended, kwargs["batch_sharding"]),
                     out_shardings=(intended, sharding.replicated(mesh)))
    for i, batch in enumerate(batches):
      state, metrics = step(state, put(batch))
      for key, value in metrics.items():
        arrays[f"{run}|metrics|{i}|{key}"] = np.asarray(value)
      for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        arrays[f"{run}|state|{i}|{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
    info[run] = {"seconds": time.perf_counter() - t0,
                 "compilations": step._cache_size()}  # pylint: disable=protected-access
    if run != "single":
      flat_out = jax.tree_util.tree_flatten_with_path(state)[0]
      flat_want = jax.tree.leaves(intended)
      info[run].update(
          leaves=len(flat_out),
          mismatched=[f"{jax.tree_util.keystr(p)}: {x.sharding.spec} != {w.spec}"
                      for (p, x), w in zip(flat_out, flat_want)
                      if not x.sharding.is_equivalent_to(w, x.ndim)],
          sharded=sorted(jax.tree_util.keystr(p) for p, x in flat_out
                         if not x.sharding.is_fully_replicated),
          replicated_big=sorted(jax.tree_util.keystr(p) for p, x in flat_out
                                if x.sharding.is_fully_replicated
                                and x.size >= sharding.MIN_SHARD_SIZE))
      # One process: its local rows are the whole batch, so per-host
      # assembly must give what shard_batch gives.
      assembled = distributed.global_batch(batches[0], mesh)
      put_directly = sharding.shard_batch(batches[0], mesh)
      info[run]["global_batch_ok"] = all(
          a.shape == b.shape and a.sharding.is_equivalent_to(b.sharding, a.ndim)
          and np.array_equal(np.asarray(a), np.asarray(b))
          for a, b in zip(jax.tree.leaves(assembled), jax.tree.leaves(put_directly)))
      try:  # 12 rows cannot be split over 8 devices
        sharding.shard_batch({"tokens": np.zeros((12, 4), np.int32)}, mesh)
        info[run]["indivisible_batch_error"] = None
      except ValueError as e:
        info[run]["indivisible_batch_error"] = str(e)
  np.savez(out + ".npz", **arrays)
  Path(out + ".json").write_text(json.dumps(info, indent=1))


# --------------------------------------------------------------------------
# Parent: run the children once per session, then check.


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out_dir = tmp_path_factory.mktemp("sharding")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))

  def child(variant):
    out = str(out_dir / variant)
    proc = subprocess.run([sys.executable, __file__, variant, out], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode:
      raise RuntimeError(f"sharding child ({variant}) failed:\n{proc.stdout}\n{proc.stderr}")
    return variant, (dict(np.load(out + ".npz")), json.loads(Path(out + ".json").read_text()))

  # Two at a time: compiling is mostly single-threaded, CI has 2 cores.
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    return dict(pool.map(child, VARIANTS))


def _close(actual, desired, rel, what):
  """Equal up to ``rel`` times the largest magnitude of ``desired``."""
  scale = max(float(np.max(np.abs(desired))), 1e-30)
  np.testing.assert_allclose(actual, desired, rtol=rel, atol=rel * scale, err_msg=what)


def _check_same_training(arrays, run, dograph):
  for i in range(STEPS):
    get = lambda r, key: arrays[f"{r}|metrics|{i}|{key}"]
    for key in ("losses", "loss", "update_norm") + (("weights",) if dograph else ()):
      _close(get(run, key), get("single", key), 1e-4, f"{run} step {i}: {key}")
    if dograph:
      for key in ("assignments", "counts"):
        np.testing.assert_array_equal(get(run, key), get("single", key),
                                      err_msg=f"{run} step {i}: {key}")
    moved_sq = diff_sq = 0.0
    far = size = 0
    for key in [k for k in arrays if k.startswith(f"single|state|{i}|")]:
      want, got = arrays[key], arrays[key.replace("single|", f"{run}|", 1)]
      what = f"{run} step {i}: {key.split('|')[-1]}"
      if key.split("|")[-1].startswith(".params"):  # TrainState.params
        init = arrays["init|params|" + key.split(".params", 1)[1]]
        moved_sq += float(np.sum((want - init) ** 2))
        diff_sq += float(np.sum((got - want) ** 2))
        far += int(np.sum(np.abs(got - want) > 1e-3 * LR))
        size += want.size
      elif not np.issubdtype(want.dtype, np.floating):
        np.testing.assert_array_equal(got, want, err_msg=what)  # counts, keys, assignments
      elif ".mu[" in key or ".nu[" in key:
        if i == 0:  # the gradient of the same parameters (see the module docstring)
          _close(got, want, 1e-4, what)
      else:  # DoGraph centroids, weights, coefficients; hyperparameters
        _close(got, want, 1e-4, what)
    assert size
    assert np.sqrt(diff_sq / moved_sq) < 1e-3, f"{run} step {i}: parameter updates differ"
    assert far <= 1e-3 * size, f"{run} step {i}: {far} of {size} parameters differ by > 1e-3 lr"


@pytest.mark.parametrize("variant, mesh", CASES)
def test_sharded_step_matches_single_device(runs, variant, mesh):
  arrays, _ = runs[variant]
  _check_same_training(arrays, mesh, dograph=variant != "uniform")


@pytest.mark.parametrize("variant, mesh", CASES)
def test_sharded_step_keeps_the_intended_shardings(runs, variant, mesh):
  _, info = runs[variant]
  run = info[mesh]
  assert run["mismatched"] == [], "\n".join(run["mismatched"])
  # Same shardings out as in: the second step reuses the first one's executable.
  assert run["compilations"] == 1
  assert "divisible by the 8 devices" in run["indivisible_batch_error"]
  assert run["global_batch_ok"]
  if "fsdp=1" not in mesh:
    # Big leaves stay FSDP-sharded: every params leaf and Adam moment of at
    # least MIN_SHARD_SIZE elements (all of them have an even dimension).
    assert run["replicated_big"] == []
    kernel = BIG_KERNEL.get(variant, "['h'][0]['mlp']['c_fc']['kernel']")
    assert f".params{kernel}" in run["sharded"]
    assert any(k.endswith(f".mu{kernel}") for k in run["sharded"])
    assert any(k.endswith(f".nu{kernel}") for k in run["sharded"])
  else:  # fsdp=1: pure data parallelism, everything replicated
    assert run["sharded"] == []


# --------------------------------------------------------------------------
# In process: the sharding rules (abstract mesh) and mesh-spec errors.


def _abstract_mesh(data, fsdp):
  return AbstractMesh((data, fsdp), sharding.AXES, axis_types=(AxisType.Auto,) * 2)


def test_param_shardings_rule():
  params = {"wte": np.zeros((128, 64)), "c_fc": np.zeros((64, 256)),
            "odd": np.zeros((63, 33)), "bias": np.zeros((256,)),
            "wide_odd": np.zeros((5, 1024)), "scale": np.zeros((4,))}
  specs = {k: s.spec for k, s in sharding.param_shardings(params, _abstract_mesh(4, 2)).items()}
  assert specs == {"wte": P("fsdp", None), "c_fc": P(None, "fsdp"), "odd": P(),
                   "bias": P(), "wide_odd": P(None, "fsdp"), "scale": P()}
  for shardings in (sharding.param_shardings(params, _abstract_mesh(8, 1)),
                    sharding.param_shardings(params, _abstract_mesh(4, 2), fsdp=False)):
    assert all(s.spec == P() for s in shardings.values())


def test_state_shardings_follow_params_and_replicate_the_rest():
  params = {"w": jax.ShapeDtypeStruct((64, 128), np.float32),
            "b": jax.ShapeDtypeStruct((128,), np.float32)}
  # A DoGraph buffer (S, K) shaped like the parameter "w" stays replicated:
  # only whole params-like subtrees are sharded.
  tx = optax.chain(dg.dograph_transform(3, 128, domains="batch", buffer_size=64, batch_size=8),
                   optax.adamw(1e-3))
  state = {"params": params, "opt_state": jax.eval_shape(tx.init, params),
           "step": jax.ShapeDtypeStruct((), np.int32)}
  shardings = sharding.state_shardings(state, _abstract_mesh(4, 2))
  flat = {jax.tree_util.keystr(p): s.spec for p, s in
          jax.tree_util.tree_flatten_with_path(shardings)[0]}
  sharded = {k for k, spec in flat.items() if spec != P()}
  assert sharded == {"['params']['w']", "['opt_state'][1][0].mu['w']",
                     "['opt_state'][1][0].nu['w']"}, flat
  assert flat["['params']['w']"] == P(None, "fsdp")
  assert flat["['opt_state'][0].buffer"] == P()


@pytest.mark.parametrize("spec, message", [
    ("data=4,fsdp=2", "must equal the device count"),   # 8 != 1 device
    ("data=3", "must equal the device count"),
    ("data=4,tensor=2", "unknown axis 'tensor'"),
    ("data=4,data=2", "given twice"),
    ("data=four", "must be an integer"),
    ("data=0", "must be >= 1"),
    ("data=-1,fsdp=-1", "at most one axis"),
    ("data4", "not 'axis=size'"),
    ("", "not 'axis=size'"),
    ({}, "empty"),
    ({"model": 2}, "unknown axis"),
])
def test_bad_mesh_specs_raise(spec, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(spec, devices=jax.devices()[:1])


def test_mesh_spec_forms_and_axis_types():
  one = jax.devices()[:1]
  assert sharding.parse_mesh_spec(" data = 2 , fsdp=4 ") == {"data": 2, "fsdp": 4}
  assert sharding.parse_mesh_spec("fsdp=2") == {"data": 1, "fsdp": 2}
  for spec in ("data=1,fsdp=1", {"fsdp": 1}, "data=-1", "fsdp=-1"):
    mesh = sharding.make_mesh(spec, devices=one)
    assert mesh.axis_names == ("data", "fsdp") and mesh.size == 1
    assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
  with pytest.raises(ValueError, match="leading batch axis"):
    sharding.shard_batch({"tokens": np.zeros(())}, sharding.make_mesh("data=1", devices=one))


def test_single_process_runs_do_not_initialize_distributed():
  assert not distributed.maybe_initialize_distributed(env={})
  assert not distributed.maybe_initialize_distributed(env={"JAX_NUM_PROCESSES": "1"})
  assert not distributed.maybe_initialize_distributed(
      False, env={"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2"})
  assert not jax.distributed.is_initialized()
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES must be an integer"):
    distributed.maybe_initialize_distributed(env={"JAX_NUM_PROCESSES": "two"})
  options = distributed.host_shard_options()
  assert (options.shard_index, options.shard_count) == (jax.process_index(), jax.process_count())
  assert distributed.host_batch_size(16) == 16 // jax.process_count()


if __name__ == "__main__":
  # Before any JAX operation (the imports above run none): 8 CPU devices.
  jax.config.update("jax_num_cpu_devices", N_DEVICES)
  _worker(sys.argv[1], sys.argv[2])
