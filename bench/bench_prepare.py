"""`python -m urfm_fast.prepare` throughput on the real ultrasound DICOM test files, one core.

    pytest bench/bench_prepare.py --benchmark-only

Row (frames/s in extra_info['frames_per_s']):
    test_prepare_real_dicom   prepare(workers=1) of every ultrasound file of pydicom-data and
                              deid-data (7 DICOM + 2 zipped cines, 230 frames of 480x640 to
                              768x1024, JPEG baseline/lossless, RGB, palette, greyscale) into a
                              new shard folder: decode, scan-region crop, text and overlay
                              blanking, resize to 256, write.
One worker is one core: the per-core rate times the cores a machine gives prepare is its rate.
"""

import os

import pytest

from urfm_fast import prepare

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
    runs = iter(range(1000))
    frames = []

    def run():
        c = prepare.prepare([real_set], tmp_path / f"out{next(runs)}", workers=1, progress=False)
        frames.append(c["images_added"])

    measure(benchmark, run, rounds=3)
    assert frames[0] > 0 and len(set(frames)) == 1
    s = benchmark.stats.stats.mean if benchmark.stats else None
    if s:
        benchmark.extra_info["frames_per_s"] = round(frames[0] / s, 2)
        benchmark.extra_info["frames"] = frames[0]
