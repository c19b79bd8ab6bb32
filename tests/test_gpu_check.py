"""benchmarks/gpu_check.sh --cpu_smoke: the prepared device check runs end to
end at tiny sizes on the CPU (so it cannot rot before a GPU is lent)."""

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_smoke(tmp_path):
  out = tmp_path / "out"
  proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(out), "--cpu_smoke"], cwd=ROOT,
                        capture_output=True, text=True, timeout=900,
                        env={**os.environ, "PYTHONPATH": str(ROOT)})
  assert proc.returncode == 0, proc.stderr[-3000:]
  parts = {line.split()[0]: int(line.split()[1])
           for line in (out / "parts.txt").read_text().splitlines()}
  assert parts == {"environment": 0, "attention": 0, "bench_bf16": 0, "corpus": 0,
                   "pretrain_dograph": 0, "pretrain_uniform": 0, "bench_fused": 0,
                   "bench_micro": 0, "pretrain_scale": 0, "bench_tinyllama": 0,
                   "bench_f32": 0}, parts
  assert json.loads((out / "attention.json").read_text())["ok"] is True
  expected = {"bf16": {"plain", "factored"}, "micro": {"plain", "factored", "factored_lagged"},
              "tinyllama": {"plain", "factored_lagged"}, "f32": {"plain", "factored"}}
  for tag, names in expected.items():
    result = json.loads((out / f"bench_{tag}.json").read_text())
    assert set(result["candidates"]) == names
    for name in names - {"plain"}:
      assert result["candidates"][name]["ratio_vs_plain"] > 0
  summary = (out / "summary.md").read_text()
  assert "| factored |" in summary and "step time DoGraph / Uniform" in summary
  assert "steady step time DoGraph / Uniform" in summary
  dograph = json.loads((out / "run_dograph" / "summary.json").read_text())
  assert dograph["method"] == "dograph" and dograph["steps"] == 6
  # The run with every paper-scale option read them, and cached outside the data.
  scale = json.loads((out / "run_scale" / "config.json").read_text())
  assert (scale["optim"]["micro_batches"], scale["model"]["remat"], scale["model"]["attention"],
          scale["update"]) == (2, "block", "dot_product", "lagged")
  assert (out / "cache").is_dir() and "bench_step micro" in summary


def test_gpu_check_rejects_unknown_options(tmp_path):
  proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(tmp_path), "--gpu"], cwd=ROOT,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2 and "unknown option --gpu" in proc.stderr
  proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(tmp_path), "--parts",
                         "bench_bf16,bench_tiny"], cwd=ROOT, capture_output=True, text=True,
                        timeout=60)
  assert proc.returncode == 2 and "unknown part bench_tiny" in proc.stderr


def test_gpu_check_runs_only_the_chosen_parts(tmp_path):
  # PYTHON=true: every part "succeeds" at once; this checks the selection only.
  out = tmp_path / "out"
  proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(out), "--cpu_smoke", "--parts",
                         "pretrain_uniform,bench_tinyllama"], cwd=ROOT, capture_output=True,
                        text=True, timeout=60, env={**os.environ, "PYTHON": "true"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  # environment always runs; the corpus because a pretrain part needs it.
  assert [line.split()[0] for line in (out / "parts.txt").read_text().splitlines()] == [
      "environment", "corpus", "pretrain_uniform", "bench_tinyllama"]
