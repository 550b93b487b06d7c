"""Scan region of an ultrasound frame: grey conversion, detection of the live image, crop geometry.

8-bit grey from any pixel array, resize to a short side, the largest bright blob after an opening
that erases text and thin lines (the fan or rectangle of live image), the DICOM region box (Sequence
of Ultrasound Regions), the crop geometry of a file's first frame and the near-duplicate test of
consecutive frames."""


import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from urfm_fast.data import deid


def to_grey8(a):
    """Pixel array [H,W] or [H,W,3|4] of any integer/float dtype -> uint8 [H,W].

    Colour uses ITU-R 601 luma; anything wider than 8 bits is stretched min..max per image (16-bit
    PNG/TIFF often hold 10-12-bit data, so a fixed /257 would leave them nearly black)."""
    a = np.asarray(a)
    if a.ndim == 3:
        a = a[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        if a.max() <= 255 and a.min() >= 0:
            return np.clip(a + 0.5, 0, 255).astype(np.uint8)
    if a.ndim != 2:
        raise ValueError(f"unexpected pixel array shape {a.shape}")
    if a.dtype == np.uint8:
        return a
    a = a.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return ((a - lo) * (255.0 / (hi - lo)) + 0.5).astype(np.uint8)


def load_image_grey8(path):
    """PNG/JPEG/BMP/TIFF (first page) -> uint8 [H,W]; raises on unreadable or truncated files."""
    with Image.open(path) as im:
        im.load()  # decode now so truncation raises here
        if im.mode in ("L", "I;16", "I;16B", "I;16L", "I", "F"):
            return to_grey8(np.asarray(im))
        return np.asarray(im.convert("L"))  # RGB, RGBA, P, CMYK, 1, LA ...


def resize_short(g, short_side):
    """uint8 [H,W] -> uint8 with the short side = short_side, aspect kept (bilinear, antialiased)."""
    h, w = g.shape
    if min(h, w) == short_side or not short_side:
        return g
    s = short_side / min(h, w)
    nh, nw = max(short_side, round(h * s)), max(short_side, round(w * s))
    return np.asarray(Image.fromarray(g).resize((nw, nh), Image.BILINEAR))


# ---------------------------------------------------------------------------------------------
# Scan region

_WORK = 160  # detection runs on a copy with this short side: fast, and text strokes get thin


def _largest_component(m):
    """bool [h,w] -> bool mask of its largest 4-connected component."""
    import cv2

    n, lab, stats, _ = cv2.connectedComponentsWithStats(m.astype(np.uint8), connectivity=4)
    if n <= 1:
        return np.zeros_like(m)
    return lab == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


def _hull(points):
    """Convex hull (Andrew's monotone chain) of [(x, y), ...] -> counter-clockwise vertex list."""
    pts = sorted(set(points))
    if len(pts) < 3:
        return pts
    cross = lambda o, a, b: (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])
    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return lower[:-1] + upper[:-1]


def detect_scan_region(g):
    """uint8 [H,W] -> bool [H,W] mask of the live image (fan or rectangle), or None if unsure.

    On a copy with a short side of 160: mark pixels whose neighbourhood is mostly mid-grey (speckle;
    text, calipers and UI are near-white strokes on black), open with a 9-px window to cut thin links
    and strokes, keep the largest blob and take its convex hull (fans and rectangles are convex, so
    dark cysts, chambers and weak edges inside are kept). The hull must cover >= 10 % of the frame,
    else None (the caller keeps the frame whole)."""
    H, W = g.shape
    f = _WORK / min(H, W)
    small = np.asarray(Image.fromarray(g).resize((max(1, round(W * f)), max(1, round(H * f))), Image.BOX))
    mid = Image.fromarray(np.where((small > 3) & (small < 250), 255, 0).astype(np.uint8))
    m = np.asarray(mid.filter(ImageFilter.BoxBlur(2))) > 128
    k = 2 * max(2, _WORK // 40) + 1  # odd window, 9 px at the working size
    opened = Image.fromarray(np.where(m, 255, 0).astype(np.uint8))
    opened = opened.filter(ImageFilter.MinFilter(k)).filter(ImageFilter.MaxFilter(k))
    blob = _largest_component(np.asarray(opened) > 0)
    if blob.sum() < 0.05 * blob.size:
        return None
    # Row extents of the blob as pixel-corner points, scaled to full resolution.
    sy, sx = H / blob.shape[0], W / blob.shape[1]
    pts = []
    for y in np.nonzero(blob.any(axis=1))[0]:
        xs = np.nonzero(blob[y])[0]
        for yy in (y, y + 1):
            pts += [(xs[0] * sx, yy * sy), ((xs[-1] + 1) * sx, yy * sy)]
    hull = Image.new("L", (W, H), 0)
    ImageDraw.Draw(hull).polygon([(float(x), float(y)) for x, y in _hull(pts)], fill=255)
    mask = np.asarray(hull) > 0
    return mask if mask.mean() >= 0.10 else None


def crop_to_mask(g, mask):
    """Blank everything outside mask and crop to its bounding box: uint8 [H,W] -> uint8 [h,w]."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    return np.where(mask, g, 0)[y0:y1, x0:x1]


def region_box(ds, shape):
    """Union (y0, y1, x0, x1) of the 2-D regions of (0018,6011), clipped to the frame, or None."""
    boxes = []
    for r in ds.get("SequenceOfUltrasoundRegions", None) or []:
        try:
            if int(r.get("RegionSpatialFormat", 1)) != 1:  # 1 = 2-D; skip M-mode, spectral, waveform
                continue
            boxes.append((int(r.RegionLocationMinY0), int(r.RegionLocationMaxY1) + 1,
                          int(r.RegionLocationMinX0), int(r.RegionLocationMaxX1) + 1))
        except (AttributeError, TypeError, ValueError):
            continue
    if not boxes:
        return None
    H, W = shape
    y0, y1 = max(0, min(b[0] for b in boxes)), min(H, max(b[1] for b in boxes))
    x0, x1 = max(0, min(b[2] for b in boxes)), min(W, max(b[3] for b in boxes))
    if y1 - y0 < 16 or x1 - x0 < 16:
        return None
    return y0, y1, x0, x1


def scan_geometry(g, box):
    """First frame of a file -> (roi (y0, y1, x0, x1), live bool [roi], crop kind, outside bool [roi] or None).

    A DICOM region box is the live image as the scanner states it, kept whole (the scan hull found
    in it can miss dark tissue), with `outside` = the box minus that hull, where small bright marks
    are blanked; otherwise the detected fan/rectangle, else the whole frame."""
    if box is not None:
        y0, y1, x0, x1 = box
        hull = detect_scan_region(g[y0:y1, x0:x1])
        if hull is not None:  # a margin: the hull can cut off bright tissue at a dark near field
            hull = deid.dilate(hull, max(2, round(0.02 * min(hull.shape))))
        return box, np.ones((y1 - y0, x1 - x0), bool), "regions", None if hull is None else ~hull
    mask = detect_scan_region(g) if g.size else None
    if mask is None:
        return (0, g.shape[0], 0, g.shape[1]), np.ones(g.shape, bool), "full", None
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    return (y0, y1, x0, x1), mask[y0:y1, x0:x1], "detected", None


DUPLICATE_MAD = 1.0  # mean absolute difference (grey levels, resized frame) under which a frame repeats the last


def near_duplicate(a, b):
    """True when uint8 frames a and b (same shape) differ by under DUPLICATE_MAD grey levels on average:
    a frozen or repeated frame of a cine or clip (codecs re-encode a repeat with ~0.1 levels of noise;
    consecutive live ultrasound frames differ by several levels of speckle)."""
    return a.shape == b.shape and float(np.abs(a.astype(np.int16) - b).mean()) < DUPLICATE_MAD
