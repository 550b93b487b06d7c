"""Data-parallel training step under torchrun: FSDP2 full / FSDP2 grad / DDP, compile off / on.

Each row launches ``torchrun --standalone -m urfm_fast.pretrain`` for a short run (2 CPU processes
with gloo and the tiny config; on CUDA, one process per visible GPU up to 8 with the ViT-B recipe,
bf16) and reads the per-step records of ``metrics.jsonl``. The timed call is the whole job (start-up,
teacher build, compile, steps), so the table's mean is end-to-end; the numbers that compare the
modes are in ``extra_info``:

    step_s        steady-state seconds per optimizer step (median over steps after the first 3)
    images_per_s  global images/s at that step time
    mfu           against the datasheet peak of all GPUs (CUDA only)
    first_step_s  wall time to the first logged step (compile shows up here)

    pytest bench/bench_distributed.py --benchmark-only
    URFM_BENCH_COMPILE=1 pytest bench/bench_distributed.py --benchmark-only   # compile rows on CPU

Compile rows are skipped on CPU unless URFM_BENCH_COMPILE=1 (inductor takes minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys

import pytest
import torch

TINY = ["--model", "vit_tiny", "--depth", "2", "--img-size", "64", "--decoder-dim", "128", "--decoder-depth", "2",
        "--decoder-heads", "4", "--batch-size", "32", "--synthetic-images", "512", "--num-workers", "0"]
VITB = ["--model", "vit_base", "--img-size", "224", "--batch-size", "256", "--num-workers", "8",
        "--synthetic-images", "8192"]
MODES = {"fsdp-full": ["--dist", "fsdp", "--shard", "full"], "fsdp-grad": ["--dist", "fsdp", "--shard", "grad"],
         "ddp": ["--dist", "ddp"]}


def _nproc() -> int:
    return min(8, torch.cuda.device_count()) if torch.cuda.is_available() else 2


@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compile"])
@pytest.mark.parametrize("mode", list(MODES))
def test_distributed_step(benchmark, tmp_path, mode, compile_):
    cuda = torch.cuda.is_available()
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    if compile_ and not cuda and os.environ.get("URFM_BENCH_COMPILE") != "1":
        pytest.skip("compile rows on CPU take minutes; set URFM_BENCH_COMPILE=1")
    steps = 30 if cuda else 12
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(_nproc()),
           "-m", "urfm_fast.pretrain", *(VITB if cuda else TINY), *MODES[mode],
           "--compile" if compile_ else "--no-compile", "--data", "synthetic", "--teacher", "random",
           "--steps", str(steps), "--warmup-steps", "2", "--log-every", "1", "--save-every", "0", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def job():
        shutil.rmtree(out, ignore_errors=True)
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)

    try:
        r = benchmark.pedantic(job, rounds=1, iterations=1)
    except subprocess.TimeoutExpired:
        pytest.skip("too slow on this machine (over 30 min)")
    if r.returncode != 0:
        if "gloo" in r.stderr.lower() and "not" in r.stderr.lower():
            pytest.skip("gloo backend unavailable")
        raise AssertionError(r.stderr[-3000:])
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [b["time"] - a["time"] for a, b in zip(recs, recs[1:])][3:]
    step_s = statistics.median(times)
    batch = int((VITB if cuda else TINY)[(VITB if cuda else TINY).index("--batch-size") + 1])
    info = {"mode": mode, "compile": compile_, "nproc": _nproc(), "device": "cuda" if cuda else "cpu",
            "step_s": step_s, "images_per_s": batch / step_s}
    m = re.search(r"first step incl. compile ([0-9.]+)s", r.stdout)
    if m:
        info["first_step_s"] = float(m.group(1))
    mfus = [rec["mfu"] for rec in recs[3:] if "mfu" in rec]
    if mfus:
        info["mfu"] = statistics.median(mfus)
    info["peak_mem_gb"] = recs[-1]["peak_mem_gb"]
    benchmark.extra_info.update(info)
