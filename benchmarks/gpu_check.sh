#!/usr/bin/env bash
# The GPU check: one command for a fresh lent GPU machine (H100/H200; torch, Triton, pybind11,
# pytest and pytest-benchmark installed, no network, no open_clip_torch). From the repository
# root:
#
#   bash ../shared/tools/gpu-wheels.sh          # here, once: open_clip's wheels into .whl/
#   device run: bash benchmarks/gpu_check.sh    # carry [".whl"], timeout_s 600
#
# It builds armfast for sm_90 only (pip --no-build-isolation), runs the GPU tests (the
# GPU-marked ones and tests/triton), then `armfast bench --tune` on every op in bfloat16 (the
# host-overhead shapes and the design's shapes, every backend against reference and sdpa, with
# the device's measured ceilings), and writes into $OUT (default ./gpu-check):
#   cuda.json        the raw benchmark (copy to benchmarks/results/cuda.json)
#   auto_table.json  armfast/ops/auto_table.json with this GPU's entries (copy it back)
#   RESULTS.md       benchmarks/RESULTS.md with the GPU section rendered from cuda.json
#   first_calls.json cold first-call costs of the fused backends, per dtype/head dim/bucket
#   triton_vs_sdpa.json  issue 13's table (do_bench medians, triton against SDPA)
#   cuda-pipeline.json   issue 16's whole-image pipeline against the official-style path
#                    (copy to benchmarks/results/cuda-pipeline.json)
#   check.log        everything the steps printed
# and prints a compact summary table last. Each step has its own time limit, cut to what is left
# of the whole check's budget (ARMFAST_GPU_CHECK_BUDGET seconds, default 540, under the device
# tool's 600 s per command), so a hang in one step still leaves the others' results. The steps
# run in order of value: build, benchmark (every backend is checked against the reference on
# every shape before it is timed), issue 16's pipeline, GPU tests, Triton tests, issue 13's
# table, cold first calls.
#
# ARMFAST_GPU_CHECK_DRY=1 runs the same steps on the CPU with toy shapes and no build (to test
# this script on a machine without a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check}
mkdir -p "$OUT"
LOG="$OUT/check.log"
: > "$LOG"
DRY=${ARMFAST_GPU_CHECK_DRY:-0}
export PYTHONUNBUFFERED=1
# python3 -P: never import armfast from this source tree (it has no compiled modules and no
# armfast.kernels); always the build pip just installed.
failures=()

BUDGET=${ARMFAST_GPU_CHECK_BUDGET:-540}

step() {  # step NAME SECONDS COMMAND...: runs with a time limit, logs, records a failure
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS left=$((BUDGET - SECONDS - 15))  # 15 s kept for the summary
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 10 ]; then
        echo "=== $name: skipped, the check's budget is spent" | tee -a "$LOG"
        failures+=("$name (no time left)")
        return 1
    fi
    echo "=== $name (limit ${limit}s)" | tee -a "$LOG"
    timeout "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || failures+=("$name (exit $rc)")
    return "$rc"
}

if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then  # open_clip_torch and what it needs
    python3 -m pip install -q --no-index --no-deps --target /tmp/armfast-site .whl/*.whl >> "$LOG" 2>&1
    export PYTHONPATH=/tmp/armfast-site${PYTHONPATH:+:$PYTHONPATH}
fi

if [ "$DRY" = 1 ]; then
    device=cpu dtype=float32 shapes=(--shapes tiny) tests=(tests/test_ops_dispatch.py) fused=cpu
else
    device=cuda dtype=bfloat16 shapes=(--tune) tests=(-m gpu tests) fused=triton,cuda
    step build 200 env ARMFAST_CUDA_ARCH_LIST="${ARMFAST_CUDA_ARCH_LIST:-9.0}" \
        ARMFAST_NVCC_THREADS="$(nproc)" python3 -m pip install -v --no-build-isolation --no-deps . \
        || { echo "build failed: see $LOG"; tail -n 40 "$LOG"; exit 1; }
    python3 -P -m armfast.cli backends >> "$LOG" 2>&1
fi

cp armfast/ops/auto_table.json "$OUT/auto_table.json"
step bench 240 python3 -P -m armfast.cli bench --device "$device" --dtype "$dtype" "${shapes[@]}" --quick \
    --ops "$(python3 -P -c 'from armfast.bench.cases import OPS; print(",".join(OPS))')" \
    --json "$OUT/$device.json" --write-table "$OUT/auto_table.json"

step pipeline 120 python3 -P -m armfast.cli bench --device "$device" --ops pipeline \
    $([ "$DRY" = 1 ] && echo "--shapes tiny --rounds 1") --json "$OUT/$device-pipeline.json"

pytest=(python3 -P -m pytest -q -p no:cacheprovider)
python3 -c "import pytest_timeout" 2> /dev/null && pytest+=(--timeout=120)  # one hung test is not all
step tests 120 "${pytest[@]}" "${tests[@]}"
if [ "$DRY" != 1 ]; then
    step triton-tests 120 "${pytest[@]}" tests/triton
    step triton-vs-sdpa 90 python3 -P tests/triton/bench_vs_sdpa.py --json "$OUT/triton_vs_sdpa.json"
fi
step first-calls 60 python3 -P -m armfast.bench.first_calls --device "$device" --backends "$fused" --json "$OUT/first_calls.json"

if [ -f "$OUT/$device.json" ]; then
    python3 -P - "$OUT/$device.json" "$OUT/RESULTS.md" >> "$LOG" 2>&1 <<'EOF'
import shutil, sys, tempfile
from pathlib import Path
sys.path.insert(0, "benchmarks")
import make_results
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
with tempfile.TemporaryDirectory() as tmp:  # render without touching the checkout's results
    shutil.copytree(make_results.RESULTS_DIR, tmp, dirs_exist_ok=True)
    shutil.copy(src, Path(tmp) / src.name)
    pipeline = src.with_name(src.stem + "-pipeline.json")
    if pipeline.exists():
        shutil.copy(pipeline, Path(tmp) / pipeline.name)
    make_results.RESULTS_DIR = Path(tmp)
    dst.write_text(make_results.render())
EOF
    summary=(python3 -P benchmarks/summary.py "$OUT/$device.json")
    [ -f "$OUT/first_calls.json" ] && summary+=(--first-calls "$OUT/first_calls.json")
    [ -f "$OUT/$device-pipeline.json" ] && summary+=(--pipeline "$OUT/$device-pipeline.json")
    "${summary[@]}" | tee "$OUT/summary.txt"
fi
echo "elapsed ${SECONDS}s; outputs in $OUT: $(ls "$OUT" | tr '\n' ' ')"
if [ ${#failures[@]} -gt 0 ]; then
    echo "FAILED: ${failures[*]} (see $LOG)"
    grep -E "^(FAILED|ERROR)|Error|error:" "$LOG" | tail -n 25
    exit 1
fi
