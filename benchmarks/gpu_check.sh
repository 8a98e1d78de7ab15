#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py says what it runs, in which order, and what it writes):
#
#   bash benchmarks/gpu_check.sh OUT_DIR [--deadline-s 540]   on a GPU machine, e.g. OUT_DIR=$OUT
#   bash benchmarks/gpu_check.sh --dry-run OUT_DIR            every step on the CPU at tiny sizes
#
# At most six files land in OUT_DIR, each appended as it is measured; the last lines printed are
# the summary. PYTHON picks the interpreter (default: python, or python3 where there is no python).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
[ -n "$PY" ] || { echo "gpu_check.sh: neither python nor python3 is on PATH (set PYTHON)" >&2; exit 2; }
export PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$@"
