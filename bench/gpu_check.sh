#!/usr/bin/env bash
# The GPU check: install offline, check every kernel in bf16, benchmark at ViT-B scale, report.
#
#   bash bench/gpu_check.sh            # from a copy of the repository, on a CUDA machine
#
# Budget: about 8 minutes on an H200 (install ~0.5, kernel checks <= 3, training loop <= 3,
# benchmarks <= 4 minutes;
# each phase has its own timeout, so a hang in one still leaves a report). No network is used.
#
# Python: the machine's python3 must already hold torch (CUDA build), triton, timm, numpy,
# safetensors, pytest and pytest-benchmark (the H200 image has them). The project is installed
# editable (--no-deps, no build isolation: setuptools >= 70.1 or the wheel package) into a venv
# that sees that python's packages. Anything missing travels as
# wheels in .whl/ at the repository root and is installed from there with --no-index, e.g.
# open_clip_torch + ftfy + wcwidth for the open_clip reference tower (without them the teacher
# reference row builds the same trunk with timm).
#
# Outputs under $OUT (default ./gpu_out): gpu_check.log, kernels.md, kernel_tests.txt,
# bench.json and gpu_report.md, which is printed last.
#
# Knobs: PYTHON (default python3), URFM_VENV (default /tmp/urfm-venv), URFM_BENCH_ROUNDS,
# GPU_CHECK_BENCH_TIMEOUT (seconds, default 240), GPU_CHECK_TEST_TIMEOUT (default 120: every new
# (N, head dim, dtype) autotunes three attention kernels), GPU_CHECK_TRAIN_TIMEOUT (default 180).

set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
: >"$LOG"
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1
# Autotuning results on disk: the kernel checks tune once, the tests and benchmarks reuse them.
export TRITON_CACHE_AUTOTUNING=1
PY=${PYTHON:-python3}
VENV=${URFM_VENV:-/tmp/urfm-venv}
T0=$(date +%s)

log() { echo "== [$(($(date +%s) - T0)) s] $*" | tee -a "$LOG"; }

# -- 1. environment ---------------------------------------------------------------------------
log "python: $($PY --version 2>&1) at $(command -v "$PY")"
if ! "$PY" -c 'import torch' 2>>"$LOG"; then
    log "FATAL: '$PY' cannot import torch. Carry torch's wheels (and their nvidia-* deps) in .whl/"
    exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
    # No --system-site-packages (that would be the base interpreter's packages, not those of $PY
    # when $PY is itself a venv, as on the H200 image) and no pip of its own: a .pth file puts the
    # site-packages of $PY (torch, pip, setuptools ...) on the venv's path instead.
    "$PY" -m venv --without-pip "$VENV" >>"$LOG" 2>&1 || rm -rf "$VENV"
fi
if [ -x "$VENV/bin/python" ]; then
    base=$("$PY" -c 'import site; print("\n".join(site.getsitepackages()))')
    venv_site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "$base" >"$venv_site/_urfm_base_site.pth"
    VPY=$VENV/bin/python
else
    log "no venv could be created; installing into $PY's environment"
    VPY=$PY
fi
if compgen -G ".whl/*.whl" >/dev/null; then
    log "installing carried wheels: $(ls .whl | tr '\n' ' ')"
    "$VPY" -m pip install -q --no-index --no-deps --find-links .whl .whl/*.whl >>"$LOG" 2>&1
fi
log "pip install --no-index --no-build-isolation --no-deps -e ."
"$VPY" -m pip install -q --no-index --no-build-isolation --no-deps -e . >>"$LOG" 2>&1 \
    || { log "FATAL: editable install failed (see $LOG)"; tail -20 "$LOG"; exit 3; }
"$VPY" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib.metadata as md, torch, urfm_fast, urfm_fast.kernels  # noqa: F401
from urfm_fast.flops import peak_flops
names = ["torch", "triton", "timm", "open_clip_torch", "pytest", "pytest-benchmark"]
vers = []
for n in names:
    try:
        vers.append(f"{n} {md.version(n)}")
    except md.PackageNotFoundError:
        vers.append(f"{n} missing")
print(", ".join(vers))
print("cuda:", torch.cuda.is_available(), torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-",
      "datasheet peak bf16:", peak_flops(0) if torch.cuda.is_available() else None)
EOF
if ! "$VPY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    log "no CUDA device: this script checks the bf16 kernels and the ViT-B recipe on a GPU and cannot run here."
    log "On a CPU run 'pytest' (the kernels under Triton's interpreter) and 'pytest bench/ --benchmark-only'."
    exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >>"$LOG" 2>&1 || true

# -- 2. kernel correctness in bf16 ------------------------------------------------------------
log "kernel correctness (bench/check_kernels.py, bf16, ViT-B shapes)"
timeout 120 "$VPY" bench/check_kernels.py --dtype bfloat16 -o "$OUT/kernels.md" >>"$LOG" 2>&1
KCHECK=$?
log "check_kernels exit $KCHECK"
log "kernel tests on the GPU (tests/test_kernels_*.py tests/test_ops_dispatch.py)"
TEST_FILES=$(ls tests/test_kernels_*.py tests/test_ops_dispatch.py 2>/dev/null | tr '\n' ' ')
timeout -s INT -k 20 "${GPU_CHECK_TEST_TIMEOUT:-120}" "$VPY" -m pytest -q -p no:cacheprovider $TEST_FILES \
    >"$OUT/kernel_tests.txt" 2>&1
KTEST=$?
log "kernel tests exit $KTEST: $(tail -1 "$OUT/kernel_tests.txt")"

# -- 3. the real training loop: FSDP2 + bf16 + per-block compile + fused AdamW over torchrun --
# ViT-B/16 recipe on synthetic data with a random teacher; its logged images/s and MFU after the
# first (compile) window are the end-to-end number the benchmark rows below break down.
log "pretrain: torchrun 1 GPU, ViT-B recipe, 60 steps"
timeout -k 20 "${GPU_CHECK_TRAIN_TIMEOUT:-180}" "$VPY" -m torch.distributed.run --standalone --nproc_per_node 1 \
    -m urfm_fast.pretrain --data synthetic --teacher random --steps 60 --log-every 10 --save-every 0 \
    --out "$OUT/pretrain_run" >"$OUT/pretrain.txt" 2>&1
TRAIN=$?
log "pretrain exit $TRAIN: $(grep -E '^step' "$OUT/pretrain.txt" | tail -1)"

# -- 4. measured matmul peak, then the benchmark suite ---------------------------------------
MATMUL=$(timeout 60 "$VPY" -c 'from urfm_fast.flops import measured_matmul_flops as m; print(f"{m()/1e12:.0f}")' 2>>"$LOG")
log "bf16 8192^3 matmul: ${MATMUL:-?} TFLOP/s"
# The training step first (the goal), then the other files, the teacher (with a compile) last, so
# that a run cut by the timeout loses the least important rows.
OTHER=$(ls bench/bench_*.py | grep -v -e bench_step.py -e bench_teacher.py | tr '\n' ' ')
BENCH_FILES="bench/bench_step.py $OTHER bench/bench_teacher.py"
BENCH_CMD="pytest $BENCH_FILES --benchmark-only -q -p no:cacheprovider --benchmark-json=$OUT/bench.json"
log "$BENCH_CMD"
# SIGINT at the limit: pytest stops like on Ctrl-C and still writes the JSON of finished rows.
timeout -s INT -k 30 "${GPU_CHECK_BENCH_TIMEOUT:-240}" "$VPY" -m $BENCH_CMD >"$OUT/bench.txt" 2>&1
BENCH=$?
log "benchmarks exit $BENCH: $(tail -1 "$OUT/bench.txt")"

# -- 5. report ---------------------------------------------------------------------------------
{
    echo "## GPU check $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "- kernel correctness: exit $KCHECK; kernel tests: exit $KTEST ($(tail -1 "$OUT/kernel_tests.txt"))"
    echo "- pretrain (torchrun, 1 GPU, ViT-B recipe, synthetic data): exit $TRAIN"
    echo
    echo '```'
    grep -E '^(step|done|model|1 rank)' "$OUT/pretrain.txt" | tail -9
    echo '```'
    echo
    echo "- benchmarks: exit $BENCH; measured bf16 matmul ${MATMUL:-?} TFLOP/s (MFU below is against the datasheet peak)"
    echo
    if [ -s "$OUT/bench.json" ]; then
        "$VPY" bench/report.py "$OUT/bench.json" --command "bash bench/gpu_check.sh ($BENCH_CMD)" --title "Benchmarks"
    else
        echo "(no benchmark JSON: see bench.txt)"
        tail -30 "$OUT/bench.txt"
    fi
    echo
    [ -s "$OUT/kernels.md" ] && cat "$OUT/kernels.md"
} >"$OUT/gpu_report.md" 2>&1
log "done in $(($(date +%s) - T0)) s"
cat "$OUT/gpu_report.md"
[ "$KCHECK" = 0 ] && [ "$KTEST" = 0 ] && [ "$TRAIN" = 0 ] && [ "$BENCH" = 0 ]
