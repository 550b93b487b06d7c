"""SIGKILL at seeded random moments, then ``--resume``: the run lands on the uninterrupted loss curve.

pretrain runs as a subprocess, as a user or a scheduler starts it, and is killed from outside with
SIGKILL (no handler, no final save) mid-step, mid-checkpoint (background and ``--no-async-save``
writes) and mid-``.pth`` write. Whatever the moment, no partly written checkpoint looks complete:
every ``step_*`` folder matches its manifest, every ``checkpoint-*.pth`` loads, the resumed run
picks the newest whole checkpoint, leaves no temporary file behind, and its curve equals the
reference run's (test_resume's tolerance).

The moments come from ``random.Random(seed)``; ``URFM_KILL_SEEDS=0,1,2,...`` tries other seeds.
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_pretrain import fast_random_teacher  # noqa: F401 (autouse fixture for the in-process resume)
from test_resume import REF_ARGS, STEPS, losses, reference_run

from urfm_fast import pretrain
from urfm_fast.checkpoints import runs as ckpt

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
SEEDS = [int(s) for s in os.environ.get("URFM_KILL_SEEDS", "0").split(",")]
# checkpoints every 2 steps, a .pth every 2 steps: something is being written at most moments
KILL_ARGS = [*REF_ARGS, "--save-every", "2", "--pth-every", "2"]


def start(args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "urfm_fast.pretrain", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def kill_when(p: subprocess.Popen, ready, delay: float, timeout: float = 300) -> None:
    """Poll ``ready()`` (every 0.2 ms) until true, wait ``delay`` seconds, SIGKILL the process."""
    t_end = time.time() + timeout
    while not ready():
        if p.poll() is not None or time.time() > t_end:
            p.kill()
            pytest.fail(f"the run ended (rc {p.returncode}) before the moment to kill it:\n{p.stdout.read()[-3000:]}")
        time.sleep(0.0002)
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    p.wait()
    p.stdout.close()
    assert p.returncode == -signal.SIGKILL


def logged_steps(out: Path) -> int:
    try:
        return (out / ckpt.METRICS_FILE).read_text().count("\n")
    except OSError:
        return 0


def nothing_partial_looks_complete(out: Path) -> int:
    """Every renamed checkpoint is whole; -> the step the resume must pick (0: none yet)."""
    found = ckpt.list_checkpoints(out)
    for _, path in found:
        assert ckpt.validate(path) is None, path
    for pth in out.glob("checkpoint-*.pth"):
        obj = torch.load(pth, map_location="cpu", weights_only=True)
        assert obj["step"] == int(pth.stem.split("-")[1]), pth
    return found[-1][0] if found else 0


def resume_follows_the_curve(out: Path, ref: dict, capsys, where: str) -> None:
    expected = nothing_partial_looks_complete(out)
    capsys.readouterr()
    assert pretrain.main(["--out", str(out), "--resume"]) == 0, where
    printed = capsys.readouterr().out
    if expected:
        assert f"resumed from {ckpt.step_dir(out, expected)} at step {expected}" in printed, where
    else:
        assert "no checkpoint" in printed and "starting from step 0" in printed, where
    assert not list(out.rglob(".tmp-*")), (where, list(out.rglob(".tmp-*")))  # nothing for a person to remove
    got = losses(out)
    assert list(got) == list(range(1, STEPS + 1)), where
    np.testing.assert_allclose(list(got.values()), list(ref.values()), rtol=0, atol=1e-6, err_msg=where)


@pytest.mark.parametrize("seed", SEEDS)
def test_killed_mid_step(tmp_path_factory, capsys, seed):
    ref = losses(reference_run(tmp_path_factory))
    rng = random.Random(seed)
    after, delay = rng.randint(2, 6), rng.uniform(0, 0.3)  # a step takes 50-300 ms here
    out = tmp_path_factory.mktemp("kill_step") / "run"
    kill_when(start([*KILL_ARGS, "--out", str(out)]), lambda: logged_steps(out) >= after, delay)
    resume_follows_the_curve(out, ref, capsys, f"seed {seed}: killed {delay * 1e3:.0f} ms after step {after}")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", ["background", "--no-async-save"])
def test_killed_mid_checkpoint(tmp_path_factory, capsys, seed, mode):
    """A DCP save here lasts 200-500 ms from its temporary folder's creation to its rename; the kill
    comes within the first 30 ms, so the folder is still temporary when the process dies."""
    ref = losses(reference_run(tmp_path_factory))
    rng = random.Random(seed)
    step, delay = rng.choice([2, 4, 6]), rng.uniform(0, 0.03)
    out = tmp_path_factory.mktemp("kill_ckpt") / "run"
    tmp = out / ckpt.CKPT_DIR / f".tmp-step_{step:08d}"
    extra = [] if mode == "background" else [mode]
    kill_when(start([*KILL_ARGS, *extra, "--out", str(out)]), tmp.exists, delay)
    where = f"seed {seed}: killed {delay * 1e3:.1f} ms into the {mode} save of step {step}"
    assert tmp.is_dir() and not ckpt.step_dir(out, step).exists(), where  # died mid-save, not after
    resume_follows_the_curve(out, ref, capsys, where)


@pytest.mark.parametrize("seed", SEEDS)
def test_killed_mid_pth_write(tmp_path_factory, capsys, seed):
    """The .pth (19 MB here) takes 30-100 ms to write; the kill comes within its first 5 ms."""
    ref = losses(reference_run(tmp_path_factory))
    rng = random.Random(seed)
    step, delay = rng.choice([2, 4, 6]), rng.uniform(0, 0.005)
    out = tmp_path_factory.mktemp("kill_pth") / "run"
    tmp = out / f".tmp-checkpoint-{step:08d}.pth"
    kill_when(start([*KILL_ARGS, "--out", str(out)]), tmp.exists, delay)
    where = f"seed {seed}: killed {delay * 1e3:.1f} ms into the .pth write of step {step}"
    assert tmp.is_file() and not (out / f"checkpoint-{step:08d}.pth").exists(), where
    resume_follows_the_curve(out, ref, capsys, where)


def test_two_runs_started_into_one_new_folder(tmp_path_factory):
    """Both would find the folder new (neither has written config.json yet, the teacher takes seconds
    to build): the run lock lets exactly one train there, the other stops in one line."""
    ref = losses(reference_run(tmp_path_factory))
    out = tmp_path_factory.mktemp("twice") / "run"
    procs = [start([*REF_ARGS, "--out", str(out)]) for _ in range(2)]
    printed = [p.communicate(timeout=600)[0] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], printed
    errors = [line for line in printed[codes.index(2)].splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and ("is in use by another pretrain" in errors[0] or "already holds a run" in errors[0])
    got = losses(out)
    assert list(got) == list(range(1, STEPS + 1))  # one run's records, once
    np.testing.assert_allclose(list(got.values()), list(ref.values()), rtol=0, atol=1e-6)
