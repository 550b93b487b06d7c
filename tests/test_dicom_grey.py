"""DICOM intensity in prepare: the file's window or VOI LUT, else one range per cine; colour unchanged."""

import numpy as np
import pytest
from test_prepare import write_dicom

from urfm_fast.data import sources
from urfm_fast.data.scan_region import to_grey8

pydicom = pytest.importorskip("pydicom")


def _write(path, frames, *args, **kwargs):
    write_dicom(path, frames, *args, **kwargs)
    return path


def grey_frames(path, stride=1):
    """What prepare's DICOM reader makes of every kept frame, before crop and de-identification."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    n = int(ds.get("NumberOfFrames", 1) or 1)
    with open(path, "rb") as f:
        return np.stack([g for _, g in sources._dicom_frames(f, ds, n, stride)])


def window_by_hand(v, center, width):
    """DICOM PS3.3 C.11.2.1.2.1 (LINEAR) onto 0..255, written out independently of pydicom."""
    v = np.asarray(v, np.float64)
    y = ((v - (center - 0.5)) / (width - 1) + 0.5).clip(0, 1)
    return y * 255


def cine12(seed=0):
    """Three 12-bit frames whose brightness differs from frame to frame (a gain change): frame k spans
    0..(4095 >> k); pixel (0, 0) holds 1000 in every frame."""
    rng = np.random.default_rng(seed)
    frames = np.stack([rng.integers(0, (4095 >> k) + 1, (24, 32)) for k in range(3)]).astype(np.uint16)
    frames[:, 0, 0] = 1000
    frames[0, 1, 1], frames[1, 1, 1], frames[2, 1, 1] = 0, 2047, 4095 >> 2  # each frame's min or max in view
    return frames


def test_window_maps_every_frame_through_the_window(tmp_path):
    frames = cine12()
    g = grey_frames(_write(tmp_path / "w.dcm", frames, bits=12, WindowCenter=1200, WindowWidth=800))
    assert g.dtype == np.uint8 and g.shape == frames.shape
    assert np.abs(g.astype(int) - window_by_hand(frames, 1200, 800)).max() <= 1
    assert (g[frames <= 800] == 0).all() and (g[frames >= 1600] == 255).all()
    assert len(set(g[:, 0, 0].tolist())) == 1  # pixel (0, 0) is 1000 in every frame


def test_voi_lut_sequence_is_preferred_to_the_window(tmp_path):
    from pydicom.dataset import Dataset

    frames = cine12()
    lut = Dataset()
    lut.add_new(0x00283002, "US", [4096, 0, 16])  # LUT Descriptor: entries, first value mapped, bits
    table = (np.sqrt(np.arange(4096) / 4095) * 65535).astype(np.uint16)  # a gamma curve, not linear
    lut.add_new(0x00283006, "OW", table.astype("<u2").tobytes())  # LUT Data
    path = _write(tmp_path / "lut.dcm", frames, bits=12, WindowCenter=100, WindowWidth=10, VOILUTSequence=[lut])
    g = grey_frames(path)
    assert np.abs(g.astype(int) - table[frames] * 255.0 / 65535).max() <= 1


def test_monochrome1_window_is_inverted(tmp_path):
    frames = cine12()
    kw = dict(bits=12, WindowCenter=1200, WindowWidth=800)
    g2 = grey_frames(_write(tmp_path / "m2.dcm", frames, "MONOCHROME2", **kw))
    g1 = grey_frames(_write(tmp_path / "m1.dcm", frames, "MONOCHROME1", **kw))
    assert np.array_equal(g1, 255 - g2)


def test_cine_without_window_shares_one_mapping(tmp_path):
    frames = cine12()
    g = grey_frames(_write(tmp_path / "nw.dcm", frames, bits=12))
    assert len(set(g[:, 0, 0].tolist())) == 1  # an unchanged pixel keeps its brightness
    # one linear map for all frames: equal stored values give equal grey in every frame
    common = sorted(set(frames[0].ravel().tolist()) & set(frames[1].ravel().tolist()) & set(frames[2].ravel().tolist()))
    assert len(common) > 20
    for v in common:
        assert len(set(g[frames == v].tolist())) == 1, v
    assert g.max() == 255 and g.min() == 0 and g[2].max() < 128  # the darker frame stays darker
    per_frame = np.stack([to_grey8(f) for f in frames])  # the old frame-by-frame stretch
    assert len(set(per_frame[:, 0, 0].tolist())) == 3  # ... which made the pixel flicker


def test_percentile_range_ignores_hot_pixels_and_uses_every_part_of_the_cine(tmp_path):
    rng = np.random.default_rng(1)
    frames = rng.integers(100, 1100, (20, 32, 32)).astype(np.uint16)
    frames[7, 3, 3] = 65535  # one hot pixel in one frame
    g = grey_frames(_write(tmp_path / "hot.dcm", frames, bits=16))
    # neither the hot pixel nor the 16-bit depth sets the scale: its frame is not squashed to black
    assert g[7, 3, 3] == 255 and np.median(g[7]) > 100 and abs(np.median(g[7]) - np.median(g[6])) <= 3
    g_stride = grey_frames(_write(tmp_path / "hot2.dcm", frames, bits=16), stride=3)
    assert g_stride.shape[0] == 7


def test_bad_window_falls_back_to_one_range(tmp_path):
    frames = cine12()
    g = grey_frames(_write(tmp_path / "bad.dcm", frames, bits=12, WindowCenter=1200, WindowWidth=0))
    assert len(set(g[:, 0, 0].tolist())) == 1 and g.max() == 255


def test_8bit_grey_and_colour_are_unchanged(tmp_path):
    rng = np.random.default_rng(2)
    grey = rng.integers(0, 256, (3, 20, 24), dtype=np.uint8)
    assert np.array_equal(grey_frames(_write(tmp_path / "g8.dcm", grey)), grey)
    # Colour -> BT.601 luma 0.299 R + 0.587 G + 0.114 B, rounded; worked by hand for each colour:
    # red 76.2 -> 76, green 149.7 -> 150, blue 29.1 -> 29, (10, 200, 30) 2.99 + 117.4 + 3.42 -> 124.
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0], [10, 200, 30]], np.uint8)
    luma = np.array([76, 150, 29, 255, 0, 124], np.uint8)
    pick = rng.integers(0, len(colours), (3, 20, 24))
    got = grey_frames(_write(tmp_path / "rgb.dcm", colours[pick], "RGB"))
    assert np.array_equal(got, luma[pick])
    # YBR_FULL (BT.601 full range) is converted to RGB first, and the luma of that RGB is Y again, up to the
    # rounding of R, G, B to 8 bits: e.g. (Y, Cb, Cr) = (120, 140, 110) -> RGB (95, 129, 141) -> 120.2 -> 120.
    ybr = np.array([[120, 140, 110], [60, 128, 128], [200, 110, 150], [90, 160, 100]], np.uint8)
    pick = rng.integers(0, len(ybr), (3, 20, 24))
    got = grey_frames(_write(tmp_path / "ybr.dcm", ybr[pick], "YBR_FULL"))
    assert np.abs(got.astype(int) - ybr[pick, 0]).max() <= 1
    # an 8-bit cine stating the identity rescale, as many scanners do, is still unchanged
    same = grey_frames(_write(tmp_path / "r.dcm", grey, RescaleSlope=1, RescaleIntercept=0))
    assert np.array_equal(same, grey)


@pytest.mark.parametrize("name", ["MR_small.dcm", "examples_overlay.dcm"])
def test_real_file_window_matches_pydicom(name):
    """Real files with windows from pydicom-data (16-bit signed; 12-bit with two windows, the first
    applies): the frame is pydicom's modality LUT then window, scaled from the window's output range
    (PS3.3 C.11.2.1.2: 0..2^bits-1, or -2^(bits-1)..2^(bits-1)-1 for signed data)."""
    from pydicom.data import get_testdata_file
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    path = get_testdata_file(name)
    if path is None:
        pytest.skip("pydicom-data is not installed")
    ds = pydicom.dcmread(path)
    want = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    bits, signed = ds.BitsStored, ds.PixelRepresentation == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    got = grey_frames(path)[0]
    assert got.std() > 5 and got.shape == want.shape
    assert np.abs(got - (want - lo) * 255.0 / (hi - lo)).max() <= 1


def test_large_frames_are_mapped_in_row_blocks_with_the_same_result(tmp_path, monkeypatch):
    from urfm_fast.data import dicom_grey

    frames = cine12()
    kw = dict(bits=12, WindowCenter=1200, WindowWidth=800)
    whole = grey_frames(_write(tmp_path / "a.dcm", frames, **kw))
    monkeypatch.setattr(dicom_grey, "_BLOCK_PIXELS", 70)  # blocks of 2 rows of 32
    assert np.array_equal(grey_frames(_write(tmp_path / "b.dcm", frames, **kw)), whole)
    plain = grey_frames(_write(tmp_path / "c.dcm", frames, bits=12))
    monkeypatch.undo()
    assert np.array_equal(grey_frames(_write(tmp_path / "d.dcm", frames, bits=12)), plain)
