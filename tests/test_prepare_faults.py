"""prepare under the faults a cluster deals out: SIGKILL at random moments (plain, --part, with decoding
workers) and a real full disk (a file-size limit on the process). Each rerun of the same command must end
with the images of one uninterrupted prepare, nothing lost or doubled, and nothing a person must clean up
(no lock still held by an orphaned worker, no temporary file in the folder)."""

import os
import random
import resource
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from urfm_fast import prepare as P
from urfm_fast.data import shards


def _cli(src, out, key, *extra):
    return [sys.executable, "-m", "urfm_fast.prepare", str(src), "--out", str(out), "--key", str(key),
            "--short-side", "32", "--quiet", *map(str, extra)]


def _pixels(out):
    """source id -> sorted (frame, pixel bytes) of its images."""
    maps, got = {}, defaultdict(list)
    for r in shards.read_index(out):
        got[r["id"]].append((r["frame"], shards.read_image(out, maps, r).tobytes()))
    return {k: sorted(v) for k, v in got.items()}


N_SCANS = 40


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """40 scans, the folder one uninterrupted prepare makes of them, and how long that took here (the
    kills land at moments drawn inside that span, on a fast machine as on a loaded one)."""
    root = tmp_path_factory.mktemp("faults")
    src = root / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for k in range(N_SCANS):
        Image.fromarray(rng.integers(20, 180, (180 + k, 240), dtype=np.uint8)).save(src / f"scan{k:02d}.png")
    key = root / "site.key"
    t0 = time.monotonic()
    assert subprocess.run(_cli(src, root / "ref", key, "--workers", "1"), capture_output=True).returncode == 0
    return src, root / "ref", key, time.monotonic() - t0


def _gone(group, timeout=60):
    """Wait until no process of the killed run's process group is left (its workers die with it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.01)
    return False


def _kill_at(cmd, seconds, after=None):
    """Start cmd in its own process group, SIGKILL its main process `seconds` after it started (or,
    with `after`, after that file first holds data: mid-run), unless it finishes first -> its return
    code. Its decoding workers must not outlive it."""
    run = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    while after is not None and run.poll() is None and not (after.exists() and after.stat().st_size):
        time.sleep(0.002)
    try:
        run.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        run.send_signal(signal.SIGKILL)
        run.wait()
    assert _gone(run.pid), "a decoding worker outlived its killed prepare"
    said = run.stderr.read().decode()
    run.stderr.close()
    assert "Traceback" not in said, said  # an orphaned worker writing to its dead parent
    return run.returncode


def _no_leftovers(out):
    names = [f for f in os.listdir(out) if ".tmp" in f] + [f for f in os.listdir(out / "shards") if ".tmp" in f]
    assert not names, names


@pytest.mark.parametrize("mode", ["plain", "workers", "parts"])
def test_prepare_killed_at_random_moments_reruns_to_the_same_images(plain, tmp_path, mode):
    src, ref, key, seconds = plain
    out = tmp_path / "out"
    rng = random.Random(f"kill-{mode}")  # seeded: the same moments on every run of the suite
    extra = ("--workers", "1") if mode == "plain" else ("--workers", "2")
    cmds = ([_cli(src, out, key, *extra, "--part", f"{k}/2") for k in (1, 2)] if mode == "parts"
            else [_cli(src, out, key, *extra)])
    written = [Path(shards.part_paths(out, k, 2)[0]) for k in (1, 2)] if mode == "parts" else [out / shards.INDEX]
    killed = 0
    for attempt in range(4):  # two at any moment from the start, two once images are being written
        for cmd, index in zip(cmds, written):
            after = index if attempt % 2 else None
            killed += _kill_at(cmd, rng.uniform(0.0, 0.5) * seconds, after) == -signal.SIGKILL
    for cmd in cmds:  # the same command again, with no one cleaning up in between
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
    if mode == "parts":
        assert P.main(["--out", str(out), "--merge"]) == 0
    assert killed, "no run was killed: the moments are too late for this machine"
    assert _pixels(out) == _pixels(ref)  # nothing lost, nothing doubled
    assert len(shards.read_index(out)) == len(shards.read_index(ref)) == N_SCANS
    _no_leftovers(out)
    with shards.lock_folder(str(out)):  # no lock left held
        pass


def _limit_file_size(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_prepare_on_a_full_disk_stops_in_one_line_and_a_rerun_completes(plain, tmp_path):
    src, ref, key, _ = plain
    out = tmp_path / "out"
    cmd = _cli(src, out, key, "--workers", "1")
    # ~5 KB per image: the first shard file reaches the limit after a handful of images
    full = subprocess.run(cmd, capture_output=True, text=True, timeout=600, preexec_fn=_limit_file_size(20_000))
    lines = full.stderr.strip().splitlines()
    assert full.returncode == 2 and len(lines) == 1, full.stderr
    assert str(out) in lines[0] and "kept" in lines[0] and "Traceback" not in full.stderr, lines
    kept = len(shards.read_index(out))
    assert 0 < kept < N_SCANS and f"{kept} images" in lines[0]
    assert _pixels(out).items() <= _pixels(ref).items()  # what was kept is whole
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"{kept} already done" in again.stdout or "already done" in again.stdout
    assert _pixels(out) == _pixels(ref) and len(shards.read_index(out)) == N_SCANS
    _no_leftovers(out)


def test_ctrl_c_is_one_line_and_the_rerun_continues(plain, tmp_path):
    """Ctrl-C reaches the whole process group, workers included: one line, exit 130, nothing left running."""
    src, ref, key, _ = plain
    out = tmp_path / "out"
    cmd = _cli(src, out, key, "--workers", "2")
    run = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    index = out / "index.jsonl"
    deadline = time.monotonic() + 120
    while run.poll() is None and not (index.exists() and index.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.01)  # until the first images are written
    os.killpg(run.pid, signal.SIGINT)  # as a terminal does
    said = run.communicate(timeout=120)[1]
    if run.returncode == 0:
        pytest.skip("prepare finished before the interrupt reached it")
    assert run.returncode == 130 and said.strip().splitlines() == [said.strip()], said
    assert said.startswith("interrupted;") and "rerun the same command" in said and "images are kept" in said
    assert _gone(run.pid)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert _pixels(out) == _pixels(ref)
    _no_leftovers(out)


def test_show_writes_one_image_at_full_size(plain, tmp_path, capsys):
    src, ref, key, _ = plain
    r = shards.read_index(ref)[5]
    assert P.main(["--out", str(ref), "--show", "5"]) == 0
    img = np.asarray(Image.open(ref / shards.review_name(5)))
    assert img.shape[:2] == (r["h"], r["w"])
    assert P.main(["--out", str(ref), "--show", str(N_SCANS)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no line {N_SCANS}" in err


def test_a_cine_cut_inside_its_index_write_is_read_again(tmp_path):
    """A kill inside the one write of a multi-frame file's index lines can leave its first lines only.
    The next run sees that the last run did not finish (index.bin was not rewritten) and reads that file
    again, so none of its frames is lost and none doubled."""
    from test_prepare import speckle, write_dicom

    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(speckle(60, 72, 0)).save(src / "still.png")
    write_dicom(src / "cine.dcm", np.stack([speckle(64, 80, 10 + k) for k in range(4)]))
    key, out, ref = tmp_path / "k.key", tmp_path / "out", tmp_path / "ref"
    for folder in (out, ref):
        assert subprocess.run(_cli(src, folder, key, "--workers", "1"), capture_output=True).returncode == 0
    lines = (out / shards.INDEX).read_text().splitlines(keepends=True)
    cine = [ln for ln in lines if '"frame": 0' not in ln][0].split('"id": "')[1][:24]
    first, *rest = [ln for ln in lines if cine in ln]
    assert rest, "the cine should have several frames"
    (out / shards.INDEX).write_text("".join(ln for ln in lines if cine not in ln) + first)  # killed mid-write
    (out / "index.bin").unlink()  # ... so the run never reached its end
    again = subprocess.run(_cli(src, out, key, "--workers", "1"), capture_output=True, text=True)
    assert again.returncode == 0 and "1 already done, 1 added" in again.stdout, again.stdout
    assert _pixels(out) == _pixels(ref)
    done = subprocess.run(_cli(src, out, key, "--workers", "1"), capture_output=True, text=True)
    assert "2 already done, 0 added" in done.stdout, done.stdout  # a finished run is not redone
