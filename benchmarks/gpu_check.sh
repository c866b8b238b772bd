#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU, torch (2.11 .. 2.14), triton (3.6 .. 3.8) and
# nvcc already installed and no network, build the CUDA kernels, run the GPU tests, check memory
# safety with compute-sanitizer and run the GPU benchmark, within 8 minutes, print a short table
# and write the results to a folder.
#
#     bash benchmarks/gpu_check.sh [OUTDIR]        # OUTDIR: default $OUT, else ./gpu_check_out
#
# Runs from a checkout without installing anything (PYTHONPATH=the repository). Only what needs a
# GPU runs here: CI already runs the Triton interpreter tests, the AOT compiles and the CPU tests.
# Writes five files to OUTDIR (the device tool returns at most eight):
#   summary.txt     one line per stage: ok / FAILED / TIMEOUT and its seconds
#   env.txt         GPU, driver, versions, which CUDA toolkit was used, backends
#   bench_gpu.json, bench_gpu.md   benchmarks/bench_gpu.py (bench_gpu.md: the table for
#                   benchmarks/RESULTS.md)
#   logs.tar.gz     build.log, pytest_*.log/.xml, sanitizer_*.log, bench.log
# Each stage has its own time limit, cut to what is left of the 8 minutes; a stage that fails
# does not stop the later ones. The exit status is 0 only if every stage passed.
set -uo pipefail
cd "$(dirname "$0")/.."

OUTDIR="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
LOGS="$(mktemp -d)"                          # packed into logs.tar.gz at the end
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# A fresh build cache outside OUTDIR (the library is large and is not a result).
export GERNE_KERNELS_CACHE="${GERNE_KERNELS_CACHE:-$(mktemp -d)}"
export PYTHONUNBUFFERED=1                    # logs stay complete when a stage is killed
PYTHON="${PYTHON:-python3}"
# The toolkit as torch's cpp_extension finds it ($CUDA_HOME, $CUDA_PATH, nvcc on $PATH,
# /usr/local/cuda), unless CUDA_HOME is set; printed in env.txt.
if [[ -z "${CUDA_HOME:-}" ]]; then
    CUDA_HOME="$("$PYTHON" -c "from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or '')" 2>/dev/null)"
    CUDA_HOME_FROM="torch.utils.cpp_extension's search"
else
    CUDA_HOME_FROM="\$CUDA_HOME"
fi
export CUDA_HOME
# Build for this GPU only (faster than every architecture).
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
    TORCH_CUDA_ARCH_LIST="$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)"
    export TORCH_CUDA_ARCH_LIST
fi

BUDGET=480                                   # seconds for everything
START=$(date +%s)
STATUS=0
: > "$OUTDIR/summary.txt"

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# stage NAME CAP LOG RESERVE COMMAND...: runs COMMAND with a limit of min(CAP, left - RESERVE)
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
        echo "$name: FAILED (exit $rc, ${took} s), see $(basename "$log") in logs.tar.gz" \
            | tee -a "$OUTDIR/summary.txt"
        STATUS=1
    fi
}

pytest_stage() {  # pytest_stage NAME CAP RESERVE PYTEST-ARGS...
    local name=$1 cap=$2 reserve=$3
    shift 3
    stage "$name" "$cap" "$LOGS/pytest_$name.log" "$reserve" "$PYTHON" -m pytest -q -rfEs \
        -p no:cacheprovider --junitxml="$LOGS/pytest_$name.xml" "$@"
    tail -n 6 "$LOGS/pytest_$name.log"
}

{
    date -Is
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory --format=csv \
        2>&1 || true
    "$PYTHON" -c "import torch, sys; print('python', sys.version.split()[0], '| torch',
torch.__version__, '| CUDA', torch.version.cuda, '| device', torch.cuda.get_device_name()
if torch.cuda.is_available() else 'none')" 2>&1
    "$PYTHON" -c "import triton; print('triton', triton.__version__)" 2>&1 || true
    echo "CUDA_HOME=$CUDA_HOME (from $CUDA_HOME_FROM); nvcc: $("$CUDA_HOME/bin/nvcc" --version 2>&1 | tail -n 1)"
    echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
    "$PYTHON" -m gerne_kernels info 2>&1 || true     # reports only: it compiles nothing
} > "$OUTDIR/env.txt"
cat "$OUTDIR/env.txt"

# The build, timed and bounded on its own (a child process per kind; its log in build.log).
stage build 240 "$LOGS/build.log" 240 "$PYTHON" -m gerne_kernels build cuda --timeout 230
cat "$LOGS/build.log"
log_path="$("$PYTHON" -c "from gerne_kernels import _build; print(_build.build_dir_for('cuda'))" 2>/dev/null)/build.log"
[[ -f "$log_path" ]] && cp "$log_path" "$LOGS/compiler.log"

# GPU tests only, each file group in its own stage so one that runs long cannot take the
# others' results: the ops on the cuda and triton backends (tests/ops), the Triton launch and
# capture tests, and the optimizer's device-scalar and whole-step capture tests.
pytest_stage ops 150 200 tests/ops -k "cuda or triton"
pytest_stage triton 60 170 tests/test_triton_kernel.py -k "not interpreter and not compil"
pytest_stage optimizer 50 150 tests/test_tensor_scalars.py -k "never_syncs or captured"

# Memory safety: compute-sanitizer (memcheck, then racecheck) over one small call of every op on
# each GPU backend, ragged sizes and a misaligned view included. It runs on some runtimes (seen on
# Firecracker) and not on others (gVisor: "Device not supported"): the log says which.
SANITIZER="$CUDA_HOME/bin/compute-sanitizer"
[[ -x "$SANITIZER" ]] || SANITIZER="$(command -v compute-sanitizer || true)"
if [[ -n "$SANITIZER" ]]; then
    for tool in memcheck racecheck; do
        stage "sanitizer_$tool" 60 "$LOGS/sanitizer_$tool.log" 110 "$SANITIZER" --tool "$tool" \
            --error-exitcode 3 bash -c "'$PYTHON' benchmarks/gpu_sanitizer_steps.py cuda && '$PYTHON' benchmarks/gpu_sanitizer_steps.py triton"
        tail -n 4 "$LOGS/sanitizer_$tool.log"
    done
else
    echo "sanitizer: SKIPPED (compute-sanitizer not found)" | tee -a "$OUTDIR/summary.txt"
fi

stage bench 200 "$LOGS/bench.log" 10 "$PYTHON" benchmarks/bench_gpu.py --out "$OUTDIR"
cat "$LOGS/bench.log"

tar -czf "$OUTDIR/logs.tar.gz" -C "$LOGS" .
echo
echo "== GPU check ($(( $(date +%s) - START )) s of ${BUDGET} s) =="
cat "$OUTDIR/summary.txt"
exit $STATUS
