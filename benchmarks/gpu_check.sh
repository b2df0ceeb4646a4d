#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU and the dev requirements installed (pip install -r requirements-dev.txt):
#   1. the CUDA test tier (pytest -m cuda: placement, bf16/fp16 forwards, CPU vs CUDA parity on the tiny CLIP);
#   2. benchmarks/bench_cuda.py: full-size ViT-L/14@336 latency, batch throughput, memory and fidelity on the GPU;
#   3. benchmarks/bench_inference.py: the CPU figures of the same machine.
# Each step has its own time limit so that the whole check ends within 10 minutes; the script exits non-zero when
# a step fails or runs out of time, after running the others.
#
#   bash benchmarks/gpu_check.sh [--workdir DIR]   # DIR keeps the full-size random CLIP between runs (1.7 GB)
set -uo pipefail
cd "$(dirname "$0")/.."

workdir=${TMPDIR:-/tmp}/zsad-bench
if [[ "${1:-}" == "--workdir" ]]; then
    workdir=$2
fi

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU visible to torch ($(python -c 'import torch; print(torch.__version__)'))" >&2
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

status=0
# step NAME SECONDS COMMAND...: runs COMMAND under a time limit and prints its time and outcome.
step() {
    local name=$1 limit=$2 started=$SECONDS code=0
    shift 2
    echo "=== $name (limit ${limit} s)"
    timeout "$limit" "$@" || code=$?
    local outcome="passed"
    if [[ $code == 124 ]]; then outcome="ran out of time"; elif [[ $code != 0 ]]; then outcome="failed (exit code $code)"; fi
    echo "=== $name: $outcome after $((SECONDS - started)) s"
    [[ $code == 0 ]] || status=1
}

step "CUDA tests" 150 python -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py
step "GPU benchmark" 240 python benchmarks/bench_cuda.py --workdir "$workdir"
step "CPU benchmark" 180 python benchmarks/bench_inference.py --repeats 2 --workdir "$workdir"
exit $status
