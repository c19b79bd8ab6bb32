"""Whole train steps: plain AdamW against the three DoGraph engines.

Run as ``python benchmarks/bench_step.py`` (``--help`` for the options). One
run measures, on the same model, batch and machine, the four train steps that
``experiments/pretrain.py`` builds (``dograph_jax.train.training.make_train_step``
on ``make_optimizer``'s chain, state donated):

* ``plain``: ``--method uniform``, the gradient of the batch-mean loss, then
  ``clip_by_global_norm`` and AdamW (the same optimizer chain without DoGraph);
* ``reference``: ``--sketch reference``, per-sample gradients (``vmap(grad)``)
  handed to ``dograph_transform`` (Kronecker sketch, K-means, weights, update);
* ``factored``: ``--sketch factored --update bookkeeping`` (the trainer's
  default), sketches and update from one forward/backward pass (docs/method.md §7);
* ``factored_2bwd``: ``--sketch factored --update second_backward``;
* ``factored_lagged`` (opt-in): ``--update lagged``, micro-batches in one
  pass weighted by the previous step's weights (docs/method.md §7b (c)).

Defaults: on the CPU ``--model mini --batch_size 16 --seq_len 64 --sketch_dim
256 --dtype float32``; on a GPU (detected) ``--model gpt2 --batch_size 48
--seq_len 512 --sketch_dim 1024 --dtype bfloat16``. Always ``M = 11`` domains
and the trainer's other defaults (10 Lloyd iterations, ``uncertainty``).

Batches are synthetic: ``{"tokens": (B, T + 1) int32, "domain_id": (B,)
int32}`` of uniform random ids, made on the device before any timing (a few
distinct batches, cycled); no data loading is timed.

Timing: every candidate is lowered and compiled once (``step.lower(state,
batch).compile()``; the compiled executable is what is called, so nothing
compiles twice), then warmed up with ``--warmup`` steps. Each candidate keeps
its own train state and threads it through its calls (the state is donated).
Then ``--repeats`` rounds, the candidates interleaved round-robin with the
order rotated each round; in a round each candidate runs ``n`` consecutive
steps (``n`` chosen after warm-up so that a sample lasts about ``--min_time``
seconds) and the sample is the elapsed time / ``n``, ending with
``jax.block_until_ready`` on the new state: steady-state time per step, as a
training loop sees it. Reported: median and minimum over the rounds, and the
ratio of medians to ``plain``. On the CPU the process's CPU time per step
(``time.process_time``, all threads) is shown too: it moves less than wall
time when other processes share the cores (but counts thread-pool spinning).
A warning is printed when a candidate's slowest sample is over 1.5x its
fastest, or when the machine was loaded before the run (load average against
the core count): compare the min column then.

CPU caveat (page faults): XLA:CPU allocates each step's temporaries with
``malloc``; glibc serves large blocks with a fresh ``mmap`` (and trims freed
memory back to the kernel), so they are page-faulted in again on every step,
which in a VM costs a lot: on this project's 2-core VM a ``mini`` B = 48,
T = 128 plain step took ~390 ms with ~56,000 minor faults per step, and
~145 ms with none. Which candidates fault depends on their temp sizes (at the
defaults the factored step's 32.8 MiB temp crosses glibc's 32 MiB threshold,
plain's 31.9 MiB does not) and on the allocator's history, so the ratios
include it. The CPU table shows minor page faults per step (``getrusage``) and
a note when there are any. ``--cpu_malloc neutral`` calls glibc's ``mallopt``
before JAX starts (no ``mmap``, no trimming, one arena; equivalently
``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295:glibc.malloc.arena_max=1``)
and gives allocator-neutral numbers; the default measures the allocator as
``experiments/pretrain.py`` runs it.

Memory, two measures:

* *compiled* (every backend): ``compiled.memory_analysis()``, all its
  fields printed; the table shows ``temp`` (XLA's temporaries) and
  ``total = argument + output - alias + temp`` (the step's live bytes: state
  and batch in, state and metrics out, donated buffers counted once);
* *device peak* (GPU; ``--device_peak auto|on|off``):
  ``device.memory_stats()["peak_bytes_in_use"]``. It cannot be reset, so each
  candidate is measured in a fresh subprocess of this script that builds only
  that candidate, runs ``--warmup`` steps and reports its peak. The children
  load the executables the parent compiled from a temporary persistent
  compilation cache, so that the GPU autotuner's scratch buffers (allocated
  while compiling) stay out of their peak; the child's compile time is
  printed (seconds instead of a fraction of one means it compiled anyway).
  ``XLA_PYTHON_CLIENT_PREALLOCATE`` defaults to ``false`` in this script
  (unless set) so the parent does not hold 75% of the GPU while the children
  run; the allocator then grows on demand, which only affects the first
  (warm-up) steps. (Not yet exercised on a GPU: this task had no device.)

A candidate whose compiled total exceeds the device's free memory (GPU) is
not run (the reference path on GPT-2 124M at B = 48 needs hundreds of GiB):
its row says so, with the compiled figures.

FLOPs and MFU: XLA's cost model (``compiled.cost_analysis()``: ``flops`` and
``bytes accessed``) is printed for every candidate, as ratios to ``plain``
(it counts a float32 ``Precision.HIGHEST`` matmul like a bfloat16 one). MFU (GPU, or any
backend given ``--peak_tflops``) is the plain step's model FLOPs per second
over the device's dense bfloat16 peak (table ``PEAK_BF16_TFLOPS`` keyed by
``device_kind``), with model FLOPs from the PaLM / nanoGPT formula
``(6 N + 12 L T D) B T`` (``N`` parameters without the position table,
``L`` layers, ``D`` width; attention counted as full, non-causal, as the
model computes it); the MFU from XLA's count is printed beside it.

Targets (issue #4): on a GPU, for GPT-2 124M, B = 48, T = 512, K = 1024,
bfloat16: factored step <= 1.10x plain, its peak memory <= 1.15x plain, and
the plain step at >= 40% MFU; on the CPU, factored <= 1.15x plain on ``mini``.
``--breakdown`` also times the factored step's pieces (engine pass, K-means,
weight solve, book-keeping update) on the same batch; ``--compile_only``
compiles and reports FLOPs and compiled memory without running anything (e.g.
GPT-2 124M on a CPU host).
"""

from __future__ import annotations

import os

# Before JAX initialises a GPU: do not reserve 75% of it up front, so the
# per-candidate peak-memory subprocesses have room (see the docstring).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import dataclasses
import datetime
import json
import math
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable


import jax
import jax.numpy as jnp
import numpy as np
import optax

import dograph_jax as dg
from dograph_jax import sharding
from dograph_jax.models import apply, count_params, token_losses
from dograph_jax.train import config, training
from dograph_jax.train.config import TrainConfig

# name -> (TrainConfig fields, description)
CANDIDATES: dict[str, tuple[dict[str, str], str]] = {
    "plain": (dict(method="uniform"), "mean-loss grad + clip + adamw"),
    "reference": (dict(method="dograph", sketch="reference"),
                  "vmap(grad) + dograph_transform"),
    "factored": (dict(method="dograph", sketch="factored", update="bookkeeping"),
                 "factored, book-keeping update"),
    "factored_2bwd": (dict(method="dograph", sketch="factored", update="second_backward"),
                      "factored, second backward"),
    # One pass over the micro-batches with the previous step's weights
    # (docs/method.md §7b (c)); the same program as "factored" without
    # --micro_batches, so not run unless asked for.
    "factored_lagged": (dict(method="dograph", sketch="factored", update="lagged"),
                        "factored, one pass, previous step's weights"),
    # The literal per-batch domains (K-means of every batch), for comparison
    # with the default persistent domains above; not run unless asked for.
    "factored_batch": (dict(method="dograph", sketch="factored", update="bookkeeping",
                            domains="batch", distance="euclidean"),
                       "factored, book-keeping, per-batch domains"),
    # R&B's round rule (an online mixer): plain forward/backward plus the
    # output layer's sketched per-sample gradients summed per cluster.
    "rnb": (dict(method="rnb_rounds"), "R&B rounds: head-gradient sketches + weighted grad"),
}
# Not run unless named in --candidates.
OPT_IN = ("factored_batch", "rnb", "factored_lagged")
NUM_DOMAINS = 11
DEFAULTS = {
    "cpu": dict(model="mini", batch_size=16, seq_len=64, sketch_dim=256, dtype="float32"),
    "gpu": dict(model="gpt2", batch_size=48, seq_len=512, sketch_dim=1024, dtype="bfloat16"),
}
# Dense bfloat16 peak (TFLOP/s, no sparsity), matched as a lower-case substring
# of `device.device_kind`, first match wins (so longer names come first).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("h200", 989.0),
    ("h100 pcie", 756.0),
    ("h100", 989.0),
    ("h800", 989.0),
    ("b200", 2250.0),
    ("a100", 312.0),
    ("a800", 312.0),
    ("l40s", 362.0),
    ("rtx 6000 ada", 364.0),
    ("l4", 121.0),
    ("tpu v6", 918.0),
    ("tpu v5p", 459.0),
    ("tpu v5 lite", 197.0),
    ("tpu v5e", 197.0),
    ("tpu v4", 275.0),
)
# (time ratio, memory ratio, plain MFU) targets per backend; None = no target.
TARGETS = {"gpu": (1.10, 1.15, 0.40), "cpu": (1.15, None, None)}
TARGET_SETTING = {"gpu": dict(model="gpt2", batch_size=48, seq_len=512, sketch_dim=1024,
                              dtype="bfloat16"),
                  "cpu": dict(model="mini")}
CHILD_TAG = "BENCH_STEP_CHILD_JSON "
MIB = 2 ** 20


# --------------------------------------------------------------------------
# Options.

def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default=None,
                      help="mini | gpt2 | gpt2-medium | paper-small | paper-medium "
                           "(default: mini on CPU, gpt2 on GPU)")
  parser.add_argument("--batch_size", type=int, default=None, help="B (default 16 CPU, 48 GPU)")
  parser.add_argument("--seq_len", type=int, default=None, help="T (default 64 CPU, 512 GPU)")
  parser.add_argument("--sketch_dim", type=int, default=None,
                      help="K (default 256 CPU, 1024 GPU)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                      help="compute dtype (default float32 CPU, bfloat16 GPU)")
  parser.add_argument("--attention", default="xla", choices=("xla", "dot_product", "cudnn"),
                      help="the models' attention (--attention of pretrain.py)")
  parser.add_argument("--remat", default="none", choices=("none", "block", "dots"),
                      help="rematerialisation of the blocks (--remat of pretrain.py)")
  parser.add_argument("--micro_batches", type=int, default=1,
                      help="split each step's batch into this many sequential micro-batches "
                           "(every candidate, plain included: --micro_batches of pretrain.py)")
  parser.add_argument("--vocab_size", type=int, default=None,
                      help="vocabulary (default 2048 for mini, 50257 otherwise)")
  parser.add_argument("--candidates", default=",".join(c for c in CANDIDATES if c not in OPT_IN),
                      help=f"comma-separated subset of {','.join(CANDIDATES)} "
                           "(plain is always added: it is the reference of the ratios)")
  parser.add_argument("--repeats", type=int, default=15,
                      help="interleaved timing rounds (default 15)")
  parser.add_argument("--warmup", type=int, default=3,
                      help="steps per candidate after compiling, before timing (default 3)")
  parser.add_argument("--min_time", type=float, default=None,
                      help="seconds per timing sample (default 0.3 CPU, 0.5 GPU)")
  parser.add_argument("--device_peak", choices=("auto", "on", "off"), default="auto",
                      help="measure device peak memory per candidate in subprocesses "
                           "(auto: on where the device reports memory stats, i.e. GPU)")
  parser.add_argument("--child_timeout", type=float, default=900.0,
                      help="seconds allowed to one peak-memory subprocess (default 900)")
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help="device peak bf16 TFLOP/s for MFU (overrides the table)")
  parser.add_argument("--cpu_malloc", choices=("default", "neutral"), default="default",
                      help="neutral: glibc mallopt (no mmap, no trimming, one arena) before JAX "
                           "starts, so XLA:CPU's per-step temporaries are not page-faulted in "
                           "again every step (default: the allocator as users run it)")
  parser.add_argument("--compile_only", action="store_true",
                      help="compile and report FLOPs and compiled memory; time nothing "
                           "(from abstract shapes: no parameter is allocated)")
  parser.add_argument("--mesh", default="",
                      help="compile the steps on a data x FSDP mesh, e.g. fsdp=8; memory is "
                           "then per device (with --compile_only on a CPU host, that many "
                           "virtual CPU devices are made)")
  parser.add_argument("--breakdown", action="store_true",
                      help="also time the pieces of the factored step")
  parser.add_argument("--seed", type=int, default=0, help="model init, batches, DoGraph keys")
  parser.add_argument("--json", default=None, metavar="PATH", help="also write results as JSON")
  parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  names = [n.strip() for n in args.candidates.split(",") if n.strip()]
  unknown = sorted(set(names) - set(CANDIDATES))
  if unknown:
    parser.error(f"unknown candidate(s) {unknown}; choose from {list(CANDIDATES)}")
  args.added_plain = "plain" not in names
  args.candidates = [n for n in CANDIDATES if n in names or n == "plain"]
  if args.repeats < 1 or args.warmup < 1:
    parser.error("--repeats and --warmup must be >= 1")
  return args


def neutral_malloc() -> str:
  """glibc ``mallopt``: never ``mmap``, never trim, one arena (see the docstring)."""
  from dograph_jax.train.allocator import tune_cpu_malloc
  return tune_cpu_malloc()


def resolve_defaults(args: argparse.Namespace, backend: str) -> None:
  kind = "cpu" if backend == "cpu" else "gpu"  # any accelerator gets the GPU defaults
  for name, value in DEFAULTS[kind].items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  if args.vocab_size is None:
    args.vocab_size = 2048 if args.model == "mini" else 50257
  if args.min_time is None:
    args.min_time = 0.5 if kind == "gpu" else 0.3
  args.kind = kind


def train_config(args: argparse.Namespace, name: str) -> TrainConfig:
  return config.make_config(model=args.model, batch_size=args.batch_size, seq_len=args.seq_len,
                     sketch_dim=args.sketch_dim, num_domains=NUM_DOMAINS, dtype=args.dtype,
                     vocab_size=args.vocab_size, seed=args.seed, attention=args.attention,
                     remat=args.remat, micro_batches=args.micro_batches,
                     **CANDIDATES[name][0])


# --------------------------------------------------------------------------
# Building and compiling the candidates.

def make_batches(args, count: int = 4) -> list[dict[str, jax.Array]]:
  """``count`` synthetic batches of uniform random ids, on the device."""
  key = jax.random.PRNGKey(args.seed + 1)
  batches = []
  for i in range(count):
    k_tok, k_dom = jax.random.split(jax.random.fold_in(key, i))
    batches.append({
        "tokens": jax.random.randint(k_tok, (args.batch_size, args.seq_len + 1), 0,
                                     args.vocab_size, jnp.int32),
        "domain_id": jax.random.randint(k_dom, (args.batch_size,), 0, NUM_DOMAINS, jnp.int32)})
  return jax.block_until_ready(batches)


def memory_fields(compiled) -> dict[str, int]:
  """Every integer field of ``compiled.memory_analysis()`` (empty if none)."""
  try:
    stats = compiled.memory_analysis()
  except Exception as e:  # some backends do not implement it
    return {"error": f"{type(e).__name__}: {e}"}
  if stats is None:
    return {}
  out = {}
  for name in dir(stats):
    if name.startswith("_") or name == "serialized_buffer_assignment_proto":
      continue
    value = getattr(stats, name, None)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
      out[name] = int(value)
  need = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
          "temp_size_in_bytes")
  if all(n in out for n in need):
    out["total"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                    - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
  return out


def xla_cost(compiled) -> dict[str, float]:
  """``flops`` and ``bytes accessed`` of XLA's cost model (empty if unavailable)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:
    return {}
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per module
    cost = cost[0] if cost else None
  return {k: float(cost[k]) for k in ("flops", "bytes accessed") if cost and k in cost}


def device_memory() -> dict | None:
  try:
    return jax.local_devices()[0].memory_stats()
  except Exception:
    return None


@dataclasses.dataclass
class Candidate:
  name: str
  cfg: TrainConfig
  state: Any = None
  compiled: Any = None
  compile_s: float = 0.0
  memory: dict = dataclasses.field(default_factory=dict)
  flops: float | None = None
  bytes: float | None = None
  cpu_samples: list = dataclasses.field(default_factory=list)
  fault_samples: list = dataclasses.field(default_factory=list)
  skipped: str | None = None   # why it was not run
  samples: list = dataclasses.field(default_factory=list)
  calls: int = 1
  loss: float | None = None
  device_peak: dict | None = None
  last_metrics: Any = None


def build(args, name: str, graphdef, params, batch) -> Candidate:
  """Optimizer, fresh train state and compiled train step of one candidate."""
  cand = Candidate(name, train_config(args, name))
  tx = training.make_optimizer(cand.cfg)
  abstract = isinstance(jax.tree.leaves(params)[0], jax.ShapeDtypeStruct)
  domains = NUM_DOMAINS if cand.cfg.method == "rnb_rounds" else 0
  if abstract:  # --compile_only: shapes only, nothing allocated
    cand.state = jax.eval_shape(lambda p: training.init_train_state(p, tx, cand.cfg, domains),
                                params)
  else:
    cand.state = training.init_train_state(jax.tree.map(jnp.copy, params), tx, cand.cfg, domains)
  kwargs = {}
  if args.mesh:
    mesh = sharding.make_mesh(args.mesh)
    state_sharding = sharding.state_shardings(cand.state, mesh, params=cand.state.params)
    batch_sharding = sharding.batch_sharding(mesh)
    kwargs = dict(state_sharding=state_sharding, batch_sharding=batch_sharding)
    if abstract:
      cand.state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                cand.state, state_sharding)
      batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                          sharding=batch_sharding), batch)
    else:
      cand.state = jax.device_put(cand.state, state_sharding)
      batch = sharding.shard_batch(batch, mesh)
  step = training.make_train_step(graphdef, tx, cand.cfg, **kwargs)
  start = time.perf_counter()
  try:
    cand.compiled = step.lower(cand.state, batch).compile()
  except Exception as e:
    cand.skipped = f"compile failed: {type(e).__name__}: {str(e)[:200]}"
    cand.state = None
    return cand
  cand.compile_s = time.perf_counter() - start
  cand.memory = memory_fields(cand.compiled)
  cost = xla_cost(cand.compiled)
  cand.flops, cand.bytes = cost.get("flops"), cost.get("bytes accessed")
  return cand


def check_fits(cand: Candidate) -> None:
  """Skip a candidate whose compiled total exceeds the device's free memory."""
  stats = device_memory()
  total = cand.memory.get("total")
  if cand.skipped or not stats or total is None or "bytes_limit" not in stats:
    return
  free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
  # The state (the donated arguments) is already resident.
  need = total - cand.memory.get("argument_size_in_bytes", 0)
  if need > free:
    cand.skipped = (f"does not fit: needs {need / 2**30:.1f} GiB more, "
                    f"{free / 2**30:.1f} GiB free")
    cand.state = cand.compiled = None


def run_steps(cand: Candidate, batches, n: int, offset: int = 0) -> None:
  state = cand.state
  for i in range(n):
    state, metrics = cand.compiled(state, batches[(offset + i) % len(batches)])
  cand.state = jax.block_until_ready(state)
  cand.last_metrics = metrics


def guarded(cand: Candidate, fn: Callable[[], None]) -> None:
  """Run ``fn``; an exception (e.g. device out of memory) skips the candidate."""
  try:
    fn()
  except Exception as e:
    cand.skipped = f"failed: {type(e).__name__}: {str(e)[:200]}"
    cand.state = cand.compiled = None


# --------------------------------------------------------------------------
# Timing.

def warm_up(cands: list[Candidate], batches, args) -> None:
  for cand in cands:
    if cand.skipped:
      continue

    def go():
      run_steps(cand, batches, args.warmup)
      start = time.perf_counter()
      run_steps(cand, batches, 1)
      one = time.perf_counter() - start
      cand.calls = max(1, math.ceil(args.min_time / max(one, 1e-9)))
      cand.loss = float(cand.last_metrics["loss"])
    guarded(cand, go)


def minor_faults() -> int | None:
  """Minor page faults of this process so far (None where unavailable)."""
  try:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  except (ImportError, OSError):
    return None


def time_rounds(cands: list[Candidate], batches, repeats: int) -> None:
  live = [c for c in cands if not c.skipped]
  for r in range(repeats):
    shift = r % max(len(live), 1)
    for cand in live[shift:] + live[:shift]:
      if cand.skipped:
        continue

      def go():
        faults = minor_faults()
        start, cpu = time.perf_counter(), time.process_time()
        run_steps(cand, batches, cand.calls, offset=r)
        cand.samples.append((time.perf_counter() - start) / cand.calls)
        cand.cpu_samples.append((time.process_time() - cpu) / cand.calls)
        if faults is not None:
          cand.fault_samples.append((minor_faults() - faults) / cand.calls)
      guarded(cand, go)


# --------------------------------------------------------------------------
# Device peak memory, one subprocess per candidate.

def child_main(args) -> None:
  """Build one candidate, run warm-up steps, print the device's peak memory."""
  out: dict[str, Any] = {"candidate": args._child}
  try:
    _, graphdef, params = training.build_model(train_config(args, "plain"), args.vocab_size)
    batches = make_batches(args)
    cand = build(args, args._child, graphdef, params, batches[0])
    del params
    out["compile_s"] = cand.compile_s
    check_fits(cand)
    if not cand.skipped:
      guarded(cand, lambda: run_steps(cand, batches, args.warmup))
    out["skipped"] = cand.skipped
    stats = device_memory() or {}
    for name in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit"):
      if name in stats:
        out[name] = int(stats[name])
  except Exception as e:
    out["error"] = f"{type(e).__name__}: {str(e)[:300]}"
  print(CHILD_TAG + json.dumps(out), flush=True)


def measure_device_peaks(cands: list[Candidate], argv: list[str], cache_dir: str,
                         timeout: float) -> None:
  env = dict(os.environ, BENCH_STEP_CACHE_DIR=cache_dir)
  for cand in cands:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--_child", cand.name]
    print(f"  device peak of {cand.name}: subprocess ...", end="", flush=True)
    start = time.perf_counter()
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
      lines = [l for l in proc.stdout.splitlines() if l.startswith(CHILD_TAG)]
      if lines:
        cand.device_peak = json.loads(lines[-1][len(CHILD_TAG):])
      else:
        cand.device_peak = {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"}
    except subprocess.TimeoutExpired:
      cand.device_peak = {"error": f"timed out after {timeout:.0f} s"}
    peak = cand.device_peak.get("peak_bytes_in_use")
    what = (f"{peak / MIB:,.0f} MiB" if peak is not None else
            cand.device_peak.get("skipped") or cand.device_peak.get("error", "n/a"))
    print(f" {what} ({time.perf_counter() - start:.0f} s, child compile "
          f"{cand.device_peak.get('compile_s', float('nan')):.1f} s)", flush=True)


def enable_compilation_cache(cache_dir: str) -> None:
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  for name, value in (("jax_persistent_cache_min_compile_time_secs", 0.0),
                      ("jax_persistent_cache_min_entry_size_bytes", 0)):
    try:
      jax.config.update(name, value)
    except Exception:  # an older JAX without the option
      pass


# --------------------------------------------------------------------------
# The factored step's pieces (--breakdown).

def breakdown(args, graphdef, params, batches) -> list[list[str]]:
  """Time the factored step's pieces, each its own jitted function.

  ``plain grad``: value_and_grad of the batch-mean loss (no optimizer);
  ``engine``: ``factored_grads`` losses + sketches (update map unused);
  ``engine + bookkeeping``: the same plus the book-keeping update at uniform
  coefficients (every sample kept); ``1 sample left out``: the same with one
  sample's ``keep_B`` False (the rare, sample-by-sample branch that a
  non-finite sample takes); ``engine + 2nd backward``: the same with the
  second backward;
  ``kmeans``: warm-started Lloyd on the step's sketches; ``stats + solve``:
  ``domain_stats`` and ``solve_weights``; ``transform``: the whole
  ``dograph_transform.update`` on the engine's output; ``clip + adamw``.
  """
  cfg = train_config(args, "factored")
  tokens = batches[0]["tokens"]
  key = dg.projection_key(cfg.run.seed)
  b, m, k = args.batch_size, NUM_DOMAINS, args.sketch_dim

  def sequence_losses(model, tokens_BxT1):
    return token_losses(model(tokens_BxT1[:, :-1]), tokens_BxT1[:, 1:]).mean(1)

  def mean_loss(p, tokens):
    return token_losses(apply(graphdef, p, tokens[:, :-1]), tokens[:, 1:]).mean()

  def engine(p, tokens, update="bookkeeping"):
    return dg.factored_grads(sequence_losses, graphdef, p, tokens, key, k, update=update)

  uniform_a = jnp.full((b,), 1.0 / b, jnp.float32)
  all_kept = jnp.ones((b,), bool)
  one_dropped = all_kept.at[0].set(False)
  fns = {
      "plain grad (value_and_grad of mean loss)": jax.jit(jax.value_and_grad(mean_loss)),
      "engine: losses + sketches": jax.jit(
          lambda p, t: (lambda f: (f.losses, f.sketches))(engine(p, t))),
      "engine + book-keeping update": jax.jit(
          lambda p, t: (lambda f: (f.sketches, f.weighted_grad(uniform_a, all_kept)))(
              engine(p, t))),
      "engine + book-keeping, 1 sample left out": jax.jit(
          lambda p, t: (lambda f: (f.sketches, f.weighted_grad(uniform_a, one_dropped)))(
              engine(p, t))),
      "engine + second backward": jax.jit(
          lambda p, t: (lambda f: (f.sketches, f.weighted_grad(uniform_a)))(
              engine(p, t, "second_backward"))),
  }
  args_of = {name: (params, tokens) for name in fns}

  losses, z = jax.block_until_ready(fns["engine: losses + sketches"](params, tokens))
  c0 = z[:m]
  fns["kmeans (10 Lloyd iters, warm start)"] = jax.jit(
      lambda z, c: dg.kmeans(z, m, jax.random.PRNGKey(0), iters=cfg.dograph.kmeans_iters,
                             init_centroids=c).assignments)
  args_of["kmeans (10 Lloyd iters, warm start)"] = (z, c0)
  assign = dg.kmeans(z, m, jax.random.PRNGKey(0), iters=cfg.dograph.kmeans_iters,
                     init_centroids=c0).assignments
  fns["domain_stats + solve_weights"] = jax.jit(
      lambda z, a, l: dg.solve_weights(dg.domain_stats(z, a, m, l), cfg.dograph.objective))
  args_of["domain_stats + solve_weights"] = (z, assign, losses)

  tx = dg.dograph_transform(m, k, cfg.dograph.objective, seed=cfg.run.seed, sketch_kind="kronecker",
                            batch_size=b)
  tstate = tx.init(params)

  def transform_only(p, tokens, s):
    return tx.update(engine(p, tokens), s, p)
  fns["engine + dograph_transform.update"] = jax.jit(transform_only)
  args_of["engine + dograph_transform.update"] = (params, tokens, tstate)

  adam = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.01))
  astate = adam.init(params)
  fns["clip + adamw update (grads given)"] = jax.jit(
      lambda g, s, p: optax.apply_updates(p, adam.update(g, s, p)[0]))
  args_of["clip + adamw update (grads given)"] = (params, astate, params)

  samples = {name: [] for name in fns}
  faults = {name: [] for name in fns}
  calls = {}
  for name, fn in fns.items():
    jax.block_until_ready(fn(*args_of[name]))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args_of[name]))
    calls[name] = max(1, math.ceil(args.min_time / max(time.perf_counter() - start, 1e-9)))
  names = list(fns)
  for r in range(args.repeats):
    shift = r % len(names)
    for name in names[shift:] + names[:shift]:
      before = minor_faults()
      start = time.perf_counter()
      for _ in range(calls[name]):
        jax.block_until_ready(fns[name](*args_of[name]))
      samples[name].append((time.perf_counter() - start) / calls[name])
      if before is not None:
        faults[name].append((minor_faults() - before) / calls[name])
  ref = statistics.median(samples[names[0]])
  rows = []
  for name in names:
    med = statistics.median(samples[name])
    rows.append([name, f"{med * 1e3:.2f}", f"{min(samples[name]) * 1e3:.2f}",
                 f"{med / ref:.2f}x",
                 f"{statistics.median(faults[name]):,.0f}" if faults[name] else "n/a"])
  return rows


# --------------------------------------------------------------------------
# Printing.

def print_table(header: list[str], rows: list[list[str]]) -> None:
  widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]

  def line(row):
    return "  ".join([str(row[0]).ljust(widths[0])]
                     + [str(c).rjust(w) for c, w in zip(row[1:], widths[1:])])

  print(line(header))
  print("  ".join("-" * w for w in widths))
  for row in rows:
    print(line(row))


def peak_tflops(args, device) -> tuple[float | None, str]:
  if args.peak_tflops is not None:
    return args.peak_tflops, "--peak_tflops"
  kind = device.device_kind.lower()
  for needle, value in PEAK_BF16_TFLOPS:
    if needle in kind:
      return value, f"table entry {needle!r}"
  return None, f"no table entry for {device.device_kind!r}"


def model_flops(args, model_cfg, params) -> float:
  """PaLM / nanoGPT model FLOPs of one training step: (6 N + 12 L T D) B T."""
  # the position table (GPT-2's wpe) is a lookup, not a matmul; RoPE has none
  n = count_params(params) - (math.prod(params["wpe"]["embedding"].shape)
                              if "wpe" in params else 0)
  per_token = 6 * n + 12 * model_cfg.n_layer * args.seq_len * model_cfg.d_model
  return float(per_token) * args.batch_size * args.seq_len


def _has_accelerator() -> bool:
  """Whether a GPU/TPU backend is installed (without initialising JAX)."""
  import importlib.util
  return any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin",
                                                   "libtpu"))


def fmt_mib(x: float | None) -> str:
  return "n/a" if x is None else f"{x / MIB:,.1f}"


def fmt_ratio(x: float | None) -> str:
  return "n/a" if x is None or not math.isfinite(x) else f"{x:.3f}x"


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  warnings.filterwarnings("ignore", category=DeprecationWarning)
  if args.mesh and os.environ.get("JAX_PLATFORMS", "") in ("", "cpu") and not _has_accelerator():
    # Before the first JAX operation: as many virtual CPU devices as the mesh needs.
    jax.config.update("jax_num_cpu_devices", math.prod(
        sharding.parse_mesh_spec(args.mesh).values()))
  cache_env = os.environ.get("BENCH_STEP_CACHE_DIR")
  if args._child:
    if cache_env:
      enable_compilation_cache(cache_env)
    resolve_defaults(args, jax.default_backend())
    return child_main(args)

  load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
  malloc_note = neutral_malloc() if args.cpu_malloc == "neutral" else None
  backend = jax.default_backend()
  device = jax.local_devices()[0]
  resolve_defaults(args, backend)
  stats0 = device_memory()
  device_peak = not args.compile_only and (
      args.device_peak == "on"
      or (args.device_peak == "auto" and bool(stats0) and "peak_bytes_in_use" in stats0))
  cache_dir = tempfile.mkdtemp(prefix="bench_step_cache_") if device_peak else None
  if cache_dir:
    enable_compilation_cache(cache_dir)

  print("bench_step: whole train steps, plain AdamW vs DoGraph")
  print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
  print(f"command: python {shlex.join([sys.argv[0], *argv])}")
  print(f"jax {jax.__version__} (backend {backend}), optax {optax.__version__}, "
        f"dograph_jax {dg.__version__}, python {platform.python_version()}")
  print(f"device: {device.device_kind} ({device.platform}, {jax.device_count()} device(s)); "
        f"host: {platform.machine()}, {os.cpu_count()} cores"
        + (f", load average {load_before[0]:.2f}" if load_before else ""))

  if args.compile_only:  # abstract parameters: a 1B model compiles on a small host
    from flax import nnx

    from dograph_jax.models import build as build_model, get_config, split_model
    cfg0 = train_config(args, "plain")
    model_cfg = get_config(cfg0.model.name, vocab_size=args.vocab_size,
                           dtype=jnp.bfloat16 if cfg0.model.dtype == "bfloat16" else jnp.float32,
                           attention=cfg0.model.attention, remat=cfg0.model.remat)
    graphdef, params = split_model(nnx.eval_shape(lambda: build_model(model_cfg,
                                                                      nnx.Rngs(args.seed))))
  else:
    model_cfg, graphdef, params = training.build_model(train_config(args, "plain"),
                                                       args.vocab_size)
  n_params = count_params(params)
  mflops = model_flops(args, model_cfg, params)
  print(f"model: {args.model} ({n_params / 1e6:.2f}M parameters, L={model_cfg.n_layer}, "
        f"D={model_cfg.d_model}, V={args.vocab_size}), B={args.batch_size}, "
        f"T={args.seq_len}, dtype {args.dtype}, attention {args.attention}, "
        f"remat {args.remat}, micro-batches {args.micro_batches}; DoGraph M={NUM_DOMAINS}, "
        f"K={args.sketch_dim}, objective uncertainty, 10 Lloyd iterations")
  print(f"timing: {args.warmup} warm-up steps, {args.repeats} interleaved rounds of "
        f"~{args.min_time:g} s per candidate; median and min per step")
  if malloc_note:
    print(f"allocator: --cpu_malloc neutral: {malloc_note}")
  if args.added_plain:
    print("note: added 'plain' to --candidates (the reference of every ratio)")

  batches = make_batches(args, count=1 if args.compile_only else 4)
  if args.mesh:
    print(f"mesh: {args.mesh} ({jax.device_count()} devices); compiled memory is per device")
  cands: list[Candidate] = []
  print("compiling:")
  for name in args.candidates:
    cand = build(args, name, graphdef, params, batches[0])
    check_fits(cand)
    cands.append(cand)
    print(f"  {name}: {cand.compile_s:.1f} s"
          + (f"  [{cand.skipped}]" if cand.skipped else ""), flush=True)
  del params

  if device_peak and not args.compile_only:
    print("device peak memory (one subprocess per candidate):")
    measure_device_peaks(cands, argv, cache_dir, args.child_timeout)
  if cache_dir:
    shutil.rmtree(cache_dir, ignore_errors=True)

  if not args.compile_only:
    warm_up(cands, batches, args)
    time_rounds(cands, batches, args.repeats)
  load_after = os.getloadavg() if hasattr(os, "getloadavg") else None

  by_name = {c.name: c for c in cands}
  plain = by_name["plain"]

  def median(c):
    return statistics.median(c.samples) if c.samples and not c.skipped else None

  def ratio(value, ref):
    return None if value is None or not ref else value / ref

  def dev_peak(c):
    return (c.device_peak or {}).get("peak_bytes_in_use")

  t_plain = median(plain)
  show_cpu = backend == "cpu" and not args.compile_only

  def cpu_median(c):
    return statistics.median(c.cpu_samples) if c.cpu_samples and not c.skipped else None

  header = ["candidate", "median ms", "min ms", "vs plain"]
  if show_cpu:
    header += ["cpu ms", "cpu vs plain", "faults/step"]
  header += ["GFLOP", "flops vs plain", "bytes vs plain", "temp MiB", "total MiB",
             "mem vs plain"]
  if device_peak:
    header += ["device peak MiB", "peak vs plain"]
  rows, notes = [], []
  for c in cands:
    t = median(c)
    row = [c.name,
           "-" if t is None else f"{t * 1e3:.2f}",
           "-" if t is None else f"{min(c.samples) * 1e3:.2f}",
           fmt_ratio(ratio(t, t_plain))]
    if show_cpu:
      u = cpu_median(c)
      row += ["-" if u is None else f"{u * 1e3:.2f}", fmt_ratio(ratio(u, cpu_median(plain))),
              f"{statistics.median(c.fault_samples):,.0f}" if c.fault_samples else "n/a"]
    row += ["n/a" if c.flops is None else f"{c.flops / 1e9:,.1f}",
            fmt_ratio(ratio(c.flops, plain.flops)),
            fmt_ratio(ratio(c.bytes, plain.bytes)),
            fmt_mib(c.memory.get("temp_size_in_bytes")),
            fmt_mib(c.memory.get("total")),
            fmt_ratio(ratio(c.memory.get("total"), plain.memory.get("total")))]
    if device_peak:
      row += [fmt_mib(dev_peak(c)), fmt_ratio(ratio(dev_peak(c), dev_peak(plain)))]
    rows.append(row)
    if c.skipped:
      notes.append(f"{c.name}: {c.skipped}")
  print()
  print_table(header, rows)
  print("candidates: " + "; ".join(f"{c.name} = {CANDIDATES[c.name][1]}" for c in cands))
  print("ms: wall time per step; "
        + ("cpu ms: CPU time of this process per step (all threads; less sensitive to other "
           "processes, but counts thread-pool spinning); faults/step: minor page faults of "
           "this process per step; " if show_cpu else "")
        + "GFLOP, bytes: compiled.cost_analysis() 'flops' and 'bytes accessed'; "
        "temp, total: compiled.memory_analysis(), total = argument + output - alias + temp")
  if args.compile_only:
    print("note: --compile_only: nothing was run")
  if args.micro_batches > 1:
    # Measured: with 4 micro-batches the plain step's count is 1/4 of the
    # full batch's (GPT-2 124M, BENCHMARKS.md).
    print(f"note: --micro_batches {args.micro_batches}: XLA's cost model counts a loop body "
          f"once, so GFLOP and bytes are those of one micro-batch's passes (plus the step's "
          f"work outside the loops); x{args.micro_batches} for the step's. The ratios to "
          f"plain hold as long as the loops dominate both.")
  for note in notes:
    print(f"note: {note}")
  unstable = [c.name for c in cands if c.samples and max(c.samples) > 1.5 * min(c.samples)]
  if unstable:
    print(f"warning: samples vary by more than 1.5x (max/min) for {', '.join(unstable)}: "
          "the machine was probably busy; compare the min column or rerun.")
  cores = os.cpu_count() or 1
  if (backend == "cpu" and not args.compile_only and load_before
      and load_before[0] > 0.5 * cores):
    print(f"warning: load average {load_before[0]:.2f} on {cores} cores before the run "
          f"({load_after[0]:.2f} after): other processes share the CPU; timings are noisy.")

  faulting = [f"{c.name} {statistics.median(c.fault_samples):,.0f}" for c in cands
              if c.fault_samples and statistics.median(c.fault_samples) > 100]
  if (show_cpu and faulting and platform.libc_ver()[0] == "glibc"
      and args.cpu_malloc == "default"):
    print(f"note: page faults per step: {', '.join(faulting)}. XLA:CPU allocates a step's "
          "temporaries with malloc, and glibc serves large blocks (over its mmap threshold, "
          "at most 32 MiB) with a fresh mmap, faulted in again on every step; that costs "
          "time in proportion to the candidate's temp size and varies with the allocator's "
          "history, so the ratios include it. For allocator-neutral numbers rerun with "
          "--cpu_malloc neutral (or GLIBC_TUNABLES=glibc.malloc.mmap_max=0:"
          "glibc.malloc.trim_threshold=4294967295:glibc.malloc.arena_max=1)")
  print("\ncompiled memory analysis (bytes):")
  fields = sorted({f for c in cands for f in c.memory if f != "error"})
  print_table(["field"] + [c.name for c in cands],
              [[f] + [f"{c.memory[f]:,}" if f in c.memory else "-" for c in cands]
               for f in fields])
  losses = [f"{c.name} {c.loss:.4f}" for c in cands if c.loss is not None]
  if losses:
    print("losses after warm-up (same model, batches and seed): " + ", ".join(losses))

  # MFU of the plain step.
  peak, peak_src = peak_tflops(args, device)
  mfu = mfu_xla = None
  print()
  if t_plain and mflops:
    tokens_s = args.batch_size * args.seq_len / t_plain
    line = (f"plain step: {tokens_s:,.0f} tokens/s; model FLOPs (6N + 12LTD)BT = "
            f"{mflops / 1e12:.3f} TFLOP/step, XLA cost model "
            + ("n/a" if plain.flops is None else f"{plain.flops / 1e12:.3f} TFLOP/step"))
    print(line)
    if peak:
      mfu = mflops / t_plain / (peak * 1e12)
      mfu_xla = None if plain.flops is None else plain.flops / t_plain / (peak * 1e12)
      print(f"MFU (plain, {args.dtype}): {100 * mfu:.1f}% of {peak:g} TFLOP/s bf16 dense "
            f"({peak_src}); from XLA's FLOP count: "
            + ("n/a" if mfu_xla is None else f"{100 * mfu_xla:.1f}%"))
      if args.dtype != "bfloat16":
        print("note: MFU is against the bfloat16 peak; this run computes in float32.")
    else:
      print(f"MFU: n/a ({peak_src}; pass --peak_tflops)")

  # Targets.
  t_max, m_max, mfu_min = TARGETS[args.kind]
  setting = TARGET_SETTING[args.kind]
  differs = {k: getattr(args, k) for k, v in setting.items() if getattr(args, k) != v}
  fac = by_name.get("factored")
  checks = []
  print(f"\ntargets ({args.kind}"
        + (f"; this run differs from the target setting {setting} in {differs}" if differs
           else f"; setting {setting}") + "):")
  if fac is not None:
    if not args.compile_only:
      r = ratio(median(fac), t_plain)
      checks.append(("factored time <= %.2fx plain" % t_max, r, r is not None and r <= t_max))
    mem_max, mem_note = (m_max, "") if m_max is not None else (TARGETS["gpu"][1], " (GPU target)")
    mem_c = ratio(fac.memory.get("total"), plain.memory.get("total"))
    checks.append((f"factored compiled total memory <= {mem_max:.2f}x plain{mem_note}", mem_c,
                   mem_c is not None and mem_c <= mem_max))
    if device_peak:
      mem_d = ratio(dev_peak(fac), dev_peak(plain))
      checks.append((f"factored device peak memory <= {mem_max:.2f}x plain", mem_d,
                     mem_d is not None and mem_d <= mem_max))
  if mfu_min is not None and not args.compile_only:
    checks.append((f"plain MFU >= {100 * mfu_min:.0f}% (bf16)", mfu,
                   mfu is not None and mfu >= mfu_min and args.dtype == "bfloat16"))
  for label, value, ok in checks:
    shown = ("n/a" if value is None else
             f"{100 * value:.1f}%" if "MFU" in label else f"{value:.3f}x")
    print(f"  {'MET    ' if ok else 'NOT MET'}  {label}: {shown}")
  if fac is None:
    print("  (factored not among the candidates: no target checked)")

  if args.breakdown and not args.compile_only:
    print("\nbreakdown of the factored step (each piece jitted alone; vs the plain grad):")
    _, graphdef2, params2 = training.build_model(train_config(args, "factored"),
                                                 args.vocab_size)
    print_table(["piece", "median ms", "min ms", "vs plain grad", "faults/call"],
                breakdown(args, graphdef2, params2, batches))

  if args.json:
    result = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(["python", sys.argv[0], *argv]),
        "jax": jax.__version__, "backend": backend, "device_kind": device.device_kind,
        "cpu_count": os.cpu_count(), "load_before": load_before, "load_after": load_after,
        "setting": {k: getattr(args, k) for k in ("model", "batch_size", "seq_len",
                                                  "sketch_dim", "dtype", "vocab_size",
                                                  "repeats", "warmup", "min_time")},
        "params": n_params,
        "candidates": {c.name: {
            "median_s": median(c), "min_s": min(c.samples) if c.samples else None,
            "samples_s": c.samples, "calls_per_sample": c.calls,
            "ratio_vs_plain": ratio(median(c), t_plain), "compile_s": c.compile_s,
            "cpu_samples_s": c.cpu_samples, "minor_faults_per_step": c.fault_samples,
            "xla_flops": c.flops, "xla_bytes_accessed": c.bytes,
            "memory_analysis": c.memory, "device_peak": c.device_peak,
            "skipped": c.skipped, "loss_after_warmup": c.loss} for c in cands},
        "model_flops_per_step": mflops, "peak_tflops": peak, "mfu_plain": mfu,
        "mfu_plain_xla": mfu_xla,
        "targets": [{"check": l, "value": v, "met": bool(ok)} for l, v, ok in checks],
    }
    Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
  main()
