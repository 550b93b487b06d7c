"""prepare on video clips (PyAV), NIfTI (nibabel) and MetaImage volumes written here, broken ones
included, mixed with DICOM, and on sources given by --list."""

import json
import os
import sys
import zlib

import numpy as np
import pytest
from test_prepare import SECRETS, all_output_bytes, named, speckle, write_dicom

from urfm_fast import prepare as P
from urfm_fast.data import convert, media, shards, sources
from urfm_fast.data.stream import ShardDataset, build_train_stream

av = pytest.importorskip("av")
nib = pytest.importorskip("nibabel")


def write_clip(path, frames, codec="mpeg4", pix_fmt="yuv420p", fps=10):
    """Grey uint8 frames [H,W] -> a video file (container from the suffix)."""
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = frames[0].shape[1], frames[0].shape[0], pix_fmt
        for f in frames:
            for packet in s.encode(av.VideoFrame.from_ndarray(np.repeat(f[..., None], 3, 2), format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)


def write_mhd(folder, stem, vol, data_file=None, compressed=False, element="MET_SHORT", local=False):
    """vol [z, y, x] int16 -> stem.mhd + data file (or stem.mha with the data inside)."""
    data = vol.astype("<i2").tobytes()
    if compressed:
        data = zlib.compress(data)
    z, y, x = vol.shape
    head = (f"ObjectType = Image\nNDims = 3\nDimSize = {x} {y} {z}\nElementType = {element}\n"
            f"BinaryDataByteOrderMSB = False\nCompressedData = {compressed}\n")
    if compressed:
        head += f"CompressedDataSize = {len(data)}\n"
    if local:
        (folder / f"{stem}.mha").write_bytes((head + "ElementDataFile = LOCAL\n").encode() + data)
        return
    data_file = data_file or f"{stem}.raw"
    (folder / f"{stem}.mhd").write_text(head + f"ElementDataFile = {data_file}\n")
    if not data_file.startswith(("..", "/")):
        (folder / data_file).write_bytes(data)


def fan_volume(z, h, w, empty=(), seed=0):
    """int16 [z, h, w]: distinct speckle slices (12-bit, one hot voxel), zeros for the slices in empty."""
    rng = np.random.default_rng(seed)
    vol = rng.integers(300, 3000, (z, h, w)).astype(np.int16)
    vol[0, 0, 0] = 32000  # a hot voxel: the percentile range ignores it
    for k in empty:
        vol[k] = 0
    return vol


CLIP = [speckle(64, 80, 30 + k) for k in range(4)]
CLIP = CLIP[:2] + [CLIP[1]] + CLIP[2:]  # frame 2 repeats frame 1: a near-duplicate, left out


@pytest.fixture
def corpus(tmp_path):
    """A folder of every kind: MP4, AVI, .nii.gz, .mhd/.raw, .mha, DICOM cine and still, broken files."""
    root = tmp_path / "Collection Doe^Jane"
    (root / "echo").mkdir(parents=True)
    write_clip(root / "echo" / "a4c.mp4", CLIP)
    write_clip(root / "echo" / "lung.avi", CLIP[:2], codec="mjpeg", pix_fmt="yuvj420p")
    nii = fan_volume(6, 48, 64, empty=(0, 5), seed=1)  # written [x, y, z]: 4 slices with signal
    nib.save(nib.Nifti1Image(np.ascontiguousarray(nii.transpose(2, 1, 0)), np.eye(4)), root / "fetal.nii.gz")
    write_mhd(root, "prostate", fan_volume(3, 48, 64, empty=(1,), seed=2))  # 2 slices with signal
    write_mhd(root, "camus", fan_volume(2, 40, 56, seed=3), compressed=True, local=True)
    cine = [speckle(64, 80, 10 + k) for k in range(3)]
    write_dicom(root / "cine.dcm", np.stack(cine[:2] + [cine[1]] + cine[2:]))  # frame 2 repeats frame 1
    write_dicom(root / "still", speckle(48, 64, 20)[None])
    try:  # real single-frame ultrasound DICOM test files (pydicom-data), when installed
        from pydicom.data import get_testdata_file

        for n in REAL_DICOM:
            os.symlink(get_testdata_file(n), root / n)
    except (ImportError, TypeError):
        pass
    # broken
    data = (root / "echo" / "a4c.mp4").read_bytes()
    (root / "echo" / "cut.mp4").write_bytes(data[: len(data) // 2])
    (root / "bad.nii.gz").write_bytes(b"\x1f\x8b" + os.urandom(300))
    write_mhd(root, "nodata", fan_volume(2, 40, 40), data_file="gone.raw")
    (root / "gone.raw").unlink()
    write_mhd(root, "short", fan_volume(2, 40, 40))
    (root / "short.raw").write_bytes(b"\0" * 100)
    write_mhd(root, "escape", fan_volume(2, 40, 40), data_file="../outside.raw")
    (tmp_path / "outside.raw").write_bytes(fan_volume(2, 40, 40).tobytes())
    return root


REAL_DICOM = ("US1_UNCR.dcm", "gdcm-US-ALOKA-16.dcm")
EXPECTED = {  # path -> frame numbers written
    "echo/a4c.mp4": [0, 1, 3, 4], "echo/lung.avi": [0, 1], "fetal.nii.gz": [1, 2, 3, 4],
    "prostate.mhd": [0, 2], "camus.mha": [0, 1], "cine.dcm": [0, 1, 3], "still": [0],
}


def test_one_command_for_every_kind(corpus, tmp_path, capfd):
    out, pmap = tmp_path / "out", tmp_path / "map.jsonl"
    assert P.main([str(corpus), "--out", str(out), "--short-side", "32", "--workers", "1", "--quiet",
                   "--path-map", str(pmap)]) == 0
    text = capfd.readouterr()
    index, skips = named(out, pmap)
    frames = {}
    for r in index:
        frames.setdefault(r["path"], []).append(r["frame"])
    real = {n: [0] for n in REAL_DICOM if (corpus / n).exists()}
    assert frames == EXPECTED | real
    reasons = {r["path"]: r["reason"] for r in skips}
    assert set(reasons) == {"echo/cut.mp4", "bad.nii.gz", "nodata.mhd", "short.mhd", "escape.mhd"}
    assert reasons["echo/cut.mp4"].startswith("not a readable video clip")  # its index (moov) was at the end
    assert reasons["bad.nii.gz"].startswith("corrupt NIfTI file")
    assert reasons["nodata.mhd"] == "MetaImage data file missing"
    assert reasons["short.mhd"] == "MetaImage data file shorter than its header declares"
    assert reasons["escape.mhd"] == "MetaImage data file outside the header's folder; not read"
    c = json.loads((out / "summary.json").read_text())
    n_images = sum(map(len, EXPECTED.values())) + len(real)
    assert c["images_added"] == n_images and c["frames_duplicate"] == 2  # one in the MP4, one in the DICOM
    assert len(c["sources"]) == 1
    src = dict(c["sources"][0])
    skipped, seconds = src.pop("skipped"), src.pop("seconds")
    assert src == {"source": 1, "given_as": "argument 1", "id": index[0]["id"][:8], "files": 12 + len(real),
                   "files_already_done": 0, "files_added": 7 + len(real), "images_added": n_images}
    assert sum(skipped.values()) == 5 and all(skipped[reasons[p]] == 1 for p in ("nodata.mhd", "short.mhd"))
    # the source's share of the work: decoding files takes time, and never more than the whole run's
    assert 0 < seconds <= c["seconds"] + 0.01
    # names stay out of every output and the console
    for name, blob in all_output_bytes(out) + [("stdout", text.out.encode()), ("stderr", text.err.encode())]:
        for s in SECRETS + ["echo", "prostate", "fetal", "Collection"]:  # not hex: ids are hex
            assert s.encode() not in blob, (name, s)
    # pretraining reads it
    ds = ShardDataset(out)
    assert len(ds) == n_images and all(ds[k].float().std() > 5 for k in range(len(ds)))
    x, _ = next(iter(build_train_stream(out, img_size=16, batch_size=4, num_workers=0)))
    assert x.shape == (4, 3, 16, 16)


def test_volume_slices_and_intensity(tmp_path):
    """Slices along the third voxel axis, in the x-across / y-down plane, one range per volume."""
    vol = fan_volume(3, 40, 56, empty=(2,), seed=4)  # [z, y, x]
    p = tmp_path / "v.nii"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(vol.transpose(2, 1, 0)), np.eye(4)), p)
    with open(p, "rb") as f:
        frames, kept, box, proj = media.volume_frames(f, str(p), 1, sources.MAX_FRAME_PIXELS)
        got = list(frames)
    assert [k for k, _ in got] == [0, 1] and kept == 2 and box == (0, 40, 0, 56)
    lo, hi = np.percentile(vol, media.PERCENTILES)
    want = np.clip((vol[1].astype(np.float32) - lo) * 255 / (hi - lo) + 0.5, 0, 255).astype(np.uint8)
    assert got[1][1].shape == (40, 56) and np.abs(got[1][1].astype(int) - want).max() <= 1
    # the same data as .mhd/.raw (x fastest) give the same slices
    write_mhd(tmp_path, "v", vol)
    with open(tmp_path / "v.mhd", "rb") as f:
        frames, *_ = media.volume_frames(f, str(tmp_path / "v.mhd"), 1, sources.MAX_FRAME_PIXELS, sources._open_regular)
        assert all((a == b).all() for (_, a), (_, b) in zip(frames, got))
    # the slice axis the header names (dim_info): here x, so slices are y-z planes
    img = nib.Nifti1Image(np.ascontiguousarray(vol.transpose(2, 1, 0)), np.eye(4))
    img.header.set_dim_info(slice=0)
    nib.save(img, tmp_path / "sag.nii")
    with open(tmp_path / "sag.nii", "rb") as f:
        sag = list(media.volume_frames(f, str(tmp_path / "sag.nii"), 1, sources.MAX_FRAME_PIXELS)[0])
    assert len(sag) == 56 and sag[0][1].shape == (3, 40)  # y across, z down
    # a frame stride takes every N-th slice
    with open(p, "rb") as f:
        assert [k for k, _ in media.volume_frames(f, str(p), 2, sources.MAX_FRAME_PIXELS)[0]] == [0]


def test_over_budget_and_no_signal_refused_before_reading(tmp_path, monkeypatch):
    (tmp_path / "huge.mhd").write_text("NDims = 3\nDimSize = 4096 4096 4096\nElementType = MET_SHORT\n"
                                       "ElementDataFile = huge.raw\n")
    (tmp_path / "huge.raw").write_bytes(b"\0" * 10)
    with open(tmp_path / "huge.mhd", "rb") as f, pytest.raises(ValueError, match="exceeds the budget"):
        media.volume_frames(f, str(tmp_path / "huge.mhd"), 1, sources.MAX_FRAME_PIXELS, sources._open_regular)
    write_mhd(tmp_path, "flat", np.zeros((2, 40, 40), np.int16))
    with open(tmp_path / "flat.mhd", "rb") as f, pytest.raises(ValueError, match="without signal"):
        media.volume_frames(f, str(tmp_path / "flat.mhd"), 1, sources.MAX_FRAME_PIXELS, sources._open_regular)
    write_mhd(tmp_path, "fifo", np.ones((2, 40, 40), np.int16), data_file="fifo.data")
    os.unlink(tmp_path / "fifo.data")
    os.mkfifo(tmp_path / "fifo.data")  # reading it would block forever
    with open(tmp_path / "fifo.mhd", "rb") as f, pytest.raises(ValueError, match="not a regular file"):
        media.volume_frames(f, str(tmp_path / "fifo.mhd"), 1, sources.MAX_FRAME_PIXELS, sources._open_regular)
    write_clip(tmp_path / "big.mp4", CLIP[:2])
    with open(tmp_path / "big.mp4", "rb") as f, pytest.raises(ValueError, match="pixel budget"):
        media.video_frames(f, 1, 64 * 80 - 1)


def test_truncated_avi_and_stride(tmp_path):
    clip = [speckle(64, 80, 50 + k) for k in range(6)]
    write_clip(tmp_path / "c.avi", clip)
    with open(tmp_path / "c.avi", "rb") as f:
        frames, kept = media.video_frames(f, 2, sources.MAX_FRAME_PIXELS)
        got = list(frames)
    assert [k for k, _ in got] == [0, 2, 4] and kept == 3
    assert np.abs(got[1][1].astype(int) - clip[2]).mean() < 8  # luma of what was written
    data = (tmp_path / "c.avi").read_bytes()
    (tmp_path / "cut.avi").write_bytes(data[: len(data) * 2 // 3])
    with open(tmp_path / "cut.avi", "rb") as f, pytest.raises(ValueError, match=r"truncated video clip \(3 of 6"):
        list(media.video_frames(f, 1, sources.MAX_FRAME_PIXELS)[0])


def test_list_file_and_per_source_summary(corpus, tmp_path, capfd):
    """--list: paths relative to the list, a CSV with a path column; nothing of it on the console or in DIR."""
    other = tmp_path / "Smith^John study"
    other.mkdir()
    write_clip(other / "clip.mp4", CLIP[:2])
    lst = tmp_path / "corpus.csv"
    lst.write_text(f"collection,path\nAlphaCohort,{corpus.name}\nBetaCohort,{other}\n")
    out = tmp_path / "out"
    assert P.main(["--list", str(lst), "--out", str(out), "--short-side", "32", "--workers", "2", "--quiet"]) == 0
    text = capfd.readouterr()
    c = json.loads((out / "summary.json").read_text())
    rows = {r["source"]: r for r in c["sources"]}
    assert rows[1]["given_as"] == "--list line 2" and rows[2]["given_as"] == "--list line 3"
    assert rows[1]["images_added"] == len(shards.read_index(out)) - 2
    assert rows[2]["images_added"] == 2 and rows[2]["files"] == 1
    assert "source 2 (--list line 3" in text.out
    for name, blob in all_output_bytes(out) + [("stdout", text.out.encode()), ("stderr", text.err.encode())]:
        for s in ("Smith", "Doe^Jane", "AlphaCohort", "BetaCohort", "clip.mp4"):
            assert s.encode() not in blob, (name, s)
    # plain lines (with a comment) give the same sources; a missing entry is named by its line only
    plain = tmp_path / "plain.txt"
    plain.write_text(f"# corpus\n{corpus}\n\n{other}\n{tmp_path / 'Gone^Patient'}\n")
    assert P.main(["--list", str(plain), "--out", str(tmp_path / "o2"), "--quiet"]) == 2
    err = capfd.readouterr().err
    assert "--list line 5 does not exist" in err and "Gone" not in err
    assert [p for p, _ in sources.read_source_list(plain)[:2]] == [str(corpus), str(other)]
    # a source given twice would be written twice: refused, named by position
    plain.write_text(f"{other}\n{other}/\n")
    assert P.main(["--list", str(plain), "--out", str(tmp_path / "o3"), "--quiet"]) == 2
    assert "source --list line 2 is also given as --list line 1" in capfd.readouterr().err


def test_zip_members_and_raw_not_listed(corpus, tmp_path):
    import zipfile

    z = tmp_path / "clips.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.write(corpus / "echo" / "a4c.mp4", "x/a4c.mp4")
        zf.write(corpus / "fetal.nii.gz", "x/fetal.nii.gz")
        zf.write(corpus / "camus.mha", "x/camus.mha")
        zf.write(corpus / "prostate.mhd", "x/prostate.mhd")
        zf.write(corpus / "prostate.raw", "x/prostate.raw")
    files = sources.walk_sources([z], tmp_path / "out")
    assert sorted(r for _, r, _, _ in files) == [f"clips.zip/x/{n}" for n in
                                                 ("a4c.mp4", "camus.mha", "fetal.nii.gz", "prostate.mhd")]
    assert not any(r.endswith(".raw") for _, r, _, _ in sources.walk_sources([corpus], tmp_path / "out"))
    c = convert.prepare([z], tmp_path / "out", short_side=32, workers=1, progress=False)
    assert c["images_added"] == 4 + 4 + 2 and c["skip_reasons"] == {
        "MetaImage .mhd inside a zip archive": 1}


@pytest.mark.parametrize("module, kind, n", [("av", "video", 3), ("nibabel", "nifti", 2)])
def test_missing_library_named(corpus, tmp_path, monkeypatch, capfd, module, kind, n):
    """The library is hidden (an import of it fails, as when it is not installed), not the check."""
    monkeypatch.setitem(sys.modules, module, None)
    assert P.main([str(corpus), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capfd.readouterr().err
    assert f"{n} {kind} files found; {kind} files need the '{module}' package: pip install 'urfm_fast[media]'" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()
