"""python -m urfm_fast.prepare on a messy folder built here, and on real ultrasound DICOM test files."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from urfm_fast import prepare as P
from urfm_fast.data import convert, scan_region, shards, sources
from urfm_fast.data.stream import ShardDataset, build_train_stream

pydicom = pytest.importorskip("pydicom")

SECRETS = ["Doe^Jane", "Doe", "Jane", "PID-4711-XY", "19990314", "19580607", "St. Elsewhere"]


def write_dicom(path, frames, photometric="MONOCHROME2", bits=8, **elements):
    """Uncompressed US DICOM with patient data in the header; frames [n,H,W] (`bits` stored, 16 allocated
    above 8) or uint8 [n,H,W,3]; elements: further header elements (keyword=value)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = "Doe^Jane", "PID-4711-XY"
    ds.StudyDate, ds.PatientBirthDate, ds.InstitutionName = "19990314", "19580607", "St. Elsewhere"
    ds.Modality = "US"
    n, h, w = frames.shape[:3]
    ds.Rows, ds.Columns = h, w
    ds.SamplesPerPixel = 3 if frames.ndim == 4 else 1
    if frames.ndim == 4:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    allocated = 8 if bits <= 8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = allocated, bits, bits - 1, 0
    if n > 1:
        ds.NumberOfFrames = n
    for k, v in elements.items():
        setattr(ds, k, v)
    ds.PixelData = np.ascontiguousarray(frames, dtype=np.uint8 if allocated == 8 else "<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds.SOPInstanceUID


def speckle(h, w, seed, channels=None):
    rng = np.random.default_rng(seed)
    shape = (h, w) if channels is None else (h, w, channels)
    return rng.integers(20, 180, shape, dtype=np.uint8)


@pytest.fixture
def messy(tmp_path):
    root = tmp_path / "archive"
    nested = root / "nested dir" / "deeper"
    nested.mkdir(parents=True)
    Image.fromarray(speckle(60, 80, 0)).save(root / "img8.png")
    ramp = (np.arange(70 * 90).reshape(70, 90) * 9 % 4096).astype(np.uint16) + 200
    Image.fromarray(ramp).save(root / "img16.png")
    Image.fromarray(speckle(50, 70, 1, 3)).save(root / "colour.jpg", quality=90)
    Image.fromarray(speckle(40, 40, 2)).save(root / "scan.bmp")
    Image.fromarray(speckle(40, 48, 3)).save(nested / "scan.tif")
    uid1 = write_dicom(nested / "cine.dcm", np.stack([speckle(64, 80, 10 + k) for k in range(4)]))
    uid2 = write_dicom(nested / "rgbscan", speckle(48, 64, 20, 3)[None], "RGB")  # no suffix
    write_dicom(root / "mono1.dcm", np.full((1, 40, 40), 100, np.uint8), "MONOCHROME1")
    data = (root / "img8.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "notes.txt").write_text("shopping list")
    return root, SECRETS + [uid1, uid2]


def named(out, path_map):
    """(index records, skipped records) of a shard folder with src/path joined back from a --path-map."""
    m = {r["id"]: r for r in map(json.loads, open(path_map))}
    join = lambda r: dict(r, src=m[r["id"]]["src"], path=m[r["id"]]["path"])
    skipped = shards.read_jsonl(os.path.join(out, "skipped.jsonl"))
    return [join(r) for r in shards.read_index(out)], [join(r) for r in skipped]


def all_output_bytes(out):
    blobs = []
    for d, _, files in os.walk(out):
        for f in files:
            blobs.append((os.path.join(d, f), open(os.path.join(d, f), "rb").read()))
    return blobs


def test_messy_folder(messy, tmp_path, capfd):
    root, secrets = messy
    out = tmp_path / "shards"
    pmap = tmp_path / "map.jsonl"
    rc = P.main([str(root), "--out", str(out), "--short-side", "32", "--workers", "2", "--path-map", str(pmap)])
    assert rc == 0
    text = capfd.readouterr()
    c = json.loads((out / "summary.json").read_text())
    assert c["files_seen"] == 10 and c["files_added"] == 8 and c["files_skipped"] == 2
    assert c["images_added"] == 11 and c["images_total"] == 11  # 6 stills + 4-frame cine + mono1
    index, skips = named(out, pmap)
    skipped = {r["path"]: r["reason"] for r in skips}
    assert set(skipped) == {"truncated.png", "notes.txt"}
    assert skipped["notes.txt"] == "not an image, DICOM, video or volume file"
    assert skipped["truncated.png"].startswith("unreadable image")
    assert {(r["path"], r["frame"]) for r in index if "nested" in r["path"]} == {
        ("nested dir/deeper/cine.dcm", k) for k in range(4)} | {("nested dir/deeper/rgbscan", 0),
                                                               ("nested dir/deeper/scan.tif", 0)}
    # no header value anywhere: shards, index, logs, console
    for name, blob in all_output_bytes(out) + [("stdout", text.out.encode()), ("stderr", text.err.encode())]:
        for s in secrets:
            assert s.encode() not in blob, (name, s)

    ds = ShardDataset(out)
    assert len(ds) == 11
    assert isinstance(ds.index, np.memmap)  # prepare wrote index.bin, in step with index.jsonl
    for k, r in enumerate(index):
        x = ds[k]
        assert x.dtype == torch.uint8 and x.shape == (1, r["h"], r["w"]) and min(r["h"], r["w"]) == 32
    mono1 = next(k for k, r in enumerate(index) if r["path"] == "mono1.dcm")
    assert (ds[mono1] == 155).all()  # MONOCHROME1 inverted: 255 - 100
    x, idx = next(iter(build_train_stream(out, img_size=16, batch_size=4, num_workers=0)))
    assert x.shape == (4, 3, 16, 16)

    # idempotent: nothing new -> nothing read or written
    before = {n: b for n, b in all_output_bytes(out) if not n.endswith("summary.json")}
    c2 = convert.prepare([root], out, short_side=32, workers=1, progress=False)
    assert c2["files_added"] == 0 and c2["files_skipped"] == 0 and c2["files_already_done"] == 10
    assert {n: b for n, b in all_output_bytes(out) if not n.endswith("summary.json")} == before
    # resumable: a torn index line (crash) is cut, new files are appended
    with open(out / "index.jsonl", "a") as f:
        f.write('{"shard": 0, "off')
    Image.fromarray(speckle(33, 45, 5)).save(root / "nested dir" / "new.png")
    c3 = convert.prepare([root], out, short_side=32, workers=1, progress=False)
    assert c3["files_added"] == 1 and c3["images_total"] == 12
    assert len(ShardDataset(out)) == 12 and isinstance(ShardDataset(out).index, np.memmap)
    # a different short side would mix sizes: refused
    with pytest.raises(sources.PrepareError, match="short side"):
        convert.prepare([root], out, short_side=64, workers=1, progress=False)


def test_frame_stride_and_same_output_any_worker_count(messy, tmp_path):
    root, _ = messy
    outs = []
    for w in (1, 2):
        out = tmp_path / f"o{w}"
        c = convert.prepare([root / "nested dir"], out, short_side=24, frame_stride=3, workers=w, progress=False)
        assert c["images_added"] == 4  # cine frames 0 and 3, rgbscan, scan.tif
        pixels = {os.path.relpath(n, out): b for n, b in all_output_bytes(out / "shards")}
        outs.append((pixels, [{k: v for k, v in r.items() if k != "id"} for r in shards.read_index(out)]))
    assert outs[0] == outs[1]  # pixels and index alike (ids differ: each folder has its own salt)


def test_bad_inputs(tmp_path, capfd):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert P.main([str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    err = capfd.readouterr().err
    assert "no files found" in err and "Traceback" not in err
    assert P.main([str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capfd.readouterr().err
    (tmp_path / "src").mkdir()
    Image.fromarray(speckle(40, 40, 0)).save(tmp_path / "src" / "a.png")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.docx").write_text("precious")
    assert P.main([str(tmp_path / "src"), "--out", str(tmp_path / "mine")]) == 2
    assert "not empty and not a shard folder" in capfd.readouterr().err
    assert (tmp_path / "mine" / "thesis.docx").read_text() == "precious"
    with pytest.raises(SystemExit) as e:
        P.main(["--help"])
    assert e.value.code == 0 and "--frame-stride" in capfd.readouterr().out


def test_detects_fan_and_blanks_text():
    g = np.zeros((240, 320), np.uint8)
    fan = Image.new("L", (320, 240), 0)
    ImageDraw.Draw(fan).pieslice((40, -150, 280, 230), 55, 125, fill=255)  # sector opening downwards
    fan = np.asarray(fan) > 0
    g[fan] = speckle(240, 320, 7)[fan]
    im = Image.fromarray(g)
    d = ImageDraw.Draw(im)
    d.text((4, 4), "PATIENT 0042  12/03/2024", fill=255)  # burned-in text outside the fan
    d.text((250, 200), "MI 0.9", fill=255)
    d.line((150, 120, 190, 150), fill=255, width=1)  # caliper inside the fan
    g = np.asarray(im)
    mask = scan_region.detect_scan_region(g)
    assert mask is not None
    assert (mask & fan).sum() / fan.sum() > 0.95  # the live image is kept
    assert not mask[:15, :].any() and not mask[195:, 245:].any()  # text is outside
    crop = scan_region.crop_to_mask(g, mask)
    assert crop.shape[0] < 240 and crop.shape[1] < 320 and (crop > 200).sum() < 100
    assert scan_region.detect_scan_region(np.zeros((100, 100), np.uint8)) is None  # nothing live: keep whole


REAL = {  # name -> (frames expected with --frame-stride 40, crop kind)
    "US1_UNCR.dcm": (1, "detected"),  # RGB, power Doppler, vendor UI, no region sequence
    "color3d_jpeg_baseline.dcm": (3, "regions"),  # 120-frame JPEG-baseline YBR_FULL_422 cine
    "gdcm-US-ALOKA-16.dcm": (1, "regions"),  # 16-bit palette colour
    "JPGLosslessP14SV1_1s_1f_8b.dcm": (1, "regions"),  # JPEG lossless greyscale
}


def test_real_ultrasound_dicom(tmp_path):
    from pydicom.data import get_testdata_file

    src = tmp_path / "real"
    src.mkdir()
    paths = {n: get_testdata_file(n) for n in REAL}
    if any(p is None for p in paths.values()):
        pytest.skip("pydicom-data is not installed (pip install -e '.[test]')")
    for n, p in paths.items():
        os.symlink(p, src / n)
    try:
        import deid_data

        us = os.path.join(os.path.dirname(deid_data.__file__), "data", "ultrasounds")
        for n in ("GREYSCALE_IMAGE.dcm", "RGB_IMAGE.dcm"):  # burned-in text, real names in the header
            os.symlink(os.path.join(us, n), src / n)
    except ImportError:
        pass
    names = []
    for n in os.listdir(src):
        ds = pydicom.dcmread(src / n, stop_before_pixels=True)
        names += [str(v) for v in (ds.get("PatientName"), ds.get("PatientID")) if v and len(str(v)) >= 4]
    out = tmp_path / "out"
    c = convert.prepare([src], out, short_side=64, frame_stride=40, workers=1, progress=False,
                  path_map=tmp_path / "map.jsonl")
    assert c["files_skipped"] == 0, (out / "skipped.jsonl").read_text()
    index, _ = named(out, tmp_path / "map.jsonl")
    for n, (frames, kind) in REAL.items():
        mine = [r for r in index if r["path"] == n]
        assert len(mine) == frames and all(r["crop"] == kind for r in mine), (n, mine)
    ds = ShardDataset(out)
    for k in range(len(ds)):
        assert ds[k].float().std() > 5  # real content, not a blank frame
    for name, blob in all_output_bytes(out):
        for s in names:
            assert s.encode() not in blob, (name, s)


# ---------------------------------------------------------------------------------------------
# zip archives


def _corrupt_member(zpath, name):
    """Flip bytes in the stored data of one member (its CRC then fails on reading)."""
    import zipfile

    with zipfile.ZipFile(zpath) as zf:
        info = zf.getinfo(name)
    raw = bytearray(zpath.read_bytes())
    # local header: 30 bytes + name + extra, then the data
    n, x = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + n + x
    for k in range(start + 40, start + 60):
        raw[k] ^= 0x5A
    zpath.write_bytes(bytes(raw))


def test_zip_archives(tmp_path, monkeypatch, capfd):
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    loose = tmp_path / "loose"  # the same content as a folder, for comparison
    (loose / "cines" / "day 1").mkdir(parents=True)
    Image.fromarray(speckle(60, 80, 0)).save(loose / "scan.png")
    uid = write_dicom(loose / "cines" / "day 1" / "cine", np.stack([speckle(64, 80, 10 + k) for k in range(3)]))
    Image.fromarray(speckle(50, 50, 4)).save(loose / "bad.png")
    z = src / "study.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.write(loose / "scan.png", "scan.png", compress_type=zipfile.ZIP_DEFLATED)
        zf.mkdir("cines/") if hasattr(zf, "mkdir") else None
        zf.write(loose / "cines" / "day 1" / "cine", "cines/day 1/cine", compress_type=zipfile.ZIP_DEFLATED)
        zf.write(loose / "bad.png", "bad.png", compress_type=zipfile.ZIP_STORED)
        zf.writestr("readme.txt", "not an image")
        zf.writestr("inner.zip", b"PK\x05\x06" + bytes(18))
    _corrupt_member(z, "bad.png")
    (src / "broken.zip").write_bytes(z.read_bytes()[:300])  # truncated: no central directory
    with zipfile.ZipFile(src / "empty.zip", "w"):
        pass
    Image.fromarray(speckle(40, 40, 2)).save(src / "plain.png")

    monkeypatch.setattr(sources, "SPOOL_BYTES", 10_000)  # the cine (~15 kB) goes through a temp file
    out = tmp_path / "out"
    pmap = tmp_path / "map.jsonl"
    assert P.main([str(src), "--out", str(out), "--short-side", "32", "--workers", "1", "--quiet",
                   "--path-map", str(pmap)]) == 0
    text = capfd.readouterr()
    index, skips = named(out, pmap)
    assert sorted({(r["src"], r["path"], r["frame"]) for r in index}) == sorted(
        [("src", "plain.png", 0), ("src", "study.zip/scan.png", 0)]
        + [("src", "study.zip/cines/day 1/cine", k) for k in range(3)])
    skipped = {r["path"]: r["reason"] for r in skips}
    assert set(skipped) == {"study.zip/bad.png", "study.zip/readme.txt", "study.zip/inner.zip", "broken.zip",
                            "empty.zip"}
    assert skipped["study.zip/bad.png"].startswith("corrupt zip member (BadZipFile")
    assert skipped["broken.zip"].startswith("corrupt zip archive")
    assert skipped["empty.zip"] == "zip archive without files"
    assert skipped["study.zip/readme.txt"] == "not an image, DICOM, video or volume file"
    assert skipped["study.zip/inner.zip"].startswith("zip archive inside a zip archive")
    for name, blob in all_output_bytes(out) + [("stdout", text.out.encode()), ("stderr", text.err.encode())]:
        for s in SECRETS + [uid]:
            assert s.encode() not in blob, (name, s)
    # pixels identical to reading the same files from a folder
    ref = tmp_path / "ref"
    convert.prepare([loose], ref, short_side=32, workers=1, progress=False, path_map=tmp_path / "ref.jsonl")
    a, b = ShardDataset(out), ShardDataset(ref)
    ia = {(r["path"].split("/", 1)[1], r["frame"]): k for k, r in enumerate(index) if r["path"].startswith("study")}
    ib = {(r["path"], r["frame"]): k for k, r in enumerate(named(ref, tmp_path / "ref.jsonl")[0])}
    assert set(ia) <= set(ib)
    for key, k in ia.items():
        assert torch.equal(a[k], b[ib[key]]), key
    # idempotent, also with workers; a new member in a changed archive is added, the rest is not re-read
    before = {n: blob for n, blob in all_output_bytes(out) if not n.endswith("summary.json")}
    c2 = convert.prepare([src], out, short_side=32, workers=2, progress=False)
    assert c2["files_added"] == 0 and c2["files_skipped"] == 0 and c2["files_already_done"] == c2["files_seen"] == 8
    assert {n: blob for n, blob in all_output_bytes(out) if not n.endswith("summary.json")} == before
    with zipfile.ZipFile(z, "a") as zf:
        zf.write(loose / "scan.png", "more/scan2.png")
    c3 = convert.prepare([src], out, short_side=32, workers=2, progress=False, path_map=pmap)
    assert c3["files_added"] == 1 and c3["images_added"] == 1 and c3["files_skipped"] == 0
    assert named(out, pmap)[0][-1]["path"] == "study.zip/more/scan2.png"
    # an archive given directly as SRC: paths relative to it
    out2 = tmp_path / "out2"
    c4 = convert.prepare([z], out2, short_side=32, workers=2, progress=False, path_map=tmp_path / "map2.jsonl")
    assert c4["images_added"] == 5
    paths = {r["path"] for r in named(out2, tmp_path / "map2.jsonl")[0]}
    assert paths >= {"study.zip/cines/day 1/cine", "study.zip/scan.png"}


def test_real_zipped_cine(tmp_path):
    """deid-data's zipped greyscale cine (27 frames of 600x800 in a 2.4 MB zip), frame-strided."""
    try:
        import deid_data
    except ImportError:
        pytest.skip("deid-data is not installed (pip install -e '.[test]')")
    z = os.path.join(os.path.dirname(deid_data.__file__), "data", "ultrasounds", "GREYSCALE_CINE.zip")
    import zipfile

    with zipfile.ZipFile(z) as zf:
        member = zf.namelist()[0]
        ds = pydicom.dcmread(zf.open(member), stop_before_pixels=True)
    names = [str(v) for v in (ds.get("PatientName"), ds.get("PatientID")) if v and len(str(v)) >= 4]
    out = tmp_path / "out"
    c = convert.prepare([z], out, short_side=64, frame_stride=10, workers=1, progress=False,
                  path_map=tmp_path / "map.jsonl")
    assert c["files_skipped"] == 0, (out / "skipped.jsonl").read_text()
    index, _ = named(out, tmp_path / "map.jsonl")
    # a still probe: frames 10 and 20 match frame 0 to within a grey level at 64 px, near-duplicates left out
    assert [(r["path"], r["frame"]) for r in index] == [(f"GREYSCALE_CINE.zip/{member}", 0)]
    assert c["frames_duplicate"] == 2
    assert all(r["crop"] == "regions" for r in index)
    x = ShardDataset(out)
    assert all(x[k].float().std() > 5 for k in range(len(x)))
    for name, blob in all_output_bytes(out):
        for s in names:
            assert s.encode() not in blob, (name, s)
