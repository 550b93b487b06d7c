#!/usr/bin/env bash
# The GPU check: the one command to run on a CUDA machine (H100/H200), within 7 minutes.
#
#   bash bench/gpu_check.sh                 run every phase; results in $OUT (default ./gpu_out)
#   bash bench/gpu_check.sh --plan          print each phase's time budget and the total; run nothing
#   bash bench/gpu_check.sh --with-method   one short GPU slot, <= 560 s: the throughput phases that matter
#                                           most (trimmed), then experiments/gpu_method.sh (the method's
#                                           curve, <= 300 s; it needs the teacher's weights file, see there)
#   bash bench/gpu_check.sh --with-method --plan
#
# Python: the machine's own python3 (PYTHON to change) with torch (CUDA build), triton, timm and
# numpy; pytest only for the last phase. Nothing is installed and nothing is downloaded: the
# repository goes on the path through a folder of links in which urfm_fast/kernels points at
# kernels/, as the installed package maps it (bench/gpu_env.sh; PYTHONSAFEPATH=1 keeps the root's own
# urfm_fast/ behind it, and paths are resolved, so the checkout may sit behind a symlink).
#
# Phases run in the order of what they are worth (bench/gpu_check.py says what each measures),
# each under its own timeout. A phase that fails or runs out of time is recorded as such and the
# next one starts. After every result row, $OUT/gpu_results.json and $OUT/gpu_report.md are
# rewritten, so a kill at any moment leaves everything finished so far. $OUT receives only those
# two files and the last lines of each phase's log; the Triton and inductor caches live in
# $GPU_CHECK_WORK (default: a fresh temporary folder), and no run folder or checkpoint is written.
# Without CUDA the script says so in the report and exits 2 within seconds.

set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd -P)  # resolved, as python resolves its own paths
cd "$REPO"

# name:seconds, in order; the total must stay <= 420 (a 10-minute command limit, with margin).
# With --with-method the total stays <= 560: the end-to-end step (the Speed figures) first, a shortened
# kernel correctness sweep (its rows are kept when cut), then the method (its own 300 s plan, see
# `bash experiments/gpu_method.sh --plan`); kernel_speed and gpu_tests are left to the plain run.
# GPU_CHECK_PLAN="name:seconds ..." replaces it (a subset, other budgets); GPU_CHECK_SMOKE=1 runs
# the phases at tiny shapes on whatever device there is, to prove the script runs (the tests do; where
# Triton's interpreter breaks, triton < 3.7 with numpy >= 2.4, its kernel-only phases are skipped).
DEFAULT_PLAN="env:20 correctness:110 kernel_speed:50 e2e_eager:70 e2e_compiled:130 gpu_tests:40"
METHOD_PLAN="env:20 e2e_eager:75 e2e_compiled:115 correctness:50 method:300"
WITH_METHOD=0
if [ "${1:-}" = "--with-method" ]; then
    WITH_METHOD=1
    shift
    DEFAULT_PLAN=$METHOD_PLAN
fi
read -r -a PLAN <<<"${GPU_CHECK_PLAN:-$DEFAULT_PLAN}"
SMOKE=${GPU_CHECK_SMOKE:-0}

if [ "${1:-}" = "--plan" ]; then
    total=0
    for p in "${PLAN[@]}"; do
        echo "${p%%:*} ${p##*:}"
        total=$((total + ${p##*:}))
    done
    echo "total $total"
    exit 0
elif [ $# -gt 0 ]; then
    echo "usage: bash bench/gpu_check.sh [--with-method] [--plan]" >&2
    exit 2
fi

PY=${PYTHON:-python3}
OUT=${OUT:-$REPO/gpu_out}
WORK=${GPU_CHECK_WORK:-$(mktemp -d -t urfm_gpu_check.XXXXXX)}
mkdir -p "$OUT/logs" "$WORK/logs"
. "$REPO/bench/gpu_env.sh"
unset TRITON_INTERPRET URFM_KERNELS
SMOKE_ARG=() TESTS=(tests/test_kernels_attention.py tests/test_kernels_gather.py tests/test_kernels_cosine_loss.py
    tests/test_ops_dispatch.py tests/test_kernel_check.py)
if [ "$SMOKE" = 1 ]; then
    SMOKE_ARG=(--smoke)
    TESTS=(tests/test_ops_dispatch.py -k "backend_names or auto_uses_torch")
fi
T0=$(date +%s)
say() { echo "== [$(($(date +%s) - T0)) s] $*"; }
record() {  # record PHASE STATUS BUDGET SECONDS [NOTE]
    "$PY" bench/gpu_check.py record "$1" "$2" --out "$OUT" --budget "$3" --seconds "$4" ${5:+--note "$5"} \
        || say "could not record $1 (see $OUT/gpu_results.json)"
}

say "python: $("$PY" --version 2>&1) at $(command -v "$PY"); results in $OUT, caches in $WORK"
for p in "${PLAN[@]}"; do
    name=${p%%:*} budget=${p##*:}
    log=$WORK/logs/$name.log
    start=$(date +%s)
    say "$name (budget $budget s)"
    if [ "$name" = gpu_tests ]; then
        if ! "$PY" -c 'import pytest' 2>/dev/null; then
            record "$name" "skipped" "$budget" 0 "pytest is not installed"
            continue
        fi
        # SIGINT at the limit: pytest stops as on Ctrl-C and still prints its summary
        timeout -s INT -k 10 "$budget" "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}" >"$log" 2>&1
    elif [ "$name" = method ]; then
        # its own clock stops it 5 s early, so its report says "cut"; this timeout is the backstop
        OUT="$OUT" GPU_METHOD_BUDGET=$((budget - 5)) GPU_METHOD_SMOKE="$SMOKE" GPU_METHOD_WORK="$WORK/method" \
            timeout -k 10 "$budget" bash experiments/gpu_method.sh >"$log" 2>&1
    else
        timeout -k 10 "$budget" "$PY" bench/gpu_check.py "$name" --out "$OUT" --budget "$budget" ${SMOKE_ARG[@]+"${SMOKE_ARG[@]}"} \
            >"$log" 2>&1
    fi
    rc=$?
    took=$(($(date +%s) - start))
    tail -n 200 "$log" >"$OUT/logs/$name.log"
    case $rc in
        0) status=ok ;;
        124 | 137) status="timed out" ;;
        77) status=skipped ;;  # gpu_check.py SKIPPED: it says why in one line, kept as the phase's note
        *) status="failed (exit $rc)" ;;
    esac
    if [ "$name" = env ] && [ "$rc" = 3 ] && [ "$SMOKE" = 1 ]; then
        rc=0 status=ok
    elif [ "$name" = env ] && [ "$rc" = 3 ]; then
        record env "no CUDA device" "$budget" "$took" \
            "torch sees no CUDA device: nothing was measured. On a CPU run pytest (the kernels under Triton's interpreter)."
        say "no CUDA device: see $OUT/gpu_report.md"
        exit 2
    fi
    note=""
    [ "$name" = gpu_tests ] && note=$(grep -E "passed|failed|error" "$log" | tail -1)
    [ "$name" = method ] && note="$(grep -E "^== gpu_method: (done|cut|failed)|^gpu_method:" "$log" | tail -1 | cut -c1-200)"
    [ "$rc" != 0 ] && [ "$rc" != 77 ] && [ -z "$note" ] && note="last log line: $(tail -n 1 "$log" | cut -c1-200)"
    record "$name" "$status" "$budget" "$took" "$note"
    say "$name: $status in $took s"
    [ "$rc" = 77 ] && say "$(tail -n 1 "$log")"
done
say "done in $(($(date +%s) - T0)) s: $OUT/gpu_report.md"
cat "$OUT/gpu_report.md"
