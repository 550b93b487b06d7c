"""`python -m urfm_fast.prepare` throughput on the real ultrasound DICOM test files, one core.

    pytest bench/bench_prepare.py --benchmark-only
    python bench/bench_prepare.py --rounds 5        # the de-identification cost table alone

Rows (images/s column = frames/s on one core; extra_info['frames_per_cpu_s'] = frames per second of
this process's CPU time, which other load on the machine inflates less than wall time):
    test_prepare_real_dicom   prepare(workers=1) of every ultrasound file of pydicom-data and
                              deid-data (5 stills and 4 cines, two of them zipped: 233 frames of
                              480x640 to 768x1024, JPEG baseline/lossless, RGB, palette, greyscale)
                              into a new shard folder: decode, scan-region crop, text and overlay
                              blanking, resize to 256, write.
    test_deid_cost            the same prepare of the stills and of the cines, (a) as it ships and
                              (b) with the text detector replaced by a no-op (`detector_off`, a
                              bench-only switch): frames per CPU-second of each and the ratio (a)/(b),
                              the share of prepare's speed that de-identification leaves.
    test_text_detector[WxH]   urfm_fast.data.deid.find_text on one real frame of that size, one
                              thread: ms per frame it looks at.
One worker is one core: the per-core rate times the cores a machine gives prepare is its rate.
"""

import argparse
import contextlib
import os
import sys
import tempfile
import time

import numpy as np
import pytest

from urfm_fast.data import convert, deid, scan_region

PYDICOM_US = ("US1_UNCR.dcm", "color3d_jpeg_baseline.dcm", "gdcm-US-ALOKA-16.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm")
CINES = ("color3d_jpeg_baseline.dcm", "ultrasound-multiframe.dcm", "GREYSCALE_CINE.zip", "RGB_CINE.zip")


def link_real_files(root):
    """Links to the real ultrasound files in root/stills and root/cines -> root, or the reason they
    are missing (a string)."""
    try:
        import deid_data
        from pydicom.data import get_testdata_file
    except ImportError:
        return "pydicom and deid-data are not installed (pip install -e '.[test]')"
    paths = [get_testdata_file(n) for n in PYDICOM_US]
    if None in paths:
        return "pydicom-data is not installed (pip install -e '.[test]')"
    us = os.path.join(os.path.dirname(deid_data.__file__), "data", "ultrasounds")
    paths += [os.path.join(us, n) for n in sorted(os.listdir(us))]
    for p in paths:
        kind = "cines" if os.path.basename(p) in CINES else "stills"
        os.makedirs(os.path.join(root, kind), exist_ok=True)
        os.symlink(p, os.path.join(root, kind, os.path.basename(p)))
    return root


@pytest.fixture(scope="module")
def real_set(tmp_path_factory):
    """A folder of links to the real ultrasound files; skipped when the test extra is missing."""
    root = link_real_files(tmp_path_factory.mktemp("real_us"))
    if isinstance(root, str):
        pytest.skip(root)
    return root


@contextlib.contextmanager
def detector_off():
    """Bench-only: the text detector replaced by a no-op (it finds nothing, costs nothing); the rest of
    prepare (decode, scan region, marks, static mask, resize, write) runs unchanged."""
    saved = deid.find_text, deid.check_detector
    deid.find_text = lambda g, roi, live: np.zeros(live.shape, bool)
    deid.check_detector = lambda: None
    try:
        yield
    finally:
        deid.find_text, deid.check_detector = saved


def _prepare_cpu(srcs, out):
    """prepare(workers=1) of srcs into the new folder out -> (frames decoded, CPU seconds of this process).
    Frames decoded = written + left out as near-duplicates of the frame before (each is decoded, cropped,
    cleaned and resized)."""
    t0 = time.process_time()
    c = convert.prepare(srcs, out, workers=1, progress=False)
    return c["images_added"] + c["frames_duplicate"], time.process_time() - t0


def deid_cost(root, rounds=3):
    """-> rows {set, frames, a, b, ratio}: frames per CPU-second of prepare as it ships (a) and with the
    detector off (b), best of `rounds` alternating runs each (the least disturbed by other load)."""
    deid.check_detector()  # the session is created once, outside the timed runs
    sets = {"stills": [root / "stills"], "cines": [root / "cines"], "all 233 frames": [root / "stills", root / "cines"]}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, srcs in sets.items():
            best = {"a": np.inf, "b": np.inf}
            for r in range(rounds):
                for mode in ("a", "b"):
                    out = os.path.join(tmp, f"{name[:3]}{r}{mode}")
                    with detector_off() if mode == "b" else contextlib.nullcontext():
                        frames, cpu = _prepare_cpu(srcs, out)
                    best[mode] = min(best[mode], cpu)
            a, b = frames / best["a"], frames / best["b"]
            rows.append({"set": name, "frames": frames, "a": round(a, 1), "b": round(b, 1), "ratio": round(a / b, 3)})
    return rows


def markdown(rows):
    lines = ["| files | frames decoded | (a) as it ships, frames/CPU-s | (b) detector off, frames/CPU-s | (a)/(b) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['set']} | {r['frames']} | {r['a']} | {r['b']} | {r['ratio']:.2f} |" for r in rows]
    return "\n".join(lines)


def test_prepare_real_dicom(benchmark, measure, real_set, tmp_path):
    outs = (tmp_path / f"out{k}" for k in range(1000))  # a new shard folder per call
    cpu = []

    def run():
        t0 = time.process_time()
        c = convert.prepare([real_set / "stills", real_set / "cines"], next(outs), workers=1, progress=False)
        cpu.append(time.process_time() - t0)
        return c

    frames = run()["images_added"]  # the warm-up, which also counts the frames
    assert frames > 0
    measure(benchmark, run, items=frames, warmup=0, rounds=3)
    benchmark.extra_info["frames"] = frames
    # CPU time of this process (the detector runs one thread): less inflated by other load than wall time
    benchmark.extra_info["frames_per_cpu_s"] = round(frames / min(cpu[1:]), 1)


def test_deid_cost(benchmark, real_set):
    rows = benchmark.pedantic(deid_cost, args=(real_set, int(os.environ.get("URFM_BENCH_ROUNDS", "3"))),
                              rounds=1, iterations=1)
    for r in rows:
        benchmark.extra_info[r["set"]] = r
    print("\n" + markdown(rows))
    assert all(0 < r["ratio"] for r in rows)


@pytest.mark.parametrize("name", ["US1_UNCR.dcm", "ultrasound-multiframe.dcm", "GREYSCALE_IMAGE.dcm"])
def test_text_detector(benchmark, measure, real_set, name):
    from pydicom.pixels import iter_pixels

    path = next(p for p in real_set.glob(f"*/{name}"))
    g = scan_region.to_grey8(next(iter_pixels(path)))
    live = np.ones(g.shape, bool)
    roi = (0, g.shape[0], 0, g.shape[1])
    deid.check_detector()  # session created outside the timed rounds
    measure(benchmark, lambda: deid.find_text(g, roi, live), items=1, rounds=5)
    benchmark.extra_info["frame"] = f"{g.shape[1]}x{g.shape[0]}"


def main(argv=None):
    ap = argparse.ArgumentParser(description="prepare's de-identification cost on the real test frames, one core")
    ap.add_argument("--rounds", type=int, default=3, help="alternating (a)/(b) runs per set; the best of each is kept")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        import pathlib

        root = link_real_files(pathlib.Path(tmp))
        if isinstance(root, str):
            print(f"skipped: {root}", file=sys.stderr)
            return 0
        print(markdown(deid_cost(root, args.rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
