#!/usr/bin/env bash
# The GPU check: one command for a fresh lent GPU machine (H100/H200; torch, Triton, pybind11,
# pytest and pytest-benchmark installed, no network, no open_clip_torch). From the repository
# root:
#
#   bash ../shared/tools/gpu-wheels.sh          # here, once: open_clip's wheels into .whl/
#   device run: ARMFAST_SOURCE_COMMIT=<commit> bash benchmarks/gpu_check.sh
#               # carry [".whl"], timeout_s 600; the whole check keeps within 480 s
#   device run: bash benchmarks/gpu_check.sh --only bench,pipeline   # a short second call
#
# Steps, in order of value (each one's limit in seconds; `--list` prints them):
#   build         pip install --no-build-isolation for sm_90 only (skipped by --only when the
#                 installed build already matches this tree)
#   tests         the GPU-marked tests (pytest -m gpu tests)
#   bench         `armfast bench --tune` on every op in bfloat16: every backend checked against
#                 the reference on every shape before it is timed, the device's measured
#                 ceilings, the GPU entries of the auto table
#   triton-tests  pytest tests/triton on the GPU
#   pipeline      the whole-image pipeline against the official-style path
#   first-calls   cold first calls of the fused backends, per dtype/head dim/bucket
# and, only when named by --only: triton-vs-sdpa (do_bench table of triton against SDPA);
#   bwd-sweep     benchmarks/bwd_sweep.py: times the triton attention backward's configs at
#                 ARM's shapes with do_bench, keeps the winners in the tuner's disk cache (read
#                 by the next run on this machine; copied to $OUT/triton-tuning.json) and prints
#                 forward+backward against SDPA's (bwd_sweep.json)
#   host-time     benchmarks/host_time.py: host time per call of the triton attention at a tiny
#                 shape against SDPA's, 1000 calls, CPU timer (host_time.json)
#
# Outputs in $OUT (default ./gpu-check):
#   cuda.json        the raw benchmark (copy to benchmarks/results/cuda.json)
#   auto_table.json  armfast/ops/auto_table.json with this GPU's entries (copy it back)
#   RESULTS.md       benchmarks/RESULTS.md with the GPU section rendered from cuda.json
#   cuda-pipeline.json  the pipeline (copy to benchmarks/results/cuda-pipeline.json)
#   first_calls.json, triton_vs_sdpa.json, bwd_sweep.json, triton-tuning.json, host_time.json,
#   summary.txt
#   check.log        everything the steps printed, with each step's time
# and prints a compact summary table last. Each step's limit is cut to what is left of the
# whole check's budget (ARMFAST_GPU_CHECK_BUDGET seconds, default 480, so that the device
# tool's 600 s per command leaves room), so a hang in one step still leaves the others'
# results and a late step is skipped, not half-run. ARMFAST_SOURCE_COMMIT names the commit in
# the results (the device's copy of the tree has no .git); `git rev-parse` is tried first.
#
# ARMFAST_GPU_CHECK_DRY=1 runs the same steps on the CPU with toy shapes and no build (to test
# this script on a machine without a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."

# name:limit, in order of value; OPTIONAL ones run only when --only names them
STEPS=(build:150 tests:100 bench:150 triton-tests:100 pipeline:60 first-calls:40)
OPTIONAL=(triton-vs-sdpa:60 bwd-sweep:240 host-time:60)

usage() {
    echo "usage: bash benchmarks/gpu_check.sh [--only STEP[,STEP...]] [--list]" >&2
    exit 2
}
names() { local s; for s in "$@"; do echo -n "${s%%:*} "; done; }

only=""
while [ $# -gt 0 ]; do
    case $1 in
        --only) [ $# -ge 2 ] || usage; only=$2; shift 2 ;;
        --only=*) only=${1#--only=}; shift ;;
        --list) for s in "${STEPS[@]}" "${OPTIONAL[@]}"; do echo "${s%%:*} ${s#*:}s"; done; exit 0 ;;
        *) usage ;;
    esac
done
known=" $(names "${STEPS[@]}" "${OPTIONAL[@]}")"
for s in ${only//,/ }; do
    [[ "$known" == *" $s "* ]] || { echo "--only: unknown step '$s'; steps:$known" >&2; exit 2; }
done
wanted() {  # wanted STEP: whether this run does STEP
    if [ -z "$only" ]; then [[ " $(names "${STEPS[@]}")" == *" $1 "* ]]; else [[ ",$only," == *",$1,"* ]]; fi
}
limit_of() { local s; for s in "${STEPS[@]}" "${OPTIONAL[@]}"; do [ "${s%%:*}" = "$1" ] && echo "${s#*:}"; done; }

OUT=${OUT:-$PWD/gpu-check}
mkdir -p "$OUT"
LOG="$OUT/check.log"
: > "$LOG"
DRY=${ARMFAST_GPU_CHECK_DRY:-0}
BUDGET=${ARMFAST_GPU_CHECK_BUDGET:-480}
export PYTHONUNBUFFERED=1
commit=$(git rev-parse --short HEAD 2> /dev/null || true)
export ARMFAST_SOURCE_COMMIT=${commit:-${ARMFAST_SOURCE_COMMIT:-}}
# python3 -P: never import armfast from this source tree (it has no compiled modules and no
# armfast.kernels); always the build pip installed.
failures=()

step() {  # step NAME COMMAND...: runs with its time limit, logs, records a failure
    local name=$1
    shift
    wanted "$name" || return 0
    local limit t0=$SECONDS left=$((BUDGET - SECONDS - 15))  # 15 s kept for the summary
    limit=$(limit_of "$name")
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
    device=cpu dtype=float32 shapes=(--shapes tiny) tests=(tests/ops/test_ops_dispatch.py) fused=cpu
else
    device=cuda dtype=bfloat16 shapes=(--tune) tests=(-m gpu tests) fused=triton,cuda
    # The build a warm machine may keep from an earlier call counts only if it is this tree's.
    stamp=$(find armfast kernels csrc setup.py pyproject.toml -type f -not -path '*/__pycache__/*' \
            -print0 | sort -z | xargs -0 sha1sum | sha1sum | cut -c1-16)
    if [ -n "$only" ] && ! wanted build && { [ "$(cat /tmp/armfast-build.stamp 2> /dev/null)" != "$stamp" ] \
            || ! python3 -P -c "import armfast._C_cuda" 2> /dev/null; }; then
        only="build,$only"
    fi
    if wanted build; then
        step build env ARMFAST_CUDA_ARCH_LIST="${ARMFAST_CUDA_ARCH_LIST:-9.0}" \
            ARMFAST_NVCC_THREADS="$(nproc)" python3 -m pip install -v --no-build-isolation --no-deps . \
            || { echo "build failed: see $LOG"; tail -n 40 "$LOG"; exit 1; }
        echo "$stamp" > /tmp/armfast-build.stamp
    fi
    python3 -P -m armfast.cli backends >> "$LOG" 2>&1
fi

pytest=(python3 -P -m pytest -q -p no:cacheprovider)
python3 -c "import pytest_timeout" 2> /dev/null && pytest+=(--timeout=120)  # one hung test is not all

step tests "${pytest[@]}" "${tests[@]}"
if wanted bench; then
    cp armfast/ops/auto_table.json "$OUT/auto_table.json"
    step bench python3 -P -m armfast.cli bench --device "$device" --dtype "$dtype" "${shapes[@]}" --quick \
        --ops "$(python3 -P -c 'from armfast.bench.cases import OPS; print(",".join(OPS))')" \
        --json "$OUT/$device.json" --write-table "$OUT/auto_table.json"
fi
if [ "$DRY" != 1 ]; then
    step triton-tests "${pytest[@]}" tests/triton
fi
step pipeline python3 -P -m armfast.cli bench --device "$device" --ops pipeline \
    $([ "$DRY" = 1 ] && echo "--shapes tiny --rounds 1") --json "$OUT/$device-pipeline.json"
step first-calls python3 -P -m armfast.bench.first_calls --device "$device" --backends "$fused" \
    --json "$OUT/first_calls.json"
if [ "$DRY" != 1 ]; then
    step triton-vs-sdpa python3 -P benchmarks/triton_vs_sdpa.py --json "$OUT/triton_vs_sdpa.json"
fi
if [ "$DRY" = 1 ]; then  # the interpreter at a toy shape; the cache under $OUT, not the user's
    step bwd-sweep env TRITON_INTERPRET=1 ARMFAST_TRITON_TUNING_CACHE="$OUT/triton-tuning.json" \
        python3 -P benchmarks/bwd_sweep.py --dry --json "$OUT/bwd_sweep.json"
else
    step bwd-sweep python3 -P benchmarks/bwd_sweep.py --json "$OUT/bwd_sweep.json" \
        --cache-copy "$OUT/triton-tuning.json"
fi
step host-time env $([ "$DRY" = 1 ] && echo TRITON_INTERPRET=1) python3 -P benchmarks/host_time.py \
    $([ "$DRY" = 1 ] && echo "--no-launch --rounds 1") --json "$OUT/host_time.json" \
    && grep "us/call" "$LOG" | tail -n 2
if wanted bwd-sweep && [ -f "$OUT/bwd_sweep.json" ]; then  # its table, out of the log
    sed -n '/^shape /,/^winners /p' "$LOG"
fi

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
fi
summary=(python3 -P benchmarks/summary.py)
[ -f "$OUT/$device.json" ] && summary+=("$OUT/$device.json")
[ -f "$OUT/first_calls.json" ] && summary+=(--first-calls "$OUT/first_calls.json")
[ -f "$OUT/$device-pipeline.json" ] && summary+=(--pipeline "$OUT/$device-pipeline.json")
[ ${#summary[@]} -gt 3 ] && "${summary[@]}" | sed '/./,$!d' | tee "$OUT/summary.txt"
grep -E "^=== .*: (exit|skipped)" "$LOG"
echo "elapsed ${SECONDS}s; outputs in $OUT: $(ls "$OUT" | tr '\n' ' ')"
if [ ${#failures[@]} -gt 0 ]; then
    echo "FAILED: ${failures[*]} (see $LOG)"
    grep -E "^(FAILED|ERROR)|Error|error:" "$LOG" | tail -n 25
    exit 1
fi
