#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU, torch (2.11 .. 2.14) and triton (3.6 .. 3.8)
# already installed and no network, build the CUDA kernels, run the GPU tests and the GPU
# benchmark, all within 8 minutes, print a short table and write everything to a folder.
#
#     bash benchmarks/gpu_check.sh [OUTDIR]        # OUTDIR: default $OUT, else ./gpu_check_out
#
# Runs from a checkout without installing anything (PYTHONPATH=the repository). Writes to OUTDIR:
#   env.txt            GPU, driver, versions (nvidia-smi, python -m gerne_kernels info)
#   build.log          the CUDA build (time, errors) and its compiler log
#   pytest_cuda.{log,xml}, pytest_triton.{log,xml}, pytest_scalars.{log,xml}
#                      tests/test_cuda_kernel.py, tests/test_triton_kernel.py, the GPU tests
#                      of tests/test_tensor_scalars.py
#   bench.log, bench_gpu.json, bench_gpu.md   benchmarks/bench_gpu.py (bench_gpu.md: the table
#                      for benchmarks/RESULTS.md)
#   summary.txt        one line per stage: ok / FAILED / TIMEOUT and its seconds
# Each stage has its own time limit, cut to what is left of the 8 minutes; a stage that fails
# does not stop the later ones. The exit status is 0 only if every stage passed.
set -uo pipefail
cd "$(dirname "$0")/.."

OUTDIR="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
# A fresh build cache outside OUTDIR (the library is large and is not a result).
export GERNE_KERNELS_CACHE="${GERNE_KERNELS_CACHE:-$(mktemp -d)}"
export PYTHONUNBUFFERED=1                    # logs stay complete when a stage is killed
PYTHON="${PYTHON:-python3}"

BUDGET=480                                   # seconds for everything
START=$(date +%s)
STATUS=0
: > "$OUTDIR/summary.txt"

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# stage NAME CAP LOG COMMAND...: runs COMMAND with a limit of min(CAP, time left - RESERVE)
stage() {
    local name=$1 cap=$2 log=$3 reserve=$4
    shift 4
    local limit
    limit=$(( $(left) - reserve ))
    (( limit > cap )) && limit=$cap
    if (( limit < 10 )); then
        echo "$name: SKIPPED (no time left)" | tee -a "$OUTDIR/summary.txt"
        STATUS=1
        return
    fi
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
    rc=$?
    local took=$(( $(date +%s) - t0 ))
    if (( rc == 0 )); then
        echo "$name: ok (${took} s)" | tee -a "$OUTDIR/summary.txt"
    elif (( rc == 124 || rc == 137 )); then
        echo "$name: TIMEOUT after ${took} s (limit ${limit} s)" | tee -a "$OUTDIR/summary.txt"
        STATUS=1
    else
        echo "$name: FAILED (exit $rc, ${took} s), see $log" | tee -a "$OUTDIR/summary.txt"
        STATUS=1
    fi
}

{
    date -Is
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory --format=csv \
        2>&1 || true
    "$PYTHON" -c "import torch, sys; print('python', sys.version.split()[0], '| torch',
torch.__version__, '| CUDA', torch.version.cuda, '| device', torch.cuda.get_device_name()
if torch.cuda.is_available() else 'none')" 2>&1
    "$PYTHON" -c "import triton; print('triton', triton.__version__)" 2>&1 || true
    "$PYTHON" -m gerne_kernels info 2>&1 || true
} > "$OUTDIR/env.txt"
cat "$OUTDIR/env.txt"

# Build first, on its own, so that its time and log are not mixed with the tests'.
stage build 240 "$OUTDIR/build.log" 240 "$PYTHON" -c "
import sys, shutil
from gerne_kernels import _build
r = _build.build('cuda')
print(r)
if r.log_path:
    print(open(r.log_path).read())
sys.exit(0 if r.ok else 1)"

# The two test files in separate stages: one that runs long cannot take the other's results.
stage cuda_tests 150 "$OUTDIR/pytest_cuda.log" 150 "$PYTHON" -m pytest \
    tests/test_cuda_kernel.py -q -rfEs -p no:cacheprovider --junitxml="$OUTDIR/pytest_cuda.xml"
tail -n 15 "$OUTDIR/pytest_cuda.log"
if [[ -f tests/test_triton_kernel.py ]]; then
    stage triton_tests 150 "$OUTDIR/pytest_triton.log" 100 "$PYTHON" -m pytest \
        tests/test_triton_kernel.py -q -rfEs -p no:cacheprovider \
        --junitxml="$OUTDIR/pytest_triton.xml"
    tail -n 15 "$OUTDIR/pytest_triton.log"
else
    echo "triton_tests: SKIPPED (tests/test_triton_kernel.py is missing)" \
        | tee -a "$OUTDIR/summary.txt"
fi

# The .tensor overloads on the GPU: graph replays that follow lr/beta, no host sync in a step.
stage scalar_tests 60 "$OUTDIR/pytest_scalars.log" 60 "$PYTHON" -m pytest \
    tests/test_tensor_scalars.py -q -rfEs -p no:cacheprovider \
    -k "gpu or captured or never_syncs" --junitxml="$OUTDIR/pytest_scalars.xml"
tail -n 8 "$OUTDIR/pytest_scalars.log"

stage bench 200 "$OUTDIR/bench.log" 5 "$PYTHON" benchmarks/bench_gpu.py --out "$OUTDIR"
cat "$OUTDIR/bench.log"

echo
echo "== GPU check ($(( $(date +%s) - START )) s of ${BUDGET} s) =="
cat "$OUTDIR/summary.txt"
exit $STATUS
