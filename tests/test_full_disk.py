"""A full disk, for real: pretrain in a child whose files may not grow past 1 MiB (``RLIMIT_FSIZE``, with
SIGXFSZ ignored so a write fails with EFBIG instead of killing the process), and metrics.jsonl on
``/dev/full`` (the kernel's ENOSPC). config.json and metrics.jsonl fit, a checkpoint (19 MB here) does
not: the run stops with one line naming the file and what is kept, exits 2, leaves no temporary file
and no checkpoint that looks complete; a rerun with room resumes onto the uninterrupted curve.
"""

import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_pretrain import fast_random_teacher  # noqa: F401 (autouse fixture for the in-process reruns)
from test_resume import STEPS, losses, reference_run

from urfm_fast import pretrain
from urfm_fast.checkpoints import runs as ckpt

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE and /dev/full as on Linux")
LIMIT = 1 << 20


def small_disk() -> None:
    """In the child, before exec: no file it writes may grow past LIMIT bytes."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # (Python ignores it too, but the limit must not depend on that)


def run_on_small_disk(args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "urfm_fast.pretrain", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=small_disk, timeout=600)


def reference_cut_at_step_4(tmp_path_factory, name: str) -> Path:
    """The reference run folder as it stood after step 4 (step 8's checkpoints removed)."""
    out = tmp_path_factory.mktemp(name) / "run"
    shutil.copytree(reference_run(tmp_path_factory), out)
    shutil.rmtree(ckpt.step_dir(out, 8))
    (out / "checkpoint-00000008.pth").unlink()
    return out


def rerun_with_room_follows_the_curve(out: Path, tmp_path_factory, capsys) -> None:
    ref = losses(reference_run(tmp_path_factory))
    assert [p.name for _, p in ckpt.list_checkpoints(out)] == ["step_00000004"]
    assert ckpt.validate(ckpt.step_dir(out, 4)) is None  # what was kept is whole
    assert not list(out.rglob(".tmp-*")), list(out.rglob(".tmp-*"))
    capsys.readouterr()
    assert pretrain.main(["--out", str(out), "--resume"]) == 0
    assert "step_00000004 at step 4" in capsys.readouterr().out
    got = losses(out)
    assert list(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose(list(got.values()), list(ref.values()), rtol=0, atol=1e-6)
    assert ckpt.validate(ckpt.step_dir(out, 8)) is None and (out / "checkpoint-00000008.pth").is_file()


@pytest.mark.parametrize("mode", ["background", "--no-async-save"])
def test_checkpoint_larger_than_the_disk_allows(tmp_path_factory, capsys, mode):
    out = reference_cut_at_step_4(tmp_path_factory, "efbig")
    extra = [] if mode == "background" else [mode]
    r = run_on_small_disk(["--out", str(out), "--resume", "--save-every", "2", *extra])
    assert r.returncode == 2, r.stderr[-3000:]
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"writing checkpoint {ckpt.step_dir(out, 6)} failed" in err[0]
    assert f"the last complete checkpoint {ckpt.step_dir(out, 4)}" in err[0] and "--resume" in err[0]
    assert max(losses(out)) >= 6  # metrics.jsonl fitted: the steps trained are on record
    assert not ckpt.step_dir(out, 6).exists()
    rerun_with_room_follows_the_curve(out, tmp_path_factory, capsys)


def test_metrics_on_a_full_disk(tmp_path_factory, capsys):
    out = reference_cut_at_step_4(tmp_path_factory, "enospc")
    metrics = out / ckpt.METRICS_FILE
    kept = metrics.read_text()
    metrics.unlink()
    metrics.symlink_to("/dev/full")  # every write: ENOSPC
    assert pretrain.main(["--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: writing {metrics} failed (No space left on device)"), err
    assert f"the last complete checkpoint {ckpt.step_dir(out, 4)}" in err[0]
    metrics.unlink()
    metrics.write_text(kept)
    rerun_with_room_follows_the_curve(out, tmp_path_factory, capsys)


def test_leftovers_of_cut_writes_are_removed(tmp_path):
    """What a write cut short (a full disk, SIGKILL) leaves in a run folder is removed at the next start."""
    for name in (f".tmp-{ckpt.CONFIG_FILE}", f".tmp-{ckpt.METRICS_FILE}", ".tmp-checkpoint-00000002.pth"):
        (tmp_path / name).write_bytes(b"PK")
    (tmp_path / ckpt.CKPT_DIR / ".tmp-step_00000002").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("not ours to remove")
    ckpt.remove_partial(tmp_path)
    assert sorted(p.name for p in tmp_path.rglob("*")) == [ckpt.CKPT_DIR, "notes.txt"]
