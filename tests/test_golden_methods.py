"""Pinned behaviour of every method: a short fixed-seed run's logged metrics
and final parameters, recorded before the trainer moved into the library
(``tests/golden/methods.json``), reproduced bit for bit on the CPU.

The record was written by ``python tests/test_golden_methods.py --write`` on
the code as it was before the redesign; a change that alters any logged
number or any parameter bit of these runs fails here. The parameters are
read from the final run's last checkpoint with orbax directly (no project
code), so the pin holds across changes of the trainer's own state types.
Rewrite the record only for a change that is *meant* to change results,
and say so in its commit.

The runs are trained in a child process compiled with XLA's default
options (``conftest.py`` compiles the rest of the suite at LLVM level 0,
which may change the last bits of a float); the child writes the records
and the tests here compare them.

One stated tolerance: the logged clustering agreement (``ari``, ``nmi``) is
computed by scikit-learn since the redesign (it was hand-written), which
sums the same terms in another order: equal to 1e-12 relative, not bit for
bit. They are diagnostics of the logged clusters, which are compared
exactly (``cluster_sizes``, ``contingency``), as are every loss, weight
and parameter.
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
  """``{path: (sha256 of the float32 bytes, float64 sum)}`` of the last
  checkpoint's parameters, read with orbax alone."""
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
      out[prefix] = [hashlib.sha256(a.tobytes()).hexdigest()[:16], float(a.astype(np.float64).sum())]
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


@pytest.mark.parametrize("method", METHODS)
def test_method_reproduces_its_pinned_run(method, golden, records):
  got = records[method]
  want = golden[method]
  assert len(got["metrics"]) == len(want["metrics"])
  for g, w in zip(got["metrics"], want["metrics"]):
    for key in AGREEMENT:
      if key in w:
        assert g.pop(key) == pytest.approx(w[key], rel=1e-12, abs=1e-15), (method, key)
    assert g == {k: v for k, v in w.items() if k not in AGREEMENT}, \
        f"{method}: logged metrics changed at step {w.get('step')}"
  assert got["params"] == want["params"], f"{method}: final parameters changed"


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
