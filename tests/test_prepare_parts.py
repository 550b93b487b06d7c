"""prepare in parts: `--part K/N` runs at once against one --out, then `--merge`, give exactly the
images of one plain prepare; missing, unfinished or mismatched parts are named in one line."""

import json
import os
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from urfm_fast import prepare as P
from urfm_fast.data import shards
from urfm_fast.data.stream import DataError, ShardDataset


def _pixels(out):
    """source id -> sorted pixel bytes of its images (frame order)."""
    maps, got = {}, defaultdict(list)
    for r in shards.read_index(out):
        got[r["id"]].append((r["frame"], shards.read_image(out, maps, r).tobytes()))
    return {k: sorted(v) for k, v in got.items()}


def _cli(*args):
    return [sys.executable, "-m", "urfm_fast.prepare", *map(str, args), "--short-side", "32", "--workers", "1",
            "--quiet"]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    src = root / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for k in range(10):
        Image.fromarray(rng.integers(20, 180, (40 + k, 48), dtype=np.uint8)).save(src / f"scan{k}.png")
    key = root / "site.key"
    assert subprocess.run(_cli(src, "--out", root / "plain", "--key", key)).returncode == 0
    return src, root / "plain", key


def test_parts_at_once_then_merge_equal_one_plain_prepare(plain, tmp_path):
    src, ref, key = plain
    out = tmp_path / "out"
    runs = [subprocess.Popen(_cli(src, "--out", out, "--key", key, "--part", f"{k}/2"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for k in (1, 2)]
    said = [r.communicate(timeout=600) for r in runs]
    assert [r.returncode for r in runs] == [0, 0], said
    assert "--merge" in said[0][0]
    sizes = [len(shards.read_jsonl(shards.part_paths(out, k, 2)[0])) for k in (1, 2)]
    assert all(sizes) and sum(sizes) == 10  # both slices hold files (the hash balances them)
    assert sorted(int(f[6:11]) % 2 for f in os.listdir(out / "shards")) == [0, 1]  # each part its own shards
    with pytest.raises(DataError, match="not merged yet"):
        ShardDataset(out)
    assert P.main([str(src), "--out", str(out), "--key", str(key), "--short-side", "32"]) == 2  # plain: merge first
    assert P.main(["--out", str(out), "--merge"]) == 0
    assert _pixels(out) == _pixels(ref) and len(shards.read_index(out)) == len(shards.read_index(ref)) == 10
    assert not shards.parts_present(out) and len(ShardDataset(out)) == 10
    # a part run again after the merge adds nothing; merging that part alone
    assert subprocess.run(_cli(src, "--out", out, "--key", key, "--part", "1/2")).returncode == 0
    assert P.main(["--out", str(out), "--merge"]) == 2  # part 2/2 of this new round is missing
    assert P.main(["--out", str(out), "--merge", "--part", "1/2"]) == 0
    assert len(shards.read_index(out)) == 10


def _start_parts(src, out, n, *extra):
    return [subprocess.Popen(_cli(src, "--out", out, "--part", f"{k}/{n}", *extra), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True) for k in range(1, n + 1)]


def test_eight_parts_start_at_once_into_one_new_folder(plain, tmp_path):
    """The start-up race: 8 parts started together into one new folder, 20 times. Creating the folder,
    its marker, its key and the part locks must be safe however the starts interleave. Even rounds share
    the plain run's --key (the merge must equal it exactly); odd rounds let the first part create DIR.key."""
    src, ref, key = plain
    for rnd in range(20):
        out = tmp_path / f"out{rnd}"
        runs = _start_parts(src, out, 8, *(("--key", key) if rnd % 2 == 0 else ()))
        errors = [r.communicate(timeout=600)[1] for r in runs]
        assert [r.returncode for r in runs] == [0] * 8, (rnd, errors)
        assert P.main(["--out", str(out), "--merge"]) == 0
        got, want = _pixels(out), _pixels(ref)
        assert (got == want) if rnd % 2 == 0 else (sorted(got.values()) == sorted(want.values())), rnd
        left = {f for f in os.listdir(out) if not f.startswith("summary.part-")}
        assert left == {shards.MARKER, "index.bin", "index.jsonl", "shards", "skipped.jsonl", shards.LOCK,
                        shards.SETUP_LOCK}, rnd  # no temporary file or part lock left behind
        if rnd % 2:
            assert len({r["id"][:8] for r in shards.read_index(out)}) == 1  # one folder, one key for all parts


def test_parts_in_separate_folders(plain, tmp_path):
    src, ref, key = plain
    outs = [tmp_path / f"part{k}" for k in (1, 2)]
    for k, out in enumerate(outs, 1):
        assert P.main([str(src), "--out", str(out), "--key", str(key), "--part", f"{k}/2", "--short-side", "32",
                       "--workers", "1", "--quiet"]) == 0
        assert P.main(["--out", str(out), "--merge", "--part", f"{k}/2"]) == 0
    got = {**_pixels(outs[0]), **_pixels(outs[1])}
    assert got == _pixels(ref) and sum(len(ShardDataset(o)) for o in outs) == 10


def test_bad_parts_are_one_line(plain, tmp_path, capfd):
    src, _, key = plain
    out = tmp_path / "out"
    base = [str(src), "--out", str(out), "--key", str(key), "--short-side", "32", "--workers", "1", "--quiet"]
    for bad in ("0/2", "3/2", "2", "a/b", "1/0"):
        assert P.main([*base, "--part", bad]) == 2
        err = capfd.readouterr().err
        assert "--part" in err and "1 <= K <= N" in err and err.count("\n") == 1
    assert P.main([*base, "--part", "1/2"]) == 0
    capfd.readouterr()
    cases = [
        ([], "index.part-0002-of-0002.jsonl is missing"),
    ]
    for more, want in cases:
        assert P.main(["--out", str(out), "--merge", *more]) == 2
        err = capfd.readouterr().err
        assert want in err and err.count("\n") == 1, err
    assert P.main([*base, "--part", "2/2", "--short-side", "64"]) == 2  # another --short-side: refused
    assert "short side 32" in capfd.readouterr().err
    assert P.main([*base, "--part", "2/2"]) == 0
    os.remove(shards.part_paths(out, 2, 2)[2])  # as if part 2 were still running or cut short
    assert P.main(["--out", str(out), "--merge"]) == 2
    err = capfd.readouterr().err
    assert "index.part-0002-of-0002.jsonl is unfinished" in err and err.count("\n") == 1
    assert P.main([*base, "--part", "1/3"]) == 0
    assert P.main(["--out", str(out), "--merge"]) == 2
    assert "splits into 2 and 3" in capfd.readouterr().err
    assert P.main(["--out", str(out), "--merge", str(src)]) == 2
    assert "--merge takes no SRC" in capfd.readouterr().err
    assert shards.read_index(out) == []  # nothing merged by any refused merge
    meta = json.loads((out / shards.MARKER).read_text())
    assert meta["short_side"] == 32
