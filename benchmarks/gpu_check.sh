#!/usr/bin/env bash
# One-GPU check (tests, CUDA-vs-CPU equivalence, single-rank benchmark); see benchmarks/gpu_check.py.
# Needs only python3 with torch (CUDA build); the repository does not have to be installed.
#   bash benchmarks/gpu_check.sh                       # on a machine with one CUDA GPU, < 8 minutes
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --dry-run   # CPU smoke test of the script
# Writes $OUT/gpu_check.json when OUT is set, else benchmarks/results/gpu_check.json.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# hard stop at 7 min 50 s whatever happens (the script budgets itself to 7 min 30 s)
exec timeout --signal=INT --kill-after=10 470 "$PY" benchmarks/gpu_check.py "$@"
