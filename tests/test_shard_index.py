"""The binary shard index: round trip, prepare writes it, old folders converted, damage detected,
and the data stream's per-rank samples equal those read through index.jsonl."""

import json
import logging
import os

import numpy as np
import pytest
import torch

from urfm_fast.data import index_bin, shards
from urfm_fast.data.index_bin import INDEX_BIN, RECORD, ShardIndexError
from urfm_fast.data.stream import DataError, ShardDataset, _RankBatches


def make_shard_folder(root, n=40, seed=0):
    """A shard folder written by hand as prepare would (two shards, mixed sizes), without index.bin."""
    rng = np.random.default_rng(seed)
    os.makedirs(root / shards.SHARD_DIR)
    (root / shards.MARKER).write_text(json.dumps({"format": "urfm-shards", "version": 1, "short_side": 8}) + "\n")
    lines, files = [], [bytearray(), bytearray()]
    for i in range(n):
        k = i % 2
        h, w = 8, int(rng.integers(8, 13))
        rec = {"shard": k, "offset": len(files[k]), "h": h, "w": w, "id": f"{i:08x}{i * 7919:016x}",
               "frame": i % 3, "crop": "none", "roi": [0, h, 0, w]}
        if i % 5 == 0:
            rec["blank"] = [[0, 2, 0, 2]]
        if i % 7 == 0:
            rec["burned_in"] = True
        files[k] += rng.integers(0, 256, h * w, dtype=np.uint8).tobytes()
        lines.append(json.dumps(rec) + "\n")
    for k, data in enumerate(files):
        with open(shards.shard_path(root, k), "wb") as f:
            f.write(data)
    (root / shards.INDEX).write_text("".join(lines))
    return root


@pytest.fixture
def folder(tmp_path):
    return make_shard_folder(tmp_path / "shards")


def test_round_trip(folder):
    recs = shards.read_index(folder)
    index_bin.write_index_bin(folder)
    arr, jsonl_bytes = index_bin.read_index_bin(folder)
    assert isinstance(arr, np.memmap) and arr.dtype == RECORD and len(arr) == len(recs) == 40
    assert jsonl_bytes == os.path.getsize(folder / shards.INDEX)
    assert os.path.getsize(folder / INDEX_BIN) == index_bin.HEADER_BYTES + 40 * RECORD.itemsize
    for a, r in zip(arr, recs):
        assert (int(a["shard"]), int(a["offset"]), int(a["h"]), int(a["w"]), int(a["frame"])) == \
            (r["shard"], r["offset"], r["h"], r["w"], r["frame"])
        assert f"{int(a['src_id']):08x}{int(a['path_id']):016x}" == r["id"]
        assert bool(a["flags"] & index_bin.BURNED_IN) == r.get("burned_in", False)
        assert bool(a["flags"] & index_bin.BLANKED) == ("blank" in r)
    assert not [f for f in os.listdir(folder) if ".tmp" in f]


def test_old_folder_converted_on_first_open(folder):
    before = (folder / shards.INDEX).read_bytes()
    ds = ShardDataset(folder)
    assert (folder / INDEX_BIN).exists() and (folder / shards.INDEX).read_bytes() == before
    assert not [f for f in os.listdir(folder) if ".tmp" in f]
    again = ShardDataset(folder)
    assert isinstance(again.index, np.memmap)  # the second open maps the converted file
    recs = shards.read_index(folder)
    for i in (0, 1, 17, 39):
        r = recs[i]
        raw = np.fromfile(shards.shard_path(folder, r["shard"]), np.uint8)[r["offset"]:r["offset"] + r["h"] * r["w"]]
        assert torch.equal(ds[i], torch.from_numpy(raw).view(1, r["h"], r["w"]))
        assert torch.equal(again[i], ds[i])


def test_read_only_old_folder_is_read_from_the_jsonl(folder, monkeypatch):
    monkeypatch.setattr(shards.os, "access", lambda path, mode: False)  # also as root, who may write anyway
    ds = ShardDataset(folder)
    assert len(ds) == 40 and not (folder / INDEX_BIN).exists()


def test_full_disk_while_converting_still_opens(folder, monkeypatch, caplog):
    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(index_bin, "write_index_bin", full)
    with caplog.at_level(logging.WARNING, logger="urfm_fast.data.index_bin"):
        assert len(ShardDataset(folder)) == 40
    assert "No space left" in caplog.text and not (folder / INDEX_BIN).exists()


def test_stale_index_is_rebuilt(folder):
    index_bin.write_index_bin(folder)
    recs = shards.read_index(folder)
    extra = dict(recs[0], id="ffffffff0000000000000001")
    with open(folder / shards.INDEX, "a") as f:  # a run that crashed before rewriting index.bin
        f.write(json.dumps(extra) + "\n")
    assert len(ShardDataset(folder)) == 41
    arr, jsonl_bytes = index_bin.read_index_bin(folder)
    assert len(arr) == 41 and jsonl_bytes == os.path.getsize(folder / shards.INDEX)


def _garble(path, how):
    raw = bytearray(path.read_bytes())
    if how == "truncated":
        raw = raw[:-17]
    elif how == "entry":
        raw[index_bin.HEADER_BYTES + 5 * RECORD.itemsize + 3] ^= 0x40
    elif how == "header":
        raw[20] ^= 0x01  # the count
    else:
        raw = bytearray(b"not an index at all")
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["truncated", "entry", "header", "foreign"])
def test_damaged_index_falls_back_to_the_jsonl_and_is_rebuilt(folder, how, caplog):
    index_bin.write_index_bin(folder)
    good = (folder / INDEX_BIN).read_bytes()
    _garble(folder / INDEX_BIN, how)
    with pytest.raises(ShardIndexError):
        index_bin.read_index_bin(folder)
    with caplog.at_level(logging.WARNING, logger="urfm_fast.data.index_bin"):
        ds = ShardDataset(folder)
    assert len(ds) == 40
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "index.bin" in warned[0] and "index.jsonl instead" in warned[0]
    assert (folder / INDEX_BIN).read_bytes() == good


def test_damaged_index_without_jsonl_is_one_line_data_error(folder):
    index_bin.write_index_bin(folder)
    os.remove(folder / shards.INDEX)
    assert len(ShardDataset(folder)) == 40  # index.bin alone is enough
    _garble(folder / INDEX_BIN, "entry")
    with pytest.raises(DataError) as e:
        ShardDataset(folder)
    assert "\n" not in str(e.value) and "index.bin" in str(e.value) and "checksum" in str(e.value)


def test_entry_outside_its_shard_is_a_data_error(folder):
    with open(folder / shards.INDEX, "a") as f:
        f.write(json.dumps({"shard": 0, "offset": 10**6, "h": 8, "w": 8, "id": "0" * 24, "frame": 0}) + "\n")
    ds = ShardDataset(folder)
    with pytest.raises(DataError, match="outside shard 0"):
        ds[40]


def test_rank_slices_equal_the_jsonl_result(folder):
    """Every rank's samples over two epochs, looked up in the memory-mapped index, are the entries
    the same positions name in index.jsonl."""
    recs = shards.read_index(folder)
    ds = ShardDataset(folder)
    world, batch = 3, 4
    for rank in range(world):
        it = iter(_RankBatches(len(ds), batch, world, rank, seed=5, epoch=0, step=0))
        for _ in range(2 * (len(ds) // (batch * world))):
            ids = np.array([i for _, i in next(it)])
            mine = ds.index[ids]
            ref = [recs[i] for i in ids]
            assert mine["offset"].tolist() == [r["offset"] for r in ref]
            assert mine["shard"].tolist() == [r["shard"] for r in ref]
            assert np.stack([mine["h"], mine["w"]], 1).tolist() == [[r["h"], r["w"]] for r in ref]


def test_pickled_dataset_reopens_the_map_without_copying(folder):
    import pickle

    ShardDataset(folder)  # converts
    ds = ShardDataset(folder)  # maps the converted file
    blob = pickle.dumps(ds)
    assert len(blob) < 1000  # the entries are not in the pickle
    back = pickle.loads(blob)
    assert isinstance(back.index, np.memmap) and torch.equal(back[7], ds[7])


def test_no_names_in_the_binary_index(tmp_path):
    """Folders written before names were hashed hold names in index.jsonl: none reaches index.bin."""
    root = make_shard_folder(tmp_path / "shards")
    lines = [json.loads(x) for x in (root / shards.INDEX).read_text().splitlines()]
    for r in lines:
        del r["id"]
        r["src"], r["path"] = "Doe_Jane_19700314", "MRN4417291/scan.dcm"
    (root / shards.INDEX).write_text("".join(json.dumps(r) + "\n" for r in lines))
    ShardDataset(root)
    blob = (root / INDEX_BIN).read_bytes()
    assert b"Doe" not in blob and b"MRN" not in blob
    arr, _ = index_bin.read_index_bin(root)
    assert not arr["src_id"].any() and not arr["path_id"].any()


def test_cli_converts_and_checks(folder, capsys):
    assert index_bin.main([str(folder)]) == 0
    assert "all 40 entries" in capsys.readouterr().out and (folder / INDEX_BIN).exists()
    before = (folder / INDEX_BIN).stat().st_mtime_ns
    assert index_bin.main([str(folder)]) == 0  # already there: checked, not rewritten
    assert (folder / INDEX_BIN).stat().st_mtime_ns == before
    assert index_bin.main([str(folder / "shards")]) == 2
    assert "not a shard folder" in capsys.readouterr().err
