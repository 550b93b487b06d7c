"""bench/gpu_check.sh, the one command for a GPU machine, proven on CPU: its plan fits the budget,
without CUDA it says so and stops, and its phase loop records timeouts and keeps going (smoke mode:
tiny shapes, the Triton interpreter). The end-to-end phases run in-process at tiny shapes."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from urfm_fast.model import ops

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
# by path: `pytest` (unlike `python -m pytest`) does not put the repository root on sys.path
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def _run(env_extra: dict, *args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHON=sys.executable, **env_extra)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def _plan(*args) -> tuple[list[str], int]:
    proc = _run({}, *args, "--plan")
    assert proc.returncode == 0, proc.stderr
    *phases, total = [line.split() for line in proc.stdout.strip().splitlines()]
    assert total[0] == "total" and int(total[1]) == sum(int(s) for _, s in phases)
    return [name for name, _ in phases], int(total[1])


def test_plan_lists_every_phase_within_seven_minutes():
    names, total = _plan()
    assert names == [p for p in gpu_check.PHASES if p != "method"] and total <= 420


def test_plan_with_the_method_fits_one_short_slot():
    names, total = _plan("--with-method")
    assert total <= 560 and names[0] == "env" and names[1] == "e2e_eager" and names[-1] == "method"
    assert set(names) <= set(gpu_check.PHASES)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit")
@pytest.mark.parametrize("args", [(), ("--with-method",)])
def test_without_cuda_it_reports_that_and_stops(tmp_path, args):
    t0 = time.monotonic()
    proc = _run({"OUT": str(tmp_path)}, *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert time.monotonic() - t0 < 60
    assert "no CUDA device" in (tmp_path / "gpu_report.md").read_text()
    assert json.loads((tmp_path / "gpu_results.json").read_text())["phases"]["env"]["status"] == "no CUDA device"


def test_a_phase_out_of_time_is_recorded_and_the_next_one_runs(tmp_path):
    plan = "env:60 correctness:1 kernel_speed:150 gpu_tests:150"
    proc = _run({"OUT": str(tmp_path), "GPU_CHECK_SMOKE": "1", "GPU_CHECK_PLAN": plan}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    phases = json.loads((tmp_path / "gpu_results.json").read_text())["phases"]
    assert {k: v["status"] for k, v in phases.items()} == {
        "env": "ok", "correctness": "timed out", "kernel_speed": "ok", "gpu_tests": "ok"
    }  # fmt: skip
    attention_rows = [r for r in phases["kernel_speed"]["rows"] if r["op"].startswith("attention")]
    assert {r["impl"] for r in attention_rows} >= {"triton", "sdpa_default"}
    assert "passed" in phases["gpu_tests"]["note"]
    assert "## kernel_speed: ok" in (tmp_path / "gpu_report.md").read_text()
    assert {p.name for p in tmp_path.iterdir()} == {"gpu_results.json", "gpu_report.md", "logs"}  # small files only


@pytest.mark.skipif(torch.cuda.is_available(), reason="smoke shapes are for CPU; on a GPU run the check itself")
@pytest.mark.parametrize("phase", ["e2e_eager", "e2e_compiled"])
def test_end_to_end_phases_run_at_tiny_shapes(phase, tmp_path):
    try:
        assert gpu_check.main([phase, "--out", str(tmp_path), "--smoke"]) == 0
    finally:
        ops.clear_sdpa_preferences()
    rows = json.loads((tmp_path / "gpu_results.json").read_text())["phases"][phase]["rows"]
    steps = [r for r in rows if "images_per_s" in r]
    assert steps and all(r["images_per_s"] > 0 for r in steps)
    assert any(r["row"].startswith("attention choice") for r in rows)  # the start-up choice is reported


@pytest.mark.parametrize("triton,numpy,broken", [("3.6.0", "2.5.2", True), ("3.6.0", "2.4.0", True),
                                                 ("3.6.0", "2.3.5", False), ("3.8.0", "2.5.2", False),
                                                 ("3.6.0", "missing", False)])  # fmt: skip
def test_interpreter_fault_is_triton_before_3_7_with_numpy_2_4(triton, numpy, broken):
    fault = gpu_check.interpreter_fault(triton, numpy)
    assert bool(fault) == broken and (not fault or f"triton {triton}" in fault and f"numpy {numpy}" in fault)


def test_smoke_skips_the_kernel_phases_where_the_interpreter_breaks(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(gpu_check, "_version", {"triton": "3.6.0", "numpy": "2.5.2"}.get)
    for phase in gpu_check.INTERPRETED:
        assert gpu_check.main([phase, "--out", str(tmp_path), "--smoke"]) == gpu_check.SKIPPED
    phases = json.loads((tmp_path / "gpu_results.json").read_text())["phases"]
    assert {phases[p]["status"] for p in gpu_check.INTERPRETED} == {"skipped"}
    assert all("triton 3.6.0's interpreter breaks on numpy 2.5.2" in phases[p]["note"] for p in gpu_check.INTERPRETED)
