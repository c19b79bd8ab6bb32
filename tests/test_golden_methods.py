"""Pinned behaviour of every method: a short fixed-seed run's logged metrics
and final parameters, recorded before the trainer moved into the library
(``tests/golden/methods.json``), reproduced to float32 rounding on the CPU.

The record was written by ``python tests/test_golden_methods.py --write`` on
the code as it was before the redesign; a change that alters a logged
number or the parameters of these runs beyond float32 rounding fails here.
The parameters are read from the final run's last checkpoint with orbax
directly (no project code), so the pin holds across changes of the
trainer's own state types. Rewrite the record only for a change that is
*meant* to change results, and say so in its commit.

The runs are trained in a child process compiled with XLA's default
options (``conftest.py`` compiles the rest of the suite at LLVM level 0,
which may change the last bits of a float); the child writes the records
and the tests here compare them.

What is compared, and how closely:

* every integer, string and boolean of the logged metrics (steps, skipped
  steps, the logged clusters' sizes and contingency with the domains)
  exactly;
* every float of the logged metrics (losses, update norms, weights,
  shares, frequencies, validation losses) to ``METRICS_RTOL`` relative;
  the clustering agreement (``ari``, ``nmi``, computed by scikit-learn
  since the redesign, which sums the same terms in another order than the
  hand-written code of the record) to 1e-12;
* the final parameters leaf by leaf: the same leaves, each leaf's float64
  sum within ``PARAMS_TOL`` times the leaf's L1 norm.

Why not bit for bit: XLA:CPU's code (and Eigen's kernels) depend on the
CPU's vector instructions, so the same program on another CPU rounds
differently. The record was reproduced bit for bit on the machines of its
first sessions; on an AVX-512/AMX Xeon (2026-12-05) every method's logged
floats differed from it by at most 1.5e-6 relative (float32 rounding, a
few tens of ulps after three steps), its integers not at all, and the
parameter sums by at most 3.5e-5 of a leaf's L1 norm (attention biases,
which start at zero: Adam's first steps normalise their tiny gradients,
so a rounding difference in a gradient moves the step). The tolerances
are about ten (metrics) and three (parameters) times those: a change of
behaviour moves a loss or an update norm by far more than 1e-5.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).parent / "golden" / "methods.json"
METHODS = ("uniform", "stratified", "dograph", "loss_based", "group_dro", "doremi", "doge",
           "regmix", "mixing_law", "aioli", "rnb", "temperature")
# Logged by scikit-learn (see the module docstring): compared to 1e-12.
AGREEMENT = ("ari", "nmi")
# Float32 rounding across CPUs (measured in the module docstring).
METRICS_RTOL = 1e-5
PARAMS_TOL = 1e-4
# Per-method arguments that make a 3-step run exercise the method's rule.
ARGS = {"loss_based": {"burn_in": "1"},
        "aioli": {"sweep_rounds": "1", "sweep_steps": "1", "round_steps": "3"},
        "temperature": {"T": "2.0"}, "rnb": {"round_steps": "2"}}
# The record was written when every mixer weighted the batch in place; Aioli
# and R&B have sampled since (their papers' form), so their in-batch form,
# --apply_weights reweight, is what stays pinned (the sampler has tests of its own).
APPLY = {"aioli": "reweight", "rnb": "reweight"}


def _corpus(root: Path) -> Path:
  """Two domains of the bundled synthetic generator (few proxy runs needed)."""
  from dograph_jax.data import read_split, write_synthetic_corpus
  full = write_synthetic_corpus(root / "full", seed=1, total_docs=300)
  out = root / "two"
  for split in ("train", "validation"):
    (out / split).mkdir(parents=True)
    docs, _ = read_split(full, split)
    with open(out / split / "part.jsonl", "w") as f:
      for name in ("code", "prose"):
        for text in docs[name]:
          f.write(json.dumps({"text": text, "domain": name}) + "\n")
  return out


def _run(method: str, corpus: Path, out_dir: Path) -> Path:
  """Trains ``method`` for 3 steps; returns the directory of its final run."""
  from dograph_jax.train import pretrain
  from dograph_jax.train import config
  cfg = config.make_config(data_dir=str(corpus), vocab_size=300, model="mini", steps=3,
                    batch_size=8, seq_len=16, num_domains=3, sketch_dim=64, eval_every=0,
                    eval_rows=4, save_every=0, log_every=1, warmup_steps=1, lr=3e-3,
                    proxy_steps=2, proxy_runs=3, regroup_k="2:3", method=method,
                    method_args=ARGS.get(method, {}), apply_weights=APPLY.get(method, "paper"),
                    out_dir=str(out_dir), plots=False)
  pretrain.train(cfg)
  final = out_dir / "stages" / "final"
  return final if final.exists() else out_dir


def _params(run_dir: Path) -> dict:
  """``{path: (sha256 of the float32 bytes, float64 sum, float64 L1 norm)}``
  of the last checkpoint's parameters, read with orbax alone (the record's
  entries, written before the L1 norm was, have the first two)."""
  import orbax.checkpoint as ocp
  ckpt = run_dir / "checkpoints"
  step = max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
  tree = ocp.PyTreeCheckpointer().restore(ckpt / str(step) / "state")["params"]
  out = {}

  def walk(prefix, node):
    if isinstance(node, dict):
      for k in sorted(node):
        walk(f"{prefix}/{k}", node[k])
    else:
      a = np.ascontiguousarray(np.asarray(node))
      a64 = a.astype(np.float64)
      out[prefix] = [hashlib.sha256(a.tobytes()).hexdigest()[:16], float(a64.sum()),
                     float(np.abs(a64).sum())]
  walk("", tree)
  return out


def _record(method: str, root: Path) -> dict:
  final = _run(method, _corpus(root) if not (root / "two").exists() else root / "two",
               root / method)
  records = [json.loads(line) for line in (final / "metrics.jsonl").read_text().splitlines()]
  for r in records:  # wall-clock times are not behaviour
    r.pop("elapsed_s", None)
    r.pop("time", None)
  return {"metrics": records, "params": _params(final)}


@pytest.fixture(scope="module")
def golden():
  return json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def records(tmp_path_factory):
  """Every method's record, trained in a child process with the default
  compile (``XLA_FLAGS`` without the suite's optimisation level)."""
  root = tmp_path_factory.mktemp("golden")
  flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                   if not f.startswith("--xla_backend_optimization_level"))
  # The 12 runs compile many of the same programs again (every run jits its
  # own train and evaluation steps): a persistent compilation cache serves
  # them from disk, about a third of the child's CPU time. The executables
  # are the same, so are the records (checked bit for bit, 2026-12-05).
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags,
         "JAX_COMPILATION_CACHE_DIR": str(root / "compile_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  out = root / "records.json"
  result = subprocess.run([sys.executable, __file__, "--records", str(out), str(root)], env=env,
                          capture_output=True, text=True, timeout=1800)
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads(out.read_text())


def _assert_close(got, want, where: str) -> None:
  """``got`` equals ``want`` in structure and in every integer, string and
  boolean, and within ``METRICS_RTOL`` in every float."""
  if isinstance(want, dict):
    assert isinstance(got, dict) and sorted(got) == sorted(want), f"{where}: keys differ"
    for k in want:
      _assert_close(got[k], want[k], f"{where}.{k}")
  elif isinstance(want, list):
    assert isinstance(got, list) and len(got) == len(want), f"{where}: lengths differ"
    for i, (g, w) in enumerate(zip(got, want)):
      _assert_close(g, w, f"{where}[{i}]")
  elif isinstance(want, float):
    assert isinstance(got, float), f"{where}: {got!r} is not a float"
    assert got == pytest.approx(want, rel=METRICS_RTOL, abs=1e-12), where
  else:  # int, str, bool, None: exact (an int is not a float here, nor the reverse)
    assert type(got) is type(want) and got == want, f"{where}: {got!r} != {want!r}"


@pytest.mark.parametrize("method", METHODS)
def test_method_reproduces_its_pinned_run(method, golden, records):
  got = records[method]
  want = golden[method]
  assert len(got["metrics"]) == len(want["metrics"])
  for g, w in zip(got["metrics"], want["metrics"]):
    g = dict(g)
    for key in AGREEMENT:
      if key in w:
        assert g.pop(key) == pytest.approx(w[key], rel=1e-12, abs=1e-15), (method, key)
    _assert_close(g, {k: v for k, v in w.items() if k not in AGREEMENT},
                  f"{method} step {w.get('step')}")
  assert sorted(got["params"]) == sorted(want["params"]), f"{method}: parameter leaves differ"
  for path, (_, total, *_) in want["params"].items():
    _, got_total, l1 = got["params"][path]
    assert abs(got_total - total) <= PARAMS_TOL * l1, \
        f"{method}: final parameters changed at {path} ({got_total} != {total}, L1 {l1})"


def test_comparison_fails_on_a_change_of_behaviour(golden):
  """``_assert_close`` is not vacuous: the record passes against itself, and
  a 1e-4 relative change of one logged loss, one more row in a logged
  cluster, or an integer logged as a float each fail."""
  want = golden["dograph"]["metrics"][0]
  _assert_close(json.loads(json.dumps(want)), want, "itself")
  changed = json.loads(json.dumps(want))
  changed["loss"] *= 1 + 1e-4
  with pytest.raises(AssertionError):
    _assert_close(changed, want, "loss")
  sizes = json.loads(json.dumps(want))
  assert isinstance(sizes["cluster_sizes"][0], int)
  sizes["cluster_sizes"][0] += 1
  with pytest.raises(AssertionError):
    _assert_close(sizes, want, "cluster_sizes")
  as_float = json.loads(json.dumps(want))
  as_float["step"] = float(as_float["step"])
  with pytest.raises(AssertionError):
    _assert_close(as_float, want, "step")


if __name__ == "__main__" and "--records" in sys.argv:  # the tests' child process
  out, tmp = map(Path, sys.argv[sys.argv.index("--records") + 1:][:2])
  out.write_text(json.dumps({m: _record(m, tmp) for m in METHODS}))

if __name__ == "__main__" and "--write" in sys.argv:
  import tempfile
  with tempfile.TemporaryDirectory() as tmp:
    result = {m: _record(m, Path(tmp)) for m in METHODS}
  GOLDEN.parent.mkdir(exist_ok=True)
  GOLDEN.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
  print(f"wrote {GOLDEN}")
