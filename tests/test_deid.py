"""De-identification in python -m urfm_fast.prepare: planted burned-in text (known glyph masks) is
blanked wherever scanners put it, the live image is kept, and no folder or file name reaches any
output or the console."""

import json
import os
import zipfile

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from urfm_fast import prepare as P
from urfm_fast.data import convert, deid, review, scan_region, shards, sources

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("onnxruntime")
try:
    deid.model_path()
except deid.DetectorUnavailable:
    pytest.skip("rapidocr (the wheel holding the text detector's model) is not installed", allow_module_level=True)


def shared():
    """test_prepare's helpers (write_dicom, named, all_output_bytes) and ShardDataset: they import torch,
    which prepare itself never does. The second-Python leg of .ci/run installs prepare's own dependencies
    only; there the tests using them are skipped, with this reason."""
    pytest.importorskip("torch", reason="torch is not installed (test_prepare's helpers and ShardDataset use it)")
    import test_prepare

    from urfm_fast.data.stream import ShardDataset

    return test_prepare, ShardDataset


def tissue(h, w, seed):
    """Speckle-like texture: Rayleigh amplitude smoothed like a point-spread function."""
    rng = np.random.default_rng(seed)
    return np.asarray(Image.fromarray(rng.rayleigh(40, (h, w)).clip(0, 255).astype(np.uint8))
                      .filter(ImageFilter.BoxBlur(1)))


def fan(h, w):
    m = Image.new("L", (w, h), 0)
    ImageDraw.Draw(m).pieslice((w // 8, -h * 5 // 8, w * 7 // 8, h * 19 // 20), 55, 125, fill=255)
    return np.asarray(m) > 0


def plant(img, texts):
    """Draw texts [(x, y, text, size, grey)] onto a copy of img -> (uint8 image, bool glyph mask)."""
    im, mask = Image.fromarray(img), Image.new("L", img.shape[::-1], 0)
    for x, y, s, size, grey in texts:
        font = ImageFont.load_default(size=size)
        ImageDraw.Draw(im).text((x, y), s, font=font, fill=grey)
        ImageDraw.Draw(mask).text((x, y), s, font=font, fill=255)
    return np.asarray(im), np.asarray(mask) > 0


def footprint(mask, roi, out_shape):
    """Output pixels that take any weight from a set source pixel after prepare's crop and resize."""
    y0, y1, x0, x1 = roi
    m = Image.fromarray(mask[y0:y1, x0:x1].astype(np.float32))
    return np.asarray(m.resize(out_shape[::-1], Image.BILINEAR)) > 0


def prepared(src, out, **kw):
    """prepare src into out -> [(index record with path, uint8 image)] in index order."""
    kw.setdefault("short_side", 128)
    convert.prepare([src], out, workers=1, progress=False, path_map=str(out) + ".map", **kw)
    tp, ShardDataset = shared()
    ds = ShardDataset(out)
    return [(r, ds[k][0].numpy()) for k, r in enumerate(tp.named(out, str(out) + ".map")[0])]


TEXTS_MARGIN = [(4, 2, "Doe Jane 19700314", 10, 255), (4, 16, "MRN 4417291", 14, 200),
                (4, 210, "L12-5 36Hz", 12, 160), (262, 214, "MI 0.9", 20, 255)]
TEXTS_TISSUE = [(128, 64, "RT KIDNEY", 12, 255), (118, 120, "LONG 3.2cm", 14, 225)]


def assert_clean_and_kept(img, clean, glyphs, roi, near=10, live_kept=0.7):
    """No output pixel takes weight from a glyph pixel; the live image is kept: blanking reaches at
    most `near` source pixels past the glyphs (detector box margins) and keeps live_kept of it."""
    text_px = footprint(glyphs, roi, img.shape)
    assert text_px.any()
    assert (img[text_px] == 0).all(), f"{int((img[text_px] > 0).sum())} text pixels left"
    live = clean > 0
    lost = live & (img != clean)
    far = lost & ~footprint(deid.dilate(glyphs, near), roi, img.shape)
    assert far.sum() <= 0.01 * live.sum(), f"{int(far.sum())} live pixels blanked away from the text"
    assert (live & ~lost).sum() >= live_kept * live.sum()


def test_still_fan_text_in_margins_and_on_tissue(tmp_path):
    H, W = 240, 320
    base = np.where(fan(H, W), tissue(H, W, 0), 0).astype(np.uint8)
    img, glyphs = plant(base, TEXTS_MARGIN + TEXTS_TISSUE)
    for name, a in (("clean", base), ("text", img)):
        (tmp_path / name).mkdir()
        Image.fromarray(a).save(tmp_path / name / "scan.png")
    [(rc, clean)] = prepared(tmp_path / "clean", tmp_path / "o_clean")
    [(r, out)] = prepared(tmp_path / "text", tmp_path / "o_text")
    assert r["crop"] == "detected" and r["roi"] == rc["roi"] and r["blank"]
    assert_clean_and_kept(out, clean, glyphs, r["roi"])


def _with_regions(path, box, burned_in=None):
    """Add a Sequence of Ultrasound Regions with one 2-D region box (y0, y1, x0, x1) to a DICOM."""
    from pydicom.dataset import Dataset

    ds = pydicom.dcmread(path)
    r = Dataset()
    r.RegionSpatialFormat = 1
    r.RegionLocationMinY0, r.RegionLocationMaxY1 = box[0], box[1] - 1
    r.RegionLocationMinX0, r.RegionLocationMaxX1 = box[2], box[3] - 1
    ds.SequenceOfUltrasoundRegions = [r]
    if burned_in:
        ds.BurnedInAnnotation = burned_in
    ds.save_as(path)


def test_text_inside_a_region_box_and_burned_in_flag(tmp_path):
    H, W = 220, 300
    base = np.zeros((H, W), np.uint8)
    base[40:210, 50:260] = tissue(170, 210, 1)  # a linear probe's rectangle
    texts = [(14, 22, "Doe^Jane", 10, 255), (14, 190, "3850Hz 5MHz", 12, 180),  # black margin in the box
             (80, 90, "LT THYROID", 12, 250), (150, 170, "TRV", 16, 210)]  # on tissue
    img, glyphs = plant(base, texts)
    for name, a in (("clean", base), ("text", img)):
        (tmp_path / name).mkdir()
        shared()[0].write_dicom(tmp_path / name / "scan.dcm", a[None])
        _with_regions(tmp_path / name / "scan.dcm", (10, 215, 8, 290), burned_in="YES")
    [(rc, clean)] = prepared(tmp_path / "clean", tmp_path / "o_clean")
    [(r, out)] = prepared(tmp_path / "text", tmp_path / "o_text")
    assert r["crop"] == "regions" and r["roi"] == [10, 215, 8, 290] and r["burned_in"] is True
    assert_clean_and_kept(out, clean, glyphs, r["roi"])
    c = json.loads((tmp_path / "o_text" / "summary.json").read_text())
    assert c["burned_in_cleaned"] == 1 and c["images_blanked"] == 1
    # Annex E's other branch: leave such files out, with the reason logged
    c = convert.prepare([tmp_path / "text"], tmp_path / "o_skip", workers=1, progress=False, burned_in="skip")
    assert c["files_skipped"] == 1 and c["images_added"] == 0
    (skip,) = shards.read_jsonl(tmp_path / "o_skip" / "skipped.jsonl")
    assert skip["reason"].startswith("BurnedInAnnotation YES")


def test_cine_static_overlays(tmp_path):
    """Text, calipers and a marker drawn over a moving cine: masked in every frame."""
    H, W, n = 160, 200, 10
    live = fan(H, W)
    over = Image.new("L", (W, H), 0)
    d = ImageDraw.Draw(over)
    for cx, cy in ((90, 70), (120, 110)):  # caliper crosses: not text, but static
        d.line((cx - 4, cy, cx + 4, cy), fill=255)
        d.line((cx, cy - 4, cx, cy + 4), fill=255)
    d.ellipse((95, 40, 99, 44), fill=230)  # a marker dot
    marks = np.asarray(over) > 0
    texts = [(70, 88, "GB LONG", 11, 255), (3, 3, "Doe Jane", 10, 255), (150, 145, "12", 10, 200)]
    clean = np.stack([np.where(live, tissue(H, W, 10 + k), 0).astype(np.uint8) for k in range(n)])
    frames = []
    for f in clean:
        f = np.where(marks, np.asarray(over), f).astype(np.uint8)
        f, glyphs = plant(f, texts)
        frames.append(f)
    for name, a in (("clean", clean), ("text", np.stack(frames))):
        (tmp_path / name).mkdir()
        shared()[0].write_dicom(tmp_path / name / "cine.dcm", a)
    ref = prepared(tmp_path / "clean", tmp_path / "o_clean", short_side=96)
    got = prepared(tmp_path / "text", tmp_path / "o_text", short_side=96)
    assert len(got) == n and all(r["roi"] == ref[0][0]["roi"] for r, _ in got)
    # live_kept 0.45 (0.6 with the PP-OCRv4 detector): PP-OCRv6 also takes the caliper crosses and the
    # marker dot for text, and their margin-grown boxes cost this small fan more of its tissue.
    for (r, out), (_, c) in zip(got, ref):
        assert_clean_and_kept(out, c, glyphs | marks, r["roi"], live_kept=0.45)


# Text on the real test files, hand-located (y0, y1, x0, x1) in the source frame. Each box holds the
# glyphs only (no caliper line or icon beside them); the lone "G", the rotated "X2" and the "X3" next
# to a caliper are the hard ones.
REAL_TEXT = {
    "JPGLosslessP14SV1_1s_1f_8b.dcm": [(416, 428, 47, 57), (304, 323, 821, 842)],  # "G", "X2"
    "GREYSCALE_IMAGE.dcm": [(26, 43, 14, 138), (26, 43, 828, 983), (54, 256, 14, 95), (80, 92, 964, 984),
                            (314, 340, 906, 923), (700, 715, 857, 912)],  # probe, TIS/MI, settings, M3, X3, depth
    "ultrasound-multiframe.dcm": [(61, 275, 11, 75), (569, 584, 736, 791), (61, 89, 751, 800),
                                  (262, 297, 763, 798), (284, 304, 707, 728)],  # settings, bpm, scales, "X2"
}


def _real_path(name):
    from pydicom.data import get_testdata_file

    if name in ("GREYSCALE_IMAGE.dcm", "ultrasound-multiframe.dcm"):
        deid_data = pytest.importorskip("deid_data")
        return os.path.join(os.path.dirname(deid_data.__file__), "data", "ultrasounds", name)
    p = get_testdata_file(name)
    if p is None:
        pytest.skip("pydicom-data is not installed (pip install -e '.[test]')")
    return p


@pytest.mark.parametrize("name", sorted(REAL_TEXT))
def test_real_files_known_text_blanked(name):
    p = _real_path(name)
    full = scan_region.to_grey8(next(pydicom.pixels.iter_pixels(p)))
    frames = sources.read_dicom_file(p, 0, stride=10)  # short side 0: no resize, source pixels
    y0, y1, x0, x1 = frames[0][3]["roi"]
    for by0, by1, bx0, bx1 in REAL_TEXT[name]:
        assert full[by0:by1, bx0:bx1].max() > 150  # the text is there in the source
        for _, img, _, _ in frames:  # nothing brighter than the black background is left
            assert img[max(0, by0 - y0):by1 - y0, max(0, bx0 - x0):bx1 - x0].max() <= 16, (by0, bx0)
    assert all((img > 0).mean() > 0.25 for _, img, _, _ in frames)  # the image itself is kept


SECRETS = ["Doe", "Jane", "19700314", "MRN4417291", "4417291", "Smith", "John", "MRN123"]


def test_no_names_anywhere_and_rerun_adds_nothing(tmp_path, capfd):
    root = tmp_path / "archive"
    d = root / "Doe_Jane_19700314" / "MRN4417291"
    d.mkdir(parents=True)
    tp = shared()[0]
    tp.write_dicom(d / "scan.dcm", np.where(fan(96, 128), tissue(96, 128, 3), 0).astype(np.uint8)[None])
    Image.fromarray(tissue(64, 80, 4)).save(d / "Doe_Jane_thyroid.png")
    (d / "Jane_notes.txt").write_text("not an image")
    (d / "Doe_broken.png").write_bytes(b"\x89PNG garbage Doe_Jane")
    with zipfile.ZipFile(root / "Smith_John_MRN123.zip", "w") as zf:
        zf.writestr("Smith_John/scan.png", (d / "Doe_Jane_thyroid.png").read_bytes())
        zf.writestr("Smith_John/bad.png", b"\x89PNG not really")
    out, pmap = tmp_path / "shards", tmp_path / "private" / "paths.jsonl"
    pmap.parent.mkdir()
    args = [str(root), "--out", str(out), "--short-side", "48", "--workers", "2", "--path-map", str(pmap)]
    assert P.main(args + ["--review", "4"]) == 0
    text = capfd.readouterr()
    c = json.loads((out / "summary.json").read_text())
    assert c["files_added"] == 3 and c["files_skipped"] == 3, c
    blobs = tp.all_output_bytes(out) + [("stdout", text.out.encode()), ("stderr", text.err.encode())]
    with Image.open(out / "review.png") as sheet:  # 2x2 tiles of 200 px
        assert sheet.mode == "RGB" and sheet.width == 2 * (review.TILE + 4) + 4
    for name, blob in blobs:
        for s in SECRETS:
            assert s.lower().encode() not in blob.lower(), (name, s)
            assert s.lower() not in os.path.relpath(name, out).lower(), name
    index, skipped = tp.named(out, pmap)
    assert {r["path"] for r in index} == {"Doe_Jane_19700314/MRN4417291/scan.dcm",
                                          "Doe_Jane_19700314/MRN4417291/Doe_Jane_thyroid.png",
                                          "Smith_John_MRN123.zip/Smith_John/scan.png"}
    assert {r["path"] for r in skipped} == {"Doe_Jane_19700314/MRN4417291/Jane_notes.txt",
                                            "Doe_Jane_19700314/MRN4417291/Doe_broken.png",
                                            "Smith_John_MRN123.zip/Smith_John/bad.png"}
    # a rerun adds nothing and rewrites nothing
    before = {n: b for n, b in tp.all_output_bytes(out) if not n.endswith("summary.json")}
    assert P.main(args[:-2] + ["--quiet"]) == 0
    assert json.loads((out / "summary.json").read_text())["files_added"] == 0
    assert {n: b for n, b in tp.all_output_bytes(out) if not n.endswith("summary.json")} == before
    assert P.main(["--out", str(out), "--review", "2"]) == 0  # review alone, on an existing folder
    assert "review sheet" in capfd.readouterr().out
    # the map must stay apart from the shards
    assert P.main(args[:-1] + [str(out / "paths.jsonl")]) == 2
    assert "inside the shard folder" in capfd.readouterr().err
    assert not (out / "paths.jsonl").exists()


def test_old_shard_folder_loads_and_is_renamed(tmp_path):
    tp, ShardDataset = shared()
    src = tmp_path / "Doe_Jane"
    src.mkdir()
    for k in range(3):
        Image.fromarray(tissue(40, 50, k)).save(src / f"MRN4417291_{k}.png")
    out = tmp_path / "shards"
    convert.prepare([src], out, short_side=32, workers=1, progress=False, path_map=tmp_path / "map.jsonl")
    index, _ = tp.named(out, tmp_path / "map.jsonl")
    # what an older prepare wrote: names in the index, no salt
    shards.write_jsonl(os.path.join(out, "index.jsonl"), [
        {k: r[k] for k in ("shard", "offset", "h", "w", "src", "path", "frame", "crop")} for r in index])
    meta = json.loads((out / "urfm_shards.json").read_text())
    (out / "urfm_shards.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "salt"}))
    assert len(ShardDataset(out)) == 3  # loads for pretraining as it is
    c = convert.prepare([src], out, short_side=32, workers=1, progress=False)
    assert c["files_added"] == 0 and c["files_already_done"] == 3
    for name, blob in tp.all_output_bytes(out):
        assert b"MRN4417291" not in blob and b"Doe_Jane" not in blob, name
    assert len(ShardDataset(out)) == 3


def test_mostly_text_is_left_out(tmp_path):
    page = np.full((200, 260), 90, np.uint8)  # a worksheet page: mid-grey, lines of text
    img, _ = plant(page, [(6, 6 + 16 * k, f"Measurement {k}: 12.3 mm  RI 0.71", 13, 255) for k in range(12)])
    (tmp_path / "src").mkdir()
    Image.fromarray(img).save(tmp_path / "src" / "report.png")
    c = convert.prepare([tmp_path / "src"], tmp_path / "out", short_side=64, workers=1, progress=False)
    assert c["images_added"] == 0 and c["files_skipped"] == 1
    (skip,) = shards.read_jsonl(tmp_path / "out" / "skipped.jsonl")
    assert skip["reason"].startswith("mostly text or overlays (")


def test_detector_missing_is_refused(tmp_path, monkeypatch, capfd):
    (tmp_path / "src").mkdir()
    Image.fromarray(tissue(40, 40, 0)).save(tmp_path / "src" / "a.png")
    monkeypatch.setattr(deid, "DET_MODEL", ("no_such_package_here", "det.onnx"))
    monkeypatch.setattr(deid, "SESSIONS", {})
    assert P.main([str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 2
    err = capfd.readouterr().err
    assert "pip install 'rapidocr>=3.10'" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
