#!/usr/bin/env bash
# One prepared device check (issue 15): DoGraph's step against a plain AdamW
# step on a GPU, every part under its own time limit. All parts together take
# longer than one 10-minute device call (XLA:GPU compiles DoGraph's GPT-2
# step in ~130 s): pick the parts of each call with --parts.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [--cpu_smoke] [--parts a,b,...]
#
# OUT_DIR defaults to $OUT (the device tool's output folder), else
# ./gpu_check_out. Parts, in order of priority (a part that runs out of time
# is killed and recorded; the others still run):
#   0. environment: wheels carried in ./.whl (the device machine reaches no
#      registry: the device README says how to fetch them) are installed into
#      /tmp/site, and the checkout itself is put on PYTHONPATH; failing
#      that, JAX for CUDA / the package are pip-installed. Prints jax, CUDA
#      and the device.
#   attention: benchmarks/check_attention.py, cuDNN flash attention against
#      XLA's on bfloat16 operands, both against a float32 oracle (kernel
#      outputs and gradients, GPT-2 and GQA shapes; paper-small's losses and
#      gradient).
#   1. bench_bf16: benchmarks/bench_step.py at GPT-2 124M, B 48, T 512, K 1024,
#      bfloat16: plain, factored + book-keeping and factored + second backward
#      (the reference vmap(grad) path needs hundreds of GiB there): median/min
#      ms, ratio to plain, peak device memory, tokens/s, MFU against the
#      H200's dense bf16 peak.
#   2. pretrain_dograph, pretrain_uniform: 200 steps of experiments/pretrain.py
#      --model paper-small --batch_size 48 --seq_len 512 on the synthetic corpus.
#   3. bench_fused: 1 with --attention dot_product --remat block (cuDNN flash
#      attention where it applies, blocks recomputed in the backward pass).
#   4. bench_micro: 3 with --micro_batches 4 (plain, factored: the exact
#      two-pass step, factored_lagged: one pass, --update lagged);
#      pretrain_scale: 2 (DoGraph) with --cache_dir, --attention dot_product,
#      --remat block, --micro_batches 2, --update lagged.
#   bench_tinyllama: issue 24's target, TinyLlama-1.1B at B 64 x T 2048 in
#      bfloat16, --attention dot_product --remat block --micro_batches 16,
#      plain and factored_lagged, timed; memory is the compiled figure (XLA:GPU's
#      buffer assignment, the target's measure), no peak subprocesses.
#   5. bench_f32: the same as 1 in float32, MFU against the dense TF32 peak.
# --parts runs only the named parts (comma-separated; environment always
# runs), in the order above, e.g. --parts bench_bf16,bench_tinyllama.
# Then summary.md (all parts' numbers and the ratios) is written and printed.
#
# --cpu_smoke: the same parts at tiny sizes on the CPU, nothing installed
# (tests/test_gpu_check.py runs it so that the script cannot rot).
set -u
OUT_DIR="${OUT:-gpu_check_out}"
SMOKE=0
PARTS=all
ALL_PARTS=" attention bench_bf16 pretrain_dograph pretrain_uniform bench_fused bench_micro pretrain_scale bench_tinyllama bench_f32 "
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu_smoke) SMOKE=1 ;;
    --parts) shift; PARTS="${1:-}" ;;
    --parts=*) PARTS="${1#--parts=}" ;;
    -*) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
    *) OUT_DIR="$1" ;;
  esac
  shift
done
if [ "$PARTS" != all ]; then
  for name in ${PARTS//,/ }; do
    case "$ALL_PARTS" in
      *" $name "*) ;;
      *) echo "gpu_check.sh: unknown part $name (parts:$ALL_PARTS)" >&2; exit 2 ;;
    esac
  done
fi
# wanted NAME: whether --parts selects part NAME.
wanted() { [ "$PARTS" = all ] || case ",$PARTS," in *",$1,"*) true ;; *) false ;; esac; }
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$(dirname "$0")/.."
: > "$OUT_DIR/parts.txt"
PY="${PYTHON:-python}"

log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$OUT_DIR/gpu_check.log"; }

# part NAME LIMIT_S CMD...: run CMD under its own time limit, log and record its status.
part() {
  local name="$1" limit="$2"
  shift 2
  if [ "$name" != environment ] && case "$ALL_PARTS" in *" $name "*) true ;; *) false ;; esac \
     && ! wanted "$name"; then
    return 0
  fi
  log "part $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  log "part $name: exit $rc after $((SECONDS - start))s$([ $rc -eq 124 ] && echo ' (time limit)')"
  echo "$name $rc $((SECONDS - start))" >> "$OUT_DIR/parts.txt"
  tail -n 25 "$OUT_DIR/$name.log"
}

if [ "$SMOKE" = 1 ]; then
  export JAX_PLATFORMS=cpu
  BENCH=(--model mini --batch_size 8 --seq_len 32 --sketch_dim 64 --vocab_size 256
         --candidates plain,factored --repeats 2 --warmup 1 --min_time 0.01)
  TRAIN=(--model mini --batch_size 8 --seq_len 32 --steps 6 --vocab_size 300
         --sketch_dim 64 --eval_rows 8 --log_every 2)
  TINY=(--model llama-mini --batch_size 8 --seq_len 32 --sketch_dim 64 --vocab_size 256
        --micro_batches 2 --repeats 2 --warmup 1 --min_time 0.01)
  ATTN=(--seq_len 64 --model mini --vocab_size 256 --model_seq_len 32)
  LIMIT_BENCH=300; LIMIT_TRAIN=300; LIMIT_TINY=300; LIMIT_ATTN=120; DATA="$OUT_DIR/synthetic"
else
  BENCH=(--model gpt2 --batch_size 48 --seq_len 512 --sketch_dim 1024 --vocab_size 50257
         --candidates plain,factored,factored_2bwd --repeats 10 --warmup 3)
  TRAIN=(--model paper-small --batch_size 48 --seq_len 512 --steps 200 --eval_rows 16)
  TINY=(--model tinyllama-1.1b --batch_size 64 --seq_len 2048 --sketch_dim 1024
        --vocab_size 32000 --micro_batches 16 --repeats 2 --warmup 1 --min_time 0
        --device_peak off)
  ATTN=(--seq_len 1024)
  # From the first H200 run (BENCHMARKS.md, 2026-12-04): XLA:GPU compiled
  # GPT-2's plain step in ~26 s and the factored DoGraph step in ~130 s, and
  # the peak-memory children load those executables again. The whole script
  # then needs more than one 10-minute device call: choose with --parts.
  LIMIT_BENCH="${LIMIT_BENCH:-420}"; LIMIT_TRAIN="${LIMIT_TRAIN:-240}"
  LIMIT_TINY="${LIMIT_TINY:-420}"; LIMIT_ATTN=240; DATA="$OUT_DIR/synthetic"
  if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
    part install_wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile \
      --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
  if ! "$PY" -c "import dograph_jax" 2>/dev/null; then
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
  if ! "$PY" -c "import jax, sys; sys.exit(0 if jax.default_backend() == 'gpu' else 1)" 2>/dev/null; then
    part install_jax 120 "$PY" -m pip install -q -U "jax[cuda12]"
  fi
  if ! "$PY" -c "import dograph_jax" 2>/dev/null; then
    part install_package 90 "$PY" -m pip install -q -e ".[train]"
  fi
fi
part environment 60 "$PY" -c "
import jax, platform, importlib.metadata as m
d = jax.devices()[0]
print('python', platform.python_version(), 'jax', jax.__version__, 'backend', jax.default_backend())
print('device', d.device_kind, 'count', jax.device_count())
for name in ('flax', 'optax', 'orbax-checkpoint', 'grain', 'jaxopt', 'tyro'):
    try:
        print(name, m.version(name))
    except Exception as e:
        print(name, 'missing:', type(e).__name__)
try:
    from jax._src.lib import cuda_versions
    print('cudnn', cuda_versions.cudnn_get_version() if cuda_versions else None)
except Exception as e:
    print('cudnn version unknown:', type(e).__name__)
try:
    import jax_cuda12_plugin, importlib.metadata as m
    print('jax-cuda12-plugin', m.version('jax-cuda12-plugin'))
except Exception as e:
    print('no CUDA plugin:', type(e).__name__)
"

part attention "$LIMIT_ATTN" "$PY" benchmarks/check_attention.py "${ATTN[@]}" --json "$OUT_DIR/attention.json"

part bench_bf16 "$LIMIT_BENCH" "$PY" benchmarks/bench_step.py "${BENCH[@]}" --dtype bfloat16 \
  --json "$OUT_DIR/bench_bf16.json"

# The synthetic corpus once, outside the timed runs (the runs then read it).
if wanted pretrain_dograph || wanted pretrain_uniform || wanted pretrain_scale; then
  part corpus 60 "$PY" -c "
from dograph_jax.data import write_synthetic_corpus
write_synthetic_corpus('$DATA', seed=0)
"
fi
for method in dograph uniform; do
  part "pretrain_$method" "$LIMIT_TRAIN" "$PY" experiments/pretrain.py "${TRAIN[@]}" \
    --method "$method" --data_dir "$DATA" --eval_every 0 --save_every 0 --plots false \
    --out_dir "$OUT_DIR/run_$method"
done

# The paper-scale options (issue 24): fused attention (cuDNN flash attention
# in bfloat16 on the GPU, XLA on the CPU) and rematerialised blocks.
part bench_fused "$LIMIT_BENCH" "$PY" benchmarks/bench_step.py "${BENCH[@]}" --dtype bfloat16 \
  --attention dot_product --remat block --json "$OUT_DIR/bench_fused.json"

# Micro-batches (issue 24): the same step in 4 sequential slices, with fused
# attention and rematerialised blocks; and a short run with every new option
# of the trainer (the packed cache outside the data folder included).
part bench_micro "$LIMIT_BENCH" "$PY" benchmarks/bench_step.py "${BENCH[@]}" --dtype bfloat16 \
  --attention dot_product --remat block --micro_batches 4 \
  --candidates plain,factored,factored_lagged --json "$OUT_DIR/bench_micro.json"
part pretrain_scale "$LIMIT_TRAIN" "$PY" experiments/pretrain.py "${TRAIN[@]}" \
  --method dograph --data_dir "$DATA" --cache_dir "$OUT_DIR/cache" --attention dot_product \
  --remat block --micro_batches 2 --update lagged --eval_every 0 --save_every 0 --plots false \
  --out_dir "$OUT_DIR/run_scale"

# Issue 24's one-device target: TinyLlama-1.1B, B 64 x T 2048, bfloat16.
part bench_tinyllama "$LIMIT_TINY" "$PY" benchmarks/bench_step.py "${TINY[@]}" --dtype bfloat16 \
  --candidates plain,factored_lagged --attention dot_product --remat block \
  --json "$OUT_DIR/bench_tinyllama.json"

# Dense TF32 peak of an H200 (half its dense bf16 989 TFLOP/s).
part bench_f32 "$LIMIT_BENCH" "$PY" benchmarks/bench_step.py "${BENCH[@]}" --dtype float32 \
  --peak_tflops 494.7 --json "$OUT_DIR/bench_f32.json"

"$PY" - "$OUT_DIR" <<'EOF' | tee "$OUT_DIR/summary.md"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("# gpu_check summary\n")
print("| part | exit | seconds |\n|---|---|---|")
for line in (out / "parts.txt").read_text().splitlines():
    name, rc, secs = line.split()
    print(f"| {name} | {rc} | {secs} |")
for tag in ("bf16", "fused", "micro", "tinyllama", "f32"):
    f = out / f"bench_{tag}.json"
    if not f.exists():
        print(f"\nbench_{tag}: no result"); continue
    r = json.loads(f.read_text())
    print(f"\n## bench_step {tag}: `{r['command']}`\n\n{r['device_kind']}, jax {r['jax']}, "
          f"{r['setting']}; MFU of plain {r.get('mfu_plain')} (peak {r.get('peak_tflops')} TFLOP/s)\n")
    print("| candidate | median ms | min ms | vs plain | device peak MiB | peak vs plain |")
    print("|---|---|---|---|---|---|")
    peak = lambda c: (c.get("device_peak") or {}).get("peak_bytes_in_use")
    plain_peak = peak(r["candidates"].get("plain", {}))
    for name, c in r["candidates"].items():
        ms = lambda v: "-" if v is None else f"{v * 1e3:.2f}"
        p = peak(c)
        print(f"| {name} | {ms(c['median_s'])} | {ms(c['min_s'])} | "
              f"{'-' if c['ratio_vs_plain'] is None else format(c['ratio_vs_plain'], '.3f')} | "
              f"{'-' if p is None else format(p / 2**20, ',.0f')} | "
              f"{'-' if not (p and plain_peak) else format(p / plain_peak, '.3f')} |"
              + (f" {c['skipped']}" if c.get("skipped") else ""))
    for t in r.get("targets", []):
        print(f"- {'MET' if t['met'] else 'NOT MET'}: {t['check']}: {t['value']}")
runs, steady = {}, {}
for method in ("dograph", "uniform", "scale"):
    f = out / f"run_{method}" / "summary.json"
    if f.exists():
        runs[method] = json.loads(f.read_text())["steps_per_s"]
        # after the first logged step (no compilation): records carry elapsed_s
        timed = [json.loads(l) for l in (out / f"run_{method}" / "metrics.jsonl").read_text()
                 .splitlines() if '"elapsed_s"' in l]
        if len(timed) >= 2 and timed[-1]["elapsed_s"] > timed[0]["elapsed_s"]:
            steady[method] = ((timed[-1]["step"] - timed[0]["step"])
                              / (timed[-1]["elapsed_s"] - timed[0]["elapsed_s"]))
print("\n## pretrain (steps/s of the loop with its compilation; steady: after the first "
      "logged step)\n")
for method, sps in runs.items():
    print(f"- {method}: {sps:.3f} steps/s, steady {steady.get(method, float('nan')):.3f}")
if "dograph" in runs and "uniform" in runs:
    print(f"- step time DoGraph / Uniform: {runs['uniform'] / runs['dograph']:.3f}")
if "dograph" in steady and "uniform" in steady:
    print(f"- steady step time DoGraph / Uniform: {steady['uniform'] / steady['dograph']:.3f}")
EOF
log "done: $OUT_DIR/summary.md"
