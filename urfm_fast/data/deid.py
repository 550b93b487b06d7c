"""Burned-in text and overlays in ultrasound pixels: find them and blank them.

Used by `python -m urfm_fast.prepare` on every frame, inside and outside the scan region (outside it
everything is blanked by the crop anyway; inside it, text on tissue is what this module is for):

- Text detector: the PP-OCRv6 (small) detection network (DB, differentiable binarisation) that ships
  inside the `rapidocr` wheel (pure Python, any CPython 3.10+), run with onnxruntime on the CPU,
  detection only (no text is ever recognised or stored; rapidocr itself is never imported). Its
  probability map is thresholded; each connected region with a mean score >= 0.5 and no taller than a
  text line becomes a box, grown by a margin (antialiased edges, descenders) before it is blanked. One
  ONNX session per process, created on first use. `find_text` runs it twice per frame it looks at, at
  two scales: the whole frame at DET_FRAME_SIDE px (large text, whole-screen context) and the live crop
  at DET_LONG_SIDE px (small text); each pass finds text the other misses.
- Static overlays in cines: inside the live region, pixels that stay (almost) constant over the
  frames of a cine are text, calipers, markers and depth scales drawn over moving tissue
  (`StaticPixels`). Cines with too few frames, or frozen ones (most of the image static), give no
  static mask.
- Marks around the scan inside a DICOM region box: small, flat, bright objects on black outside the
  detected scan hull (`small_marks`: lone letters, icons, caliper and depth marks).
- `FileCleaner` applies all three to the frames of one file: the geometry (live mask, crop box,
  output size) is fixed on the first frame, text is detected on a few frames and its boxes are
  applied to every frame, the static mask is added at the end, and the combined mask, dilated so
  that no resized output pixel takes any weight from a blanked source pixel, zeroes the resized
  frames.

Limits (see README): text with little contrast to the tissue under it, or drawn in a frame the
detector did not see and that does not stay still, can survive; `prepare --review N` is the check.
"""

import importlib.util
import os

import numpy as np

DET_LONG_SIDE = 640  # the live crop's pass: its long side is scaled down to this (never up)
DET_FRAME_SIDE = 320  # the whole frame's pass: its long side is scaled down to this (never up)
DET_THRESH, DET_BOX_THRESH = 0.3, 0.5  # pixel and region score thresholds (PP-OCR's defaults)
DET_EVERY = 64  # cines with a static mask: text detection on every 64th kept frame, the first and the last
STATIC_MIN_FRAMES = 8  # fewer kept frames: no static mask, the detector sees every frame instead
STATIC_TOL = 4  # grey levels a static pixel may wander (lossy compression of the cine)
STATIC_FROZEN = 0.5  # more than this fraction of the live region static: a frozen cine, mask unused
LINE_MAX = 0.08  # the tallest text line taken, as a fraction of the image's short side
MAX_BLANKED = 0.35  # more of the live region than this blanked: text not cleanly separable, leave out
DET_MODEL = ("rapidocr", "models/PP-OCRv6_det_small.onnx")
SESSIONS = {}  # pid -> onnxruntime session (a forked worker must not reuse its parent's)


class DetectorUnavailable(RuntimeError):
    """onnxruntime or the detection model is missing (one-line message with the fix)."""


class NotCleanable(ValueError):
    """Text and overlays cover too much of an image to trust the blanking: leave the image out."""


def model_path():
    """Path of the PP-OCRv6 detection ONNX file inside the installed rapidocr wheel (found without
    importing rapidocr, whose OCR pipeline prepare does not use)."""
    spec = importlib.util.find_spec(DET_MODEL[0])
    path = os.path.join(os.path.dirname(spec.origin), DET_MODEL[1]) if spec and spec.origin else None
    if path is None or not os.path.isfile(path):
        raise DetectorUnavailable(
            "the text detector's model is missing (pip install 'rapidocr>=3.10'); prepare does not "
            "write images whose burned-in text it cannot remove"
        )
    return path


def _session():
    s = SESSIONS.get(os.getpid())
    if s is None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise DetectorUnavailable(
                "onnxruntime is not installed (pip install onnxruntime); prepare does not write images "
                "whose burned-in text it cannot remove"
            ) from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1  # prepare runs one process per core
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # All graph fusions: 1.4x faster than ORT_ENABLE_EXTENDED on this network (CPU time, one thread).
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        s = ort.InferenceSession(model_path(), opts, providers=["CPUExecutionProvider"])
        SESSIONS.clear()
        SESSIONS[os.getpid()] = s
    return s


def check_detector():
    """Raise DetectorUnavailable unless the detector loads and runs (called once before a run)."""
    text_boxes(np.zeros((32, 32), np.uint8))


def text_prob(g, long_side=DET_LONG_SIDE):
    """uint8 [H,W] -> (float32 text probability [h,w] at the detector's size, (H/h, W/w)); the
    detector sees g with its long side scaled down to long_side (never up)."""
    import cv2

    H, W = g.shape
    s = min(1.0, long_side / max(H, W))
    h, w = max(32, round(H * s / 32) * 32), max(32, round(W * s / 32) * 32)  # the network needs /32
    x = cv2.resize(g, (w, h), interpolation=cv2.INTER_AREA if h < H else cv2.INTER_LINEAR)
    x = np.repeat((x.astype(np.float32) * (2 / 255) - 1)[None, None], 3, axis=1)  # mean/std 0.5, RGB
    sess = _session()
    prob = sess.run(None, {sess.get_inputs()[0].name: x})[0][0, 0]
    return prob, (H / h, W / w)


def text_boxes(g, max_h=None, long_side=DET_LONG_SIDE):
    """uint8 [H,W] -> [(y0, y1, x0, x1), ...] boxes around detected text, margin included, in g's
    pixels; with max_h, regions taller than max_h pixels are not taken for text."""
    import cv2

    prob, (sy, sx) = text_prob(g, long_side)
    n, lab, stats, _ = cv2.connectedComponentsWithStats((prob > DET_THRESH).astype(np.uint8), connectivity=8)
    if n <= 1:
        return []
    score = np.bincount(lab.ravel(), weights=prob.ravel(), minlength=n) / np.maximum(stats[:, 4], 1)
    H, W = g.shape
    boxes = []
    for i in range(1, n):
        x, y, w, h, _ = stats[i]
        if score[i] < DET_BOX_THRESH or (max_h is not None and h * sy > max_h):
            continue
        # DB's map at this threshold hugs the glyphs; grow it by 0.35 line heights and 2 source
        # pixels (antialiased glyph edges, descenders, accents).
        m = 0.35 * min(w, h) + 1
        boxes.append((max(0, int((y - m) * sy) - 2), min(H, int(np.ceil((y + h + m) * sy)) + 2),
                      max(0, int((x - m) * sx) - 2), min(W, int(np.ceil((x + w + m) * sx)) + 2)))
    return boxes


def find_text(g, roi, live):
    """uint8 frame [H,W], roi (y0, y1, x0, x1), live bool [roi] -> bool [roi] mask of text boxes.

    Two detector passes at two scales, each finding text the other misses: the whole frame scaled to
    DET_FRAME_SIDE (the network was trained on whole screens and pages; large text and text at the
    live region's edge), then the live crop alone at up to DET_LONG_SIDE (small text; a lone grey "G"
    beside an icon on a real test file). On 100 frames of planted words, the whole frame at 320 px
    plus the crop at 640 px covered every word on tissue (244 of 244), where both passes at 640 px
    missed 3, at about 60 % of their CPU time; the crop at 512 px missed 1.
    Regions taller than a text line (LINE_MAX of the short side) are not text: on a crop the network
    once took a row of colour-Doppler streaks for one. (Blanking the first pass's boxes before the
    second was tried and dropped: the black rectangles changed what the network saw and it missed
    text it had found before.)"""
    y0, y1, x0, x1 = roi
    text = boxes_mask(g.shape, text_boxes(g, line_max(g.shape), DET_FRAME_SIDE))[y0:y1, x0:x1]
    crop = np.where(live, g[y0:y1, x0:x1], 0).astype(np.uint8)
    return boxes_mask(crop.shape, text_boxes(crop, line_max(crop.shape), DET_LONG_SIDE), out=text)


def line_max(shape):
    return max(24, LINE_MAX * min(shape))


def small_marks(crop, outside):
    """Letters, icons, caliper marks and depth dots on the black around the scan: bright objects
    outside the scan hull (bool, crop's shape), no bigger than a text line, flat, on a black surround ->
    bool mask (grown by 2 px for antialiased edges). Long structures (probe reverberation lines) and
    speckle islands at the edge of the scan (grey surround) are kept."""
    import cv2

    n, lab, stats, _ = cv2.connectedComponentsWithStats(((crop > 40) & outside).astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros(crop.shape, bool)
    size = line_max(crop.shape)
    small = (stats[:, 2] <= size) & (stats[:, 3] <= size)
    # The ring 2 px around each object, labelled by the dilated label image: mostly black.
    ring_lab = cv2.dilate(lab.astype(np.float32), np.ones((5, 5), np.uint8)).astype(np.int64)
    ring = (lab == 0) & (ring_lab > 0)
    black = np.bincount(ring_lab[ring], weights=crop[ring] <= 12, minlength=n)
    small &= black >= 0.6 * np.bincount(ring_lab[ring], minlength=n)
    # Drawn in one colour: at least 40 % of an object at >= 3/4 of its brightest pixel (glyphs and
    # icons are flat, antialiased edges aside; speckle islands at the edge of a dark near field are not).
    fg = lab > 0
    top = np.zeros(n, np.int64)
    np.maximum.at(top, lab[fg], crop[fg])
    flat = np.bincount(lab[fg], weights=4 * crop[fg].astype(np.int64) >= 3 * top[lab[fg]], minlength=n)
    small &= flat >= 0.4 * stats[:, 4]
    small[0] = False
    return dilate(small[lab], 2)


def boxes_mask(shape, boxes, out=None):
    """Paint boxes [(y0, y1, x0, x1), ...] into a bool mask of shape (or into out)."""
    m = np.zeros(shape, bool) if out is None else out
    for y0, y1, x0, x1 in boxes:
        m[y0:y1, x0:x1] = True
    return m


class StaticPixels:
    """Running min/max of the frames of a cine: pixels that never move are overlays."""

    def __init__(self):
        self.lo = self.hi = None
        self.n = 0

    def add(self, g):
        if self.lo is None:
            self.lo, self.hi = g.copy(), g.copy()
        else:
            np.minimum(self.lo, g, out=self.lo)
            np.maximum(self.hi, g, out=self.hi)
        self.n += 1

    def mask(self, live):
        """bool mask of static, non-black pixels inside live, or None (too few frames, or frozen)."""
        if self.n < STATIC_MIN_FRAMES:
            return None
        still = (self.hi.astype(np.int16) - self.lo <= STATIC_TOL) & live
        if still.sum() > STATIC_FROZEN * max(1, live.sum()):
            return None
        return still & (self.hi > 24)  # static black needs no blanking


def dilate(mask, r):
    """bool mask grown by r pixels (square window)."""
    import cv2

    if r <= 0 or not mask.any():
        return mask
    k = np.ones((2 * r + 1, 2 * r + 1), np.uint8)
    return cv2.dilate(mask.astype(np.uint8), k) > 0


def resize_any(mask, size):
    """bool [H,W] -> bool [h,w]: an output pixel is set when its footprint touches a set pixel."""
    import cv2

    h, w = size
    if mask.shape == (h, w):
        return mask
    area = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
    return area > 0


def mask_boxes(mask, limit=64):
    """Bounding boxes [[y0, y1, x0, x1], ...] of the 8-connected parts of a bool mask (for review)."""
    import cv2

    if not mask.any():
        return []
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    boxes = [[int(y), int(y + h), int(x), int(x + w)] for x, y, w, h, _ in stats[1:]]
    if len(boxes) > limit:  # dotted calipers and the like: one box around all of them
        ys, xs = np.nonzero(mask)
        boxes = [[int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1]]
    return boxes


class FileCleaner:
    """Blanks text and static overlays in the frames of one file (a still or a cine).

    roi: (y0, y1, x0, x1) crop box of the live image in the frame; live: bool [roi] (False pixels
    are blanked like everything outside the roi); resize: uint8 [h,w] -> uint8 output frame; kept:
    number of frames this file will give. Call `add(frame)` per decoded frame (full resolution),
    then `finish()` -> (resized frames, blank boxes in output pixels, blanked fraction of the live
    region). `finish` raises NotCleanable when text covers too much of the image to trust the result."""

    def __init__(self, roi, live, resize, kept, outside=None):
        self.roi, self.live, self.resize, self.outside = roi, live, resize, outside
        self.kept = kept
        self.text = np.zeros(live.shape, bool)
        self.static = StaticPixels() if kept >= STATIC_MIN_FRAMES else None
        self.frames = []
        self.seen = 0  # frames added (the caller may drop near-duplicates from self.frames)

    def add(self, g):
        y0, y1, x0, x1 = self.roi
        crop = np.where(self.live, g[y0:y1, x0:x1], 0).astype(np.uint8)
        k, self.seen = self.seen, self.seen + 1
        if self.static is None or k % DET_EVERY == 0 or k == self.kept - 1:
            self.text |= find_text(g, self.roi, self.live)
            if self.outside is not None:
                self.text |= small_marks(crop, self.outside)
        if self.static is not None:
            self.static.add(crop)
        self.frames.append(self.resize(crop))

    def finish(self):
        blank = self.text & self.live
        if self.static is not None:
            still = self.static.mask(self.live)
            if still is not None:
                blank |= dilate(still, 2)  # antialiased edges of static glyphs move with the tissue
        frac = float(blank.sum()) / max(1, int(self.live.sum()))
        if frac > MAX_BLANKED:
            raise NotCleanable(f"mostly text or overlays ({frac:.0%} of the image would be blanked, over "
                               f"{MAX_BLANKED:.0%}: not cleanly separable, left out)")
        out_h, out_w = self.frames[0].shape
        s = min(out_h / blank.shape[0], out_w / blank.shape[1])
        # A resized pixel mixes source pixels up to ~1/s away (bilinear, antialiased): grow the mask
        # by that much so no output pixel keeps any weight of a blanked one.
        small = resize_any(dilate(blank, int(np.ceil(1 / s)) + 1 if s < 1 else 2), (out_h, out_w))
        for f in self.frames:
            f[small] = 0
        return self.frames, mask_boxes(small), frac
