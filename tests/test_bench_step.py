"""benchmarks/bench_step.py --compile_only (the paper-scale plan on paper):
from abstract shapes, on one device and per device under an FSDP mesh, for
the LLaMA family too. Run as scripts: the mesh needs its own process."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _compile_only(out, *extra):
  proc = subprocess.run(
      [sys.executable, "benchmarks/bench_step.py", "--model", "llama-mini", "--compile_only",
       "--candidates", "plain,factored,rnb", "--vocab_size", "256", "--batch_size", "8",
       "--seq_len", "32", "--json", str(out), *extra],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)})
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(Path(out).read_text()), proc.stdout


def test_compile_only_one_device_and_fsdp_mesh(tmp_path):
  one, text = _compile_only(tmp_path / "one.json")
  assert "nothing was run" in text
  mesh, text = _compile_only(tmp_path / "mesh.json", "--mesh", "data=2,fsdp=4")
  assert "mesh: data=2,fsdp=4 (8 devices)" in text
  for result in (one, mesh):
    for name in ("plain", "factored", "rnb"):
      c = result["candidates"][name]
      assert c["samples_s"] == [] and c["xla_flops"] > 0
      assert c["memory_analysis"]["total"] > 0
  # FSDP over 4: each device holds about a quarter of the (large) state.
  arg = lambda r: r["candidates"]["plain"]["memory_analysis"]["argument_size_in_bytes"]
  assert arg(mesh) < 0.5 * arg(one)
  # The model FLOPs count the LLaMA's parameters (no position table).
  assert one["model_flops_per_step"] > 0 and one["params"] == 158_016 - 2 * 64 * 512 + 2 * 64 * 256


def test_step_program_hash_tells_programs_apart():
  """benchmarks/step_program_hash.py: a fixed hash per program, a different
  one for a different step (--update lagged)."""
  def run(*extra):
    proc = subprocess.run([sys.executable, "benchmarks/step_program_hash.py", *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split()[0]
  default = run()
  assert default == run() and len(default) == 16
  assert run("--update", "lagged") != default
