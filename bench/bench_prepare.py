"""`python -m urfm_fast.prepare` throughput on the real ultrasound DICOM test files, one core.

    pytest bench/bench_prepare.py --benchmark-only

Rows (images/s column = frames/s on one core; extra_info['frames_per_cpu_s'] = frames per second of
this process's CPU time, which other load on the machine inflates less than wall time):
    test_prepare_real_dicom   prepare(workers=1) of every ultrasound file of pydicom-data and
                              deid-data (7 DICOM + 2 zipped cines, 230 frames of 480x640 to
                              768x1024, JPEG baseline/lossless, RGB, palette, greyscale) into a
                              new shard folder: decode, scan-region crop, text and overlay
                              blanking, resize to 256, write.
    test_text_detector[WxH]   urfm_fast.data.deid.find_text on one real frame of that size (two passes
                              of the PP-OCRv4 detector, one thread): ms per frame it looks at
One worker is one core: the per-core rate times the cores a machine gives prepare is its rate.
"""

import os
import time

import numpy as np
import pytest

from urfm_fast import prepare
from urfm_fast.data import deid

PYDICOM_US = ("US1_UNCR.dcm", "color3d_jpeg_baseline.dcm", "gdcm-US-ALOKA-16.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm")


@pytest.fixture(scope="module")
def real_set(tmp_path_factory):
    """A folder of links to the real ultrasound files; skipped when the test extra is missing."""
    pytest.importorskip("pydicom")
    deid_data = pytest.importorskip("deid_data")
    from pydicom.data import get_testdata_file

    root = tmp_path_factory.mktemp("real_us")
    for n in PYDICOM_US:
        p = get_testdata_file(n)
        if p is None:
            pytest.skip("pydicom-data is not installed (pip install -e '.[test]')")
        os.symlink(p, root / n)
    us = os.path.join(os.path.dirname(deid_data.__file__), "data", "ultrasounds")
    for n in sorted(os.listdir(us)):
        os.symlink(os.path.join(us, n), root / n)
    return root


def test_prepare_real_dicom(benchmark, measure, real_set, tmp_path):
    outs = (tmp_path / f"out{k}" for k in range(1000))  # a new shard folder per call
    cpu = []

    def run():
        t0 = time.process_time()
        c = prepare.prepare([real_set], next(outs), workers=1, progress=False)
        cpu.append(time.process_time() - t0)
        return c

    frames = run()["images_added"]  # the warm-up, which also counts the frames
    assert frames > 0
    measure(benchmark, run, items=frames, warmup=0, rounds=3)
    benchmark.extra_info["frames"] = frames
    # CPU time of this process (the detector runs one thread): less inflated by other load than wall time
    benchmark.extra_info["frames_per_cpu_s"] = round(frames / min(cpu[1:]), 1)


@pytest.mark.parametrize("name", ["US1_UNCR.dcm", "ultrasound-multiframe.dcm", "GREYSCALE_IMAGE.dcm"])
def test_text_detector(benchmark, measure, real_set, name):
    import pydicom
    from pydicom.pixels import iter_pixels

    g = prepare.to_grey8(next(iter_pixels(real_set / name)))
    live = np.ones(g.shape, bool)
    roi = (0, g.shape[0], 0, g.shape[1])
    deid.check_detector()  # session created outside the timed rounds
    measure(benchmark, lambda: deid.find_text(g, roi, live), items=1, rounds=5)
    benchmark.extra_info["frame"] = f"{g.shape[1]}x{g.shape[0]}"
    assert pydicom  # the fixture skipped already when it is missing
