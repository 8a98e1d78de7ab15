#!/usr/bin/env bash
# Everything only a GPU can tell, in one command on a GPU machine with no package index:
# build the package (CUDA kernels included), run the kernel tests on the GPU, benchmark every
# backend against dense cuBLAS and torch's semi-structured 2:4, and write JSON + a PNG plot.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      (default: benchmarks/results)
#
# Needs torch (a CUDA build), triton, transformers and nvcc; PYTHON picks the interpreter.
# Failing tests do not stop the benchmarks; the exit status is non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results}
PY=${PYTHON:-python}
mkdir -p "$OUT"
DAY=$(date +%Y%m%d)
status=0
step() { echo; echo "== $* ($(date +%T))"; }
run() { "$@" || { echo "!! failed ($?): $*"; status=1; }; }
# run, with all output in a log file and its tail on screen (no pipeline: `run` must set status
# in this shell).
run_logged() {
  local log=$1 lines=$2
  shift 2
  run "$@" > "$log" 2>&1
  tail -n "$lines" "$log"
}

step "environment"
run "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__); print(torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem \
  --format=csv,noheader

step "build (CUDA kernels for ${TORCH_CUDA_ARCH_LIST:-8.0;9.0a})"
run_logged "$OUT/gpu-build-$DAY.log" 40 "$PY" -m pip install --no-build-isolation --no-deps -e .
run "$PY" -c "import sparse_kernels as sk; print('backends:', sk.available_backends())"

step "kernel tests on the GPU"
run_logged "$OUT/gpu-tests-$DAY.log" 60 "$PY" -m pytest -q -rs tests/test_cuda_backend.py \
  tests/test_triton_backend.py tests/test_hybrid_linear.py tests/test_pruning_ops.py \
  tests/test_backends.py tests/test_format.py tests/test_modules.py tests/test_mma_layout.py

step "hybrid matmul vs cuBLAS and torch 2:4 (fp16, LLaMA-2-7B shapes)"
LINEAR_JSON="$OUT/gpu-linear-$DAY.json"
run "$PY" benchmarks/bench_linear.py --device cuda --dtype float16 \
  --shapes 4096x4096,11008x4096,4096x11008 --batches 1,4,16,64,256,2048 \
  --mixes hybrid,all-dense --out "$LINEAR_JSON"

step "pruning kernels vs copy bandwidth (4096x11008, fp16)"
run "$PY" benchmarks/bench_prune_kernels.py --device cuda --out "$OUT/gpu-prune-kernels-$DAY.json"

step "plot"
if "$PY" -c "import matplotlib" 2>/dev/null; then
  run "$PY" benchmarks/plot_linear.py "$LINEAR_JSON"
else
  echo "matplotlib is not installed: no PNG (plot later with benchmarks/plot_linear.py)"
fi

step "done: status $status, results in $OUT"
exit $status
