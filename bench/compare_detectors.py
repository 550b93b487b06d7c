"""Planted-word recall of prepare's text detector at different pass sizes (and PP-OCRv4, if installed).

    nice python bench/compare_detectors.py --frames 100 320/640 640/640 640/- -/640
    nice python bench/compare_detectors.py --frames 150 --v4 640/640     # needs rapidocr-onnxruntime

A variant is WHOLE/CROP: the long side of the whole-frame pass and of the live-crop pass ('-': pass
left out). Frames: 240x320 to 600x800 of speckle (tests/test_deid.py's `tissue`), inside a fan (two
frames in three) or a full rectangle, with 4 words each (9-27 px high, grey 140-255) planted anywhere;
`urfm_fast.data.deid.find_text` gets the fan's bounding box as its crop. A word that reaches the live
region counts as found when every glyph pixel there is blanked. Also reported: the share of the live
region blanked on the same frame without words (false alarms), and the CPU seconds of the variant.
Results: docs/deid_detector.md.
"""

import argparse
import os
import sys
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from test_deid import fan, tissue  # noqa: E402

from urfm_fast.data import deid  # noqa: E402

WORDS = ["RT KIDNEY", "LONG", "3.2cm", "TRV", "LT THYROID", "GB", "MI 0.9", "TIS 0.4", "Doe^Jane", "12",
         "L12-5", "X2", "G", "CBD 4mm", "BLADDER", "Dist 1.23 cm", "FR 32Hz", "PRF 2.5k"]
V4_MODEL = ("rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx")


def planted(seed):
    """-> (uint8 frame with words, the same frame without, live bool mask, [bool glyph mask per word])."""
    rng = np.random.default_rng(seed)
    H, W = [(240, 320), (480, 640), (600, 800)][rng.integers(3)]
    live = fan(H, W) if seed % 3 else np.ones((H, W), bool)
    clean = np.where(live, tissue(H, W, seed), 0).astype(np.uint8)
    img, masks = Image.fromarray(clean), []
    for _ in range(4):
        s = WORDS[rng.integers(len(WORDS))]
        size = int(rng.integers(9, 22)) * H // 240 // 2 + 5
        grey = int(rng.integers(140, 256))
        font = ImageFont.load_default(size=size)
        x, y = int(rng.integers(0, W - 8 * len(s) * size // 10 - 1)), int(rng.integers(0, H - size - 2))
        m = Image.new("L", (W, H), 0)
        ImageDraw.Draw(m).text((x, y), s, font=font, fill=255)
        ImageDraw.Draw(img).text((x, y), s, font=font, fill=grey)
        masks.append(np.asarray(m) > 0)
    return np.asarray(img), clean, live, masks


def find_text_with(whole, crop):
    """deid.find_text with the given pass sizes (None: that pass left out)."""

    def find(g, roi, live):
        y0, y1, x0, x1 = roi
        text = np.zeros(live.shape, bool)
        if whole:
            text |= deid.boxes_mask(g.shape, deid.text_boxes(g, deid.line_max(g.shape), whole))[y0:y1, x0:x1]
        if crop:
            c = np.where(live, g[y0:y1, x0:x1], 0).astype(np.uint8)
            deid.boxes_mask(c.shape, deid.text_boxes(c, deid.line_max(c.shape), crop), out=text)
        return text

    return find


def run(variant, frames):
    whole, crop = (None if v == "-" else int(v) for v in variant.split("/"))
    find = find_text_with(whole, crop)
    found = words = 0
    alarms = []
    t0 = time.process_time()
    for seed in range(frames):
        img, clean, live, masks = planted(seed)
        ys, xs = np.nonzero(live)
        roi = (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1)
        lv = live[roi[0]:roi[1], roi[2]:roi[3]]
        blanked = find(img, roi, lv) | ~lv
        for m in masks:
            m = m[roi[0]:roi[1], roi[2]:roi[3]]
            if (m & lv).any():
                words += 1
                found += not (m & ~blanked).any()
        alarms.append(find(clean, roi, lv).sum() / lv.sum())
    return found, words, float(np.mean(alarms)), time.process_time() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="+", help="WHOLE/CROP long sides, e.g. 320/640 (the shipped one), 640/-")
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--v4", action="store_true", help="PP-OCRv4 from rapidocr-onnxruntime instead of PP-OCRv6")
    args = ap.parse_args(argv)
    if args.v4:
        deid.DET_MODEL, deid.SESSIONS = V4_MODEL, {}
    deid.check_detector()
    print(f"model: {os.path.basename(deid.model_path())}, {args.frames} frames")
    print("| passes (whole / crop) | words fully blanked | clean tissue blanked | CPU s |\n|---|---|---|---|")
    for v in args.variants:
        found, words, alarm, cpu = run(v, args.frames)
        print(f"| {v} | {found} / {words} | {100 * alarm:.2f} % | {cpu:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
