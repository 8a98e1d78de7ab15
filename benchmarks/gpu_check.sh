#!/usr/bin/env bash
# Everything only a GPU can tell, most valuable first, in one command that fits 8 minutes on a
# GPU machine with no package index (torch with CUDA, triton, transformers, nvcc):
#
#   1. environment; nvcc's CUDA major must equal torch's
#   2. build the CUDA kernels for this GPU's capability only, MAX_JOBS = cores
#   3. smoke: 2:4 metadata position by position, large shapes against F.linear (gpu_smoke.py)
#   4. decode: cuda backend, default mix, LLaMA-2-7B shapes, batch 1 / 4 / 16 vs cuBLAS, torch 2:4:
#      the v2 kernel (prepared layout) first, then v1 (canonical format), one process each so a
#      fault in one cannot take the other's numbers with it
#   5. prefill 2048 / 256 / 64 (v1, then the weight unpacked for cuBLAS); then the triton backend;
#      then the all-dense control
#   6. whole-model tokens/s, dense vs hybrid, on a LLaMA-2-7B-shaped model (bench_model.py)
#   7. kernel tests on the GPU: CUDA, then Triton with one config per kernel (no autotuning,
#      no torch.compile tests)
#   8. pruning kernels (cuda, triton), then the plot
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]            (default benchmarks/results/gpu-<date>)
#   bash benchmarks/gpu_check.sh --dry-run OUT_DIR    every step on the CPU at tiny sizes
#
# Every step runs under `timeout`; every measurement is appended to OUT_DIR/*.jsonl the moment it
# is made, and every step's name, status and seconds to OUT_DIR/steps.jsonl, so a run killed at
# any point keeps all it finished. The dry run (no GPU, no build) leaves the same files: CI runs
# it to prove the plumbing. The exit status is non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
DAY=$(date +%Y%m%d)
OUT=${1:-benchmarks/results/gpu-$DAY}
PY=${PYTHON:-python}
mkdir -p "$OUT"
status=0

if [ "$DRY" = 1 ]; then
  DEV=cpu; NATIVE=cpu; DTYPE=float32; SHAPES=64x48,40x200; BIG=96x64
  DECODE=1,4; PREFILL=64,16; SMOKE_BATCHES=1,3; ITERS=2; KERNEL_SHAPE=64x96
  MODEL=(--shape tiny --batches 1,2 --new-tokens 4 --prompt 32 --repeats 1 --graph-steps 2)
  export TRITON_INTERPRET=1   # Triton steps run interpreted: plumbing, not speed
else
  DEV=cuda; NATIVE=cuda; DTYPE=float16; SHAPES=4096x4096,11008x4096,4096x11008
  BIG=4096x4096,11008x4096; DECODE=1,4,16; PREFILL=2048,256,64; SMOKE_BATCHES=1,16,2048
  ITERS=50; KERNEL_SHAPE=4096x11008; MODEL=(--shape llama2-7b --batches 1,8,32)
fi

# step NAME SECONDS CMD...: run CMD under a time limit, log it, record how it ended.
step() {
  local name=$1 limit=$2
  shift 2
  echo; echo "== $name ($(date +%T), at most ${limit}s)"
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/gpu-check.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "!! $name failed (exit $rc)"; status=1; }
  printf '{"step": "%s", "exit": %d, "seconds": %d}\n' "$name" "$rc" $((SECONDS - t0)) \
    >> "$OUT/steps.jsonl"
  return 0
}
# bench_linear.py with the JSON-lines file every run of it shares
LINEAR=("$PY" benchmarks/bench_linear.py --device "$DEV" --dtype "$DTYPE" --iters "$ITERS"
        --jsonl "$OUT/linear.jsonl")

step environment 30 "$PY" - "$DRY" <<'EOF'
import re, shutil, subprocess, sys
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
dry = sys.argv[1] == "1"
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), torch.cuda.get_device_capability())
elif not dry:
    sys.exit("no CUDA GPU is visible")
nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
try:
    text = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    release = re.search(r"release (\d+)\.(\d+)", text).groups()
except (OSError, AttributeError):
    release = None
print("nvcc", ".".join(release) if release else "not found")
if torch.version.cuda and release and release[0] != torch.version.cuda.split(".")[0]:
    sys.exit(f"nvcc is CUDA {release[0]} but torch was built with CUDA {torch.version.cuda}: "
             "the extension would not load; put the matching nvcc first on PATH")
if not dry and not release:
    sys.exit("nvcc not found: the CUDA kernels cannot be built")
EOF

if [ "$DRY" = 1 ]; then
  echo; echo "== build: skipped in a dry run (the installed package is used)"
else
  ARCH=$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(); \
print(f'{m}.{n}' + ('a' if (m, n) == (9, 0) else ''))")
  step "build (sm $ARCH only)" 300 env TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
fi
step backends 30 "$PY" -c "import sparse_kernels as sk; print('backends:', sk.available_backends())"

step smoke 90 "$PY" benchmarks/gpu_smoke.py --device "$DEV" --dtype "$DTYPE" \
  --shapes "$BIG" --batches "$SMOKE_BATCHES" --jsonl "$OUT/smoke.jsonl"
MIX=(--mixes hybrid --shapes "$SHAPES")
for V in v2 v1; do
  step "decode ($NATIVE, $V)" 120 "${LINEAR[@]}" --backends "$NATIVE" --cuda-kernels "$V" \
    "${MIX[@]}" --batches "$DECODE" --out "$OUT/linear-decode-$NATIVE-$V.json"
done
step "prefill ($NATIVE)" 150 "${LINEAR[@]}" --backends "$NATIVE" --cuda-kernels v1,unpack "${MIX[@]}" \
  --batches "$PREFILL" --out "$OUT/linear-prefill-$NATIVE.json"
step "decode + prefill (triton)" 150 "${LINEAR[@]}" --backends triton "${MIX[@]}" \
  --batches "$DECODE,$PREFILL" --out "$OUT/linear-triton.json"
step "all-dense control ($NATIVE)" 90 "${LINEAR[@]}" --backends "$NATIVE" --mixes all-dense \
  --shapes "$SHAPES" --batches "$DECODE,$PREFILL" --out "$OUT/linear-all-dense.json"

step "whole model: greedy decode and prefill tokens/s" 240 "$PY" benchmarks/bench_model.py \
  --device "$DEV" "${MODEL[@]}" --jsonl "$OUT/model.jsonl" --out "$OUT/model.json"

step "tests: cuda" 120 "$PY" -m pytest -q -x -rs tests/test_cuda_backend.py
if [ "$DRY" = 1 ]; then
  echo; echo "== tests: triton: skipped in a dry run (CI runs them interpreted)"
else
  step "tests: triton (one config per kernel)" 180 env SPARSE_KERNELS_TRITON_ONE_CONFIG=1 \
    "$PY" -m pytest -q -x -rs tests/test_triton_backend.py \
    -k "not torch_compile and not compiles_for"
fi

step "pruning kernels" 90 "$PY" benchmarks/bench_prune_kernels.py --device "$DEV" \
  --backends "$NATIVE,triton" --shape "$KERNEL_SHAPE" --iters "$ITERS" \
  --jsonl "$OUT/prune-kernels.jsonl" --out "$OUT/prune-kernels.json"
if "$PY" -c "import matplotlib" 2>/dev/null; then
  step plot 60 "$PY" benchmarks/plot_linear.py "$OUT/linear-decode-$NATIVE-v2.json"
else
  echo "matplotlib is not installed: no PNG (plot later with benchmarks/plot_linear.py)"
fi

echo; echo "== done: status $status, results in $OUT"
exit $status
