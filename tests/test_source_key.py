"""The key that names a shard folder's sources lives outside the folder: DIR.key (mode 0600) or --key FILE.

Whoever receives the folder must not be able to hash a guessed path and find it in the index; a rerun
and labels by path need the key and stop in one line without it; an older folder (salt in its marker)
has the salt moved out on the next prepare with its ids unchanged."""

import json
import os
import re
import shutil
import stat

import numpy as np
import pytest
from PIL import Image

from urfm_fast import prepare as P
from urfm_fast.data import convert, shards
from urfm_fast.data.source_ids import SourceKeyError, default_key_path, folder_salt, source_id
from urfm_fast.data.stream import ShardDataset
from urfm_fast.eval.data import read_shard_labels


def _images(folder, n, seed=0):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        Image.fromarray(rng.integers(20, 180, (40, 48), dtype=np.uint8)).save(folder / f"Doe_Jane_{k}.png")


@pytest.fixture
def prepared(tmp_path):
    src = tmp_path / "MRN4417291"
    _images(src, 3)
    out = tmp_path / "shards"
    c = convert.prepare([src], out, short_side=32, workers=1, progress=False, path_map=tmp_path / "map.jsonl")
    assert c["images_added"] == 3
    return src, out, tmp_path / "map.jsonl"


def _strings(out):
    """Every string a receiver of the folder could try as the key: JSON values and keys of every
    JSON(-lines) file, and every run of 4+ printable bytes of every file (shards and index.bin too)."""
    found = set()

    def walk(v):
        if isinstance(v, dict):
            for k, x in v.items():
                found.add(str(k))
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif v is not None:
            found.add(str(v))

    for d, _, files in os.walk(out):
        for f in files:
            blob = open(os.path.join(d, f), "rb").read()
            found.update(m.decode() for m in re.findall(rb"[\x20-\x7e]{4,}", blob))
            if f.endswith(".json"):
                walk(json.loads(blob))
            elif f.endswith(".jsonl"):
                for line in blob.decode().splitlines():
                    walk(json.loads(line))
    return found


def test_no_key_inside_the_folder(prepared):
    src, out, path_map = prepared
    key = default_key_path(out)
    assert key == str(out) + ".key" and os.path.isfile(key)
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    rows = [json.loads(line) for line in open(path_map)]
    ids = {r["id"] for r in shards.read_index(out)}
    assert ids == {r["id"] for r in rows}
    salt = json.load(open(key))["salt"]
    assert {source_id(salt, r["src"], r["path"]) for r in rows} == ids  # the key does name them
    candidates = _strings(out)
    assert len(candidates) > 20
    for s in candidates:
        assert not {source_id(s, r["src"], r["path"]) for r in rows} & ids, s
    assert salt not in candidates and "salt" not in json.load(open(out / shards.MARKER))
    assert len(ShardDataset(out)) == 3  # training needs no key


def test_rerun_with_and_without_the_key(prepared, tmp_path, capfd):
    src, out, _ = prepared
    before = (out / shards.INDEX).read_bytes()
    assert P.main([str(src), "--out", str(out), "--quiet", "--short-side", "32"]) == 0
    assert "3 already done, 0 added" in capfd.readouterr().out
    key = default_key_path(out)
    shutil.move(key, tmp_path / "kept.key")
    assert P.main([str(src), "--out", str(out), "--quiet", "--short-side", "32"]) == 2
    err = capfd.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and key in err, err
    assert (out / shards.INDEX).read_bytes() == before and not os.path.exists(key)
    # --key FILE where it is kept: nothing added again
    again = [str(src), "--out", str(out), "--quiet", "--short-side", "32"]
    assert P.main([*again, "--key", str(tmp_path / "kept.key")]) == 0
    assert "3 already done, 0 added" in capfd.readouterr().out
    # the review sheet reads pixels only
    assert P.main(["--out", str(out), "--review", "2"]) == 0


def test_key_inside_the_folder_or_of_another_folder_is_refused(prepared, tmp_path, capfd):
    src, out, _ = prepared
    assert P.main([str(src), "--out", str(out), "--quiet", "--short-side", "32", "--key", str(out / "my.key")]) == 2
    assert "inside the shard folder" in capfd.readouterr().err and not (out / "my.key").exists()
    other = tmp_path / "other"
    _images(tmp_path / "b", 1, seed=5)
    convert.prepare([tmp_path / "b"], other, short_side=32, workers=1, progress=False)
    assert P.main([str(src), "--out", str(out), "--quiet", "--short-side", "32", "--key", default_key_path(other)]) == 2
    err = capfd.readouterr().err
    assert "does not belong to" in err and err.count("\n") == 1


def test_old_folder_migrates_with_unchanged_ids(prepared, capfd):
    src, out, _ = prepared
    key = default_key_path(out)
    salt = json.load(open(key))["salt"]
    ids = [r["id"] for r in shards.read_index(out)]
    meta = json.load(open(out / shards.MARKER))
    del meta["key_check"]
    (out / shards.MARKER).write_text(json.dumps({**meta, "salt": salt}))  # as an older prepare wrote it
    os.remove(key)
    assert P.main([str(src), "--out", str(out), "--quiet", "--short-side", "32"]) == 0
    said = capfd.readouterr().out
    assert said.count("out of the folder") == 1 and "0 added" in said
    assert json.load(open(key))["salt"] == salt and stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert "salt" not in json.load(open(out / shards.MARKER))
    assert [r["id"] for r in shards.read_index(out)] == ids
    assert P.main([str(src), "--out", str(out), "--quiet", "--short-side", "32"]) == 0
    assert "out of the folder" not in capfd.readouterr().out  # said once
    assert folder_salt(out) == salt


def test_labels_by_path_need_the_key(prepared, tmp_path):
    src, out, _ = prepared
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label,split\nDoe_Jane_0.png,a,train\nDoe_Jane_1.png,b,train\n"
                      "MRN4417291/Doe_Jane_2.png,a,val\n")
    rows, n = read_shard_labels(out, labels)
    assert n == 3 and sorted(lab for _, lab, _ in rows) == ["a", "a", "b"]
    key = default_key_path(out)
    shutil.move(key, tmp_path / "kept.key")
    with pytest.raises(SourceKeyError, match=re.escape(key)) as e:
        read_shard_labels(out, labels)
    assert "\n" not in str(e.value)
    assert read_shard_labels(out, labels, key=tmp_path / "kept.key")[0] == rows
    by_index = tmp_path / "by_index.csv"  # rows by index need no key
    by_index.write_text("index,label,split\n0,a,train\n1,b,train\n2,a,val\n")
    assert len(read_shard_labels(out, by_index)[0]) == 3


def test_evaluate_cli_without_the_key_is_one_line(prepared, tmp_path, capsys):
    from urfm_fast.evaluate import main

    src, out, _ = prepared
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label,split\nDoe_Jane_0.png,a,train\nDoe_Jane_1.png,b,train\nDoe_Jane_2.png,a,val\n")
    os.remove(default_key_path(out))
    argv = ["--backbone", "random", "--arch", "vit_tiny", "--img-size", "32", "--data", str(out), "--labels",
            str(labels), "--protocol", "linear", "--out", str(tmp_path / "res")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and default_key_path(out) in err
