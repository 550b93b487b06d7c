"""`python -m urfm_fast.prepare SRC [SRC ...] [--list FILE] --out DIR`: ultrasound archives -> uint8 shards.

Reads PNG (8/16-bit), JPEG, BMP, TIFF and DICOM (pydicom 3: single- and multi-frame, decoded frame
by frame; MONOCHROME1/2, RGB, YBR_FULL(_422), PALETTE COLOR; JPEG baseline/lossless through Pillow
or the pylibjpeg plugins; DICOM files are recognised by content, with or without a .dcm suffix), and
with the media extra video clips (AVI/MP4/MOV/M4V) and NIfTI / MetaImage volumes (urfm_fast.media
says how slices and intensities are taken). Near-duplicate consecutive frames of a cine, clip or
volume (under DUPLICATE_MAD grey levels apart after resizing) are left out after de-identification.
--list FILE adds sources, one path per line or a CSV with a `path` column; summary.json and the
console give counts per source, named by position, never by path.
Zip archives (``.zip``) are read as if they were folders: every member is streamed out of the archive
(no extraction to disk; a member larger than 64 MiB is spooled to an anonymous temporary file,
deleted at once, since decoders seek backwards) and recorded as ``archive.zip/member/path``. A
corrupt archive or member, an encrypted member or a zip inside a zip is listed in skipped.jsonl.
Files from strangers: only regular files are opened (FIFOs, devices and links to them are listed as
skipped), symlinked folders are followed once each, a DICOM frame over MAX_FRAME_PIXELS and a zip member
over its declared size or ratio budget are refused before decoding, and a lock keeps a second run off
the output folder.
Every image/frame becomes 8-bit grey, is cropped to the scan region, de-identified (burned-in text and
overlays blanked, urfm_fast.deid), resized to a fixed short side and appended to memory-mappable shards:

    DIR/urfm_shards.json   format marker, the short side and the salt of the source ids
    DIR/shards/shard-NNNNN.bin   raw uint8 pixels, row-major, images back to back
    DIR/index.jsonl        one line per image: shard, offset, h, w, id, frame, crop, roi (crop box in
                           the source frame), blank (boxes blanked inside it, output pixels), burned_in
    DIR/skipped.jsonl      one line per file or archive member left out: id, reason
    DIR/summary.json       counts of the last run, in total and per source (by position, never by path)
    DIR/review.png         with --review N: N random images, blanked areas outlined

Scan region: the DICOM Sequence of Ultrasound Regions (0018,6011) when present (union of the 2-D
regions); otherwise the largest connected bright blob after an opening that erases text and thin
lines (the fan or rectangle of live image), holes filled; pixels outside it (text, UI, calipers)
are blanked and the image is cropped to it. When nothing convincing is found the frame is kept whole.

Inside it (urfm_fast.deid): text boxes found by the PP-OCRv4 detection network, cine pixels that never
change (overlays), and in a region box small flat marks on black outside the scan hull are blanked.
DICOM with BurnedInAnnotation YES are cleaned and flagged (or left out with --burned-in skip); an image
whose text covers over 35 % of it is left out (skipped.jsonl gives the reason). Without the detector
prepare refuses to run.

Names: sources appear in every output only as `source_id` (a salted hash of the SRC folder name and
the relative path; the salt stays in DIR), so folder and file names (often patient names, dates,
record numbers) never reach the shard folder, the logs or the console. --path-map FILE (outside DIR)
writes the id -> path table for whoever may hold it. No DICOM header value is written anywhere.

Resumable and idempotent: files already in the index (or in skipped.jsonl) are not read again, so a
second run adds only new files; a crash loses at most the file being written. A folder written
before names were hashed has its index and skip list rewritten with ids on the next run.

    python -m urfm_fast.prepare /data/us_archive --out /data/us_shards
    python -m urfm_fast.prepare /data/cines.zip /data/more_scans --out /data/us_shards
    python -m urfm_fast.pretrain --data /data/us_shards
"""

import csv
import hashlib
import io
import json
import logging
import math
import multiprocessing as mp
import os
import random
import stat
import sys
import tempfile
import time
import warnings
import zipfile
import zlib

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from urfm_fast import deid, media

MARKER = "urfm_shards.json"
INDEX = "index.jsonl"
SKIPPED = "skipped.jsonl"
SUMMARY = "summary.json"
REVIEW = "review.png"
SHARD_DIR = "shards"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_EXTS = (".dcm", ".dicom", ".dic")
ARCHIVE_EXTS = (".zip",)
SPOOL_BYTES = 64 << 20  # zip members up to this size are read into memory, larger ones into a temp file
SHARD_BYTES = 1 << 30  # start a new shard file after ~1 GiB
# Budgets that bound a worker's memory whatever a stranger's file declares (stated in --help):
MAX_FRAME_PIXELS = 1 << 25  # one DICOM frame (rows x columns x samples), ~33.5 M: 5792 x 5792 grey
MAX_OUTPUT_BYTES = 256 << 20  # resized frames of one file held before they are written
MAX_MEMBER_BYTES = 4 << 30  # a zip member's declared uncompressed size
MAX_MEMBER_RATIO = 100  # ... and its compression ratio (members over 1 MiB): zip bombs reach ~1000:1
LOCK = ".prepare.lock"
MEMORY_NOTE = (
    "Memory per worker is bounded: one decoded frame of at most 2^25 pixels (DICOM) or Pillow's "
    "decompression-bomb limit (images), its float copy, up to 256 MiB of resized frames of one file and a "
    "zip member of up to 64 MiB in memory: about 1.5 GiB at worst, ~100 MB for typical ultrasound; a volume "
    "adds its data, up to 512 MiB (refused from its header beyond that)."
)


class _OverBudget(ValueError):
    """A file that would take more memory than a worker is allowed (the message says which budget)."""


class PrepareError(Exception):
    """A problem with the command line inputs (printed as one line, exit status 2)."""


def shard_path(root, k):
    return os.path.join(root, SHARD_DIR, f"shard-{k:05d}.bin")


def is_shard_dir(root):
    return os.path.isfile(os.path.join(root, MARKER))


def read_index(root):
    """Index records of a shard folder: dicts with shard (int), offset, h, w (pixels, uint8 row-major),
    src, path (relative to src), frame. A torn last line (crash mid-write) is ignored."""
    records = []
    p = os.path.join(root, INDEX)
    if not os.path.exists(p):
        return records
    with open(p, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            records.append(json.loads(line))
    return records


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


# ---------------------------------------------------------------------------------------------
# Readers (run in worker processes). Each returns a list of (frame, uint8 [h,w], crop kind).


def is_dicom_head(head, name):
    """DICOM by content: the 'DICM' magic after the 128-byte preamble of head (the first 132 bytes),
    or a DICOM suffix of name."""
    return head[128:132] == b"DICM" or name.lower().endswith(DICOM_EXTS)


def is_dicom(path):
    """DICOM by content (or suffix) of the file at path."""
    try:
        with open(path, "rb") as f:
            return is_dicom_head(f.read(132), path)
    except OSError:
        return False


def _geometry(g, box):
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


def _clean_frames(frames, short_side, box=None, kept=1, geometry_frame=None):
    """Crop, de-identify (urfm_fast.deid), resize and de-duplicate the grey frames of one file.

    frames: iterable of (frame number, uint8 [H,W]) -> [(frame, uint8 [h,w], crop kind, extra)],
    extra = {"roi": crop box in the source frame, "blank": boxes blanked inside it (output pixels),
    "duplicates": frames left out as near-duplicates of the frame before}. The scan region is found
    in geometry_frame when given (a volume's projection), else in the first frame. Every frame is
    seen by the de-identification (text, static overlays); a near-duplicate is then dropped."""
    cleaner, kind, numbers, shape, duplicates = None, None, [], None, 0
    for idx, g in frames:
        if cleaner is None:
            roi, live, kind, outside = _geometry(g if geometry_frame is None else geometry_frame, box)
            cleaner = deid.FileCleaner(roi, live, lambda c: np.array(resize_short(c, short_side)), kept, outside)
            shape = g.shape
        elif g.shape != shape:
            raise ValueError("frames of different sizes in one file")
        cleaner.add(g)
        if len(cleaner.frames) > 1 and near_duplicate(cleaner.frames[-1], cleaner.frames[-2]):
            cleaner.frames.pop()
            duplicates += 1
            continue
        numbers.append(idx)
        if len(numbers) * cleaner.frames[-1].nbytes > MAX_OUTPUT_BYTES:
            raise _OverBudget(f"{len(numbers)} frames exceed the {MAX_OUTPUT_BYTES >> 20} MiB budget per file "
                              "after resizing; use a larger --frame-stride")
    if cleaner is None:
        return []
    imgs, blank, _ = cleaner.finish()
    extra = {"roi": list(cleaner.roi), "blank": blank, "duplicates": duplicates}
    return [(idx, np.ascontiguousarray(img), kind, extra) for idx, img in zip(numbers, imgs)]


def _rewind(src):
    if hasattr(src, "seek"):
        src.seek(0)
    return src


def read_image_file(src, short_side):
    """src: a path or a seekable binary file object."""
    return _clean_frames([(0, load_image_grey8(_rewind(src)))], short_side)


def _dicom_frames(src, ds, n, stride):
    """-> iterator of (frame number, uint8 grey [H,W]) of a DICOM, decoded one frame at a time."""
    from pydicom.pixels import apply_color_lut, iter_pixels

    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    for idx, a in zip(range(0, n, stride), iter_pixels(_rewind(src), indices=range(0, n, stride))):
        if pi == "PALETTE COLOR":
            a = apply_color_lut(a, ds)
        g = to_grey8(a)
        yield idx, (255 - g if pi == "MONOCHROME1" else g)  # 0 = white in MONOCHROME1


def read_dicom_file(src, short_side, stride=1, burned_in="clean"):
    """Decode a DICOM (a path or a seekable binary file object) frame by frame (pixel data never
    loaded whole) -> [(frame, uint8, kind, extra)]. burned_in: what to do with BurnedInAnnotation
    YES ("clean": detect and blank like every file, and flag it; "skip": leave the file out)."""
    import pydicom

    try:
        ds = pydicom.dcmread(_rewind(src), stop_before_pixels=True, force=True)
    except Exception as e:  # the message may quote header bytes: keep the class only
        raise ValueError(f"not a readable DICOM file ({type(e).__name__})") from None
    if "Rows" not in ds or "Columns" not in ds:
        raise ValueError("DICOM without image pixel data")
    flagged = str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES"
    if flagged and burned_in == "skip":
        raise ValueError("BurnedInAnnotation YES (left out by --burned-in skip)")
    n = int(ds.get("NumberOfFrames", 1) or 1)
    _check_pixel_budget(ds)
    box = region_box(ds, (int(ds.Rows), int(ds.Columns)))
    try:
        out = _clean_frames(_dicom_frames(src, ds, n, stride), short_side, box, kept=len(range(0, n, stride)))
    except (deid.DetectorUnavailable, deid.NotCleanable, _OverBudget):
        raise
    except Exception as e:
        raise _decode_error(ds, e) from None
    if not out:
        raise ValueError("DICOM without frames")
    if flagged:
        for _, _, _, extra in out:
            extra["burned_in"] = True
    return out


def _decode_error(ds, e):
    """Messages of decoders can quote header values: report the class and the standard
    transfer-syntax name only, never the message text."""
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    name = getattr(ts, "name", "unknown transfer syntax")
    return ValueError(f"cannot decode DICOM pixel data ({name}; {type(e).__name__})")


def _check_pixel_budget(ds):
    """A DICOM frame may declare any size: refuse one over MAX_FRAME_PIXELS before decoding (Pillow's
    decompression-bomb check does the same for images)."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (TypeError, ValueError):
        raise ValueError("DICOM with unreadable image dimensions") from None
    if rows <= 0 or cols <= 0 or samples <= 0:
        raise ValueError("DICOM with empty image dimensions")
    if rows * cols * samples > MAX_FRAME_PIXELS:
        raise ValueError(f"DICOM frame of {rows} x {cols} x {samples} samples exceeds the pixel budget of "
                         f"{MAX_FRAME_PIXELS} (a decompression bomb?); not decoded")


_BURNED_IN = ["clean"]  # this process's --burned-in policy (set by _quiet_worker)


def _quiet_worker(burned_in="clean"):
    """Silence decoders in workers: pydicom warnings quote header values (names, dates)."""
    _BURNED_IN[0] = burned_in
    warnings.simplefilter("ignore")
    logging.getLogger("pydicom").disabled = True
    try:
        import pydicom.config as pc

        pc.settings.reading_validation_mode = pc.IGNORE
    except Exception:
        pass


def read_media_file(src, name, short_side, stride=1, in_zip=False):
    """A video clip or a NIfTI / MetaImage volume (urfm_fast.media), cleaned like a DICOM cine."""
    if media.kind_of(name) == "video":
        frames, kept = media.video_frames(_rewind(src), stride, MAX_FRAME_PIXELS)
        return _clean_frames(frames, short_side, kept=kept)
    frames, kept, box, proj = media.volume_frames(src, name, stride, MAX_FRAME_PIXELS,
                                                  None if in_zip else _open_regular)
    return _clean_frames(frames, short_side, box, kept, geometry_frame=proj)


def _read_any(src, name, head, short_side, stride, in_zip=False):
    """Dispatch on content/suffix: image, DICOM (with or without suffix), video, volume or neither."""
    dicom = is_dicom_head(head, name)
    if media.kind_of(name) and not dicom:
        try:
            out = read_media_file(src, name, short_side, stride, in_zip)
        except (ValueError, MemoryError) as e:  # ValueError covers NotCleanable and the budgets
            return "skip", str(e) or f"unreadable {media.kind_of(name)} file ({type(e).__name__})"
        return ("ok", out) if out else ("skip", f"{media.kind_of(name)} file without frames")
    if name.lower().endswith(IMAGE_EXTS) and not dicom:
        try:
            return "ok", read_image_file(src, short_side)
        except deid.NotCleanable as e:
            return "skip", str(e)
    if dicom:
        try:
            return "ok", read_dicom_file(src, short_side, stride, _BURNED_IN[0])
        except ValueError as e:
            return "skip", str(e)
        except Exception as e:
            return "skip", f"not a readable DICOM file ({type(e).__name__})"
    return "skip", "not an image, DICOM, video or volume file"


_ZIPS = {}  # this process's open archive: (path, mtime, size) -> ZipFile (central directory read once)


def _open_zip(path):
    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size)
    zf = _ZIPS.get(key)
    if zf is None:
        _close_zips()
        zf = _ZIPS[key] = zipfile.ZipFile(path)
    return zf


def _close_zips():
    for zf in _ZIPS.values():
        zf.close()
    _ZIPS.clear()


def _zip_error(e):
    msg = str(e).splitlines()[0][:120] if str(e) else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def list_zip(path):
    """Sorted member names (folders left out) of a zip archive; raises on a corrupt archive."""
    with zipfile.ZipFile(path) as zf:
        return sorted({i.filename for i in zf.infolist() if not i.is_dir()})


def _not_regular(path):
    """None for a regular file (or a link to one), else the reason it is skipped unopened: reading a
    FIFO blocks forever, a device never ends (/dev/zero, /dev/urandom)."""
    try:
        st = os.stat(path)
    except OSError as e:
        return f"cannot stat ({e.strerror})"
    if stat.S_ISDIR(st.st_mode):
        return "symlinked folder already read (a link loop or a second link to it); not read again"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (FIFO, device or socket); not opened"
    return None


def _open_regular(path):
    """Open a regular file for reading; O_NONBLOCK and a check on the open file, so a file swapped
    for a FIFO after the stat cannot block the worker."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError("not a regular file (FIFO, device or socket); not read")
    return os.fdopen(fd, "rb")


def _member_too_big(info):
    """Refuse a zip member by its declared sizes, before a byte is decompressed."""
    if info.file_size > MAX_MEMBER_BYTES:
        return f"zip member too large (declares {info.file_size} bytes; limit {MAX_MEMBER_BYTES})"
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size > (1 << 20) and ratio > MAX_MEMBER_RATIO:
        return (f"zip member compressed {ratio:.0f}:1 (declares {info.file_size} bytes; limit "
                f"{MAX_MEMBER_RATIO}:1, a zip bomb?); not read")
    return None


def _copy_bounded(src, dst, limit):
    """Copy at most ``limit`` bytes (the member's declared size): a member that inflates past what it
    declared is corrupt, and is never spooled past it."""
    total = 0
    while chunk := src.read(1 << 20):
        total += len(chunk)
        if total > limit:
            raise ValueError(f"inflates past its declared size of {limit} bytes")
        dst.write(chunk)


def _process_member(path, member, short_side, stride):
    """One member of a zip archive, streamed: small members into memory, large ones into an anonymous
    temporary file (pydicom seeks backwards, which a deflate stream can only do by starting over)."""
    try:
        zf = _open_zip(path)
        info = zf.getinfo(member)
    except KeyError:
        return "skip", "zip member vanished (archive changed while reading)"
    except Exception as e:
        return "skip", f"corrupt zip archive ({_zip_error(e)})"
    if info.flag_bits & 0x1:
        return "skip", "encrypted zip member (not read)"
    if member.lower().endswith(ARCHIVE_EXTS):
        return "skip", "zip archive inside a zip archive (not read; extract the outer archive first)"
    too_big = _member_too_big(info)
    if too_big:
        return "skip", too_big
    f = None
    try:
        with zf.open(info) as m:
            head = m.read(132)
            if not is_dicom_head(head, member) and not member.lower().endswith(IMAGE_EXTS + media.MEDIA_EXTS):
                return "skip", "not an image, DICOM, video or volume file"
            f = io.BytesIO() if info.file_size <= SPOOL_BYTES else tempfile.TemporaryFile(prefix="urfm-prepare-")
            f.write(head)
            _copy_bounded(m, f, info.file_size - len(head))  # the CRC is checked when the member ends
    except NotImplementedError:
        if f is not None:
            f.close()
        return "skip", f"unsupported zip compression (method {info.compress_type})"
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, RuntimeError) as e:
        if f is not None:
            f.close()
        return "skip", f"corrupt zip member ({_zip_error(e)})"
    with f:
        return _read_any(f, member, head, short_side, stride, in_zip=True)


def process_file(job):
    """Worker entry: job = (abs path, zip member or None, rel path, short side, stride)
    -> ("ok", frames) | ("skip", reason)."""
    path, member, rel, short_side, stride = job
    try:
        not_regular = None if member is not None else _not_regular(path)
        if not_regular:
            return "skip", not_regular
        if member is not None:
            status, payload = _process_member(path, member, short_side, stride)
        elif path.lower().endswith(ARCHIVE_EXTS):
            # Listed as a whole only when it could not be opened or holds no files.
            try:
                empty = not list_zip(path)
            except Exception as e:
                return "skip", f"corrupt zip archive ({_zip_error(e)})"
            return "skip", "zip archive without files" if empty else "zip archive changed while reading"
        else:
            with _open_regular(path) as f:
                head = f.read(132)
                status, payload = _read_any(f, path, head, short_side, stride)
        if status == "skip":
            return status, scrub_names(payload, path, member, rel)
        return "ok", [(fr, img.shape[0], img.shape[1], kind, extra, img.tobytes()) for fr, img, kind, extra in payload]
    except Exception as e:  # a bad file is listed, never a crash
        msg = scrub_names(str(e), path, member, rel)[:200]
        return "skip", f"unreadable image ({type(e).__name__}: {msg})"


def scrub_names(text, path, member, rel):
    """text with the absolute path, and every file and folder name of the member and relative path,
    replaced by <file>: messages of decoders and zipfile quote them, and names can hold patient data."""
    parts = {path, os.path.basename(path)}
    for n in (member, rel):
        if n:
            parts.add(n)
            parts.update(x for x in n.split("/") if len(x) >= 3)
    parts |= {repr(x)[1:-1] for x in parts}  # as quoted by %r in messages (escaped quotes, backslashes)
    parts.discard("")
    for part in sorted(parts, key=len, reverse=True):
        text = text.replace(part, "<file>")
    return text


# ---------------------------------------------------------------------------------------------
# Driver


def walk_sources(sources, out, labels=None, origins=None):
    """-> [(src name, rel path, abs path, zip member or None)] of every file under the sources (out
    excluded), in sorted order; a .zip file contributes one entry per member (rel path
    ``archive.zip/member/path``), or one entry for itself when it is corrupt or empty. Data files of
    MetaImage headers (.raw beside an .mhd naming it) are read with their header, not listed.
    labels: how messages name each source (default: as given; --list entries by their line, since
    a list's paths may name patients); origins: a list that receives each entry's source position."""
    out_abs = os.path.abspath(out)
    labels = labels or [str(s) for s in sources]
    jobs, names = [], {}

    def add(name, rel, p):
        if p.lower().endswith(ARCHIVE_EXTS) and _not_regular(p) is None:
            try:
                members = list_zip(p)
            except Exception:
                members = []
            if members:
                data = media.zip_data_members(members)
                jobs.extend((name, f"{rel}/{m}", p, m) for m in members if m not in data)
                return
        jobs.append((name, rel, p, None))

    given = {}
    for k, (s, label) in enumerate(zip(sources, labels)):
        before = len(jobs)
        a = os.path.abspath(s)
        if not os.path.exists(a):
            raise PrepareError(f"source {label} does not exist")
        if given.setdefault(os.path.realpath(a), label) != label:  # its files would be written twice
            raise PrepareError(f"source {label} is also given as {given[os.path.realpath(a)]}; name it once")
        if not os.path.isdir(a):  # a file (a FIFO or device source is listed as skipped, never opened)
            folder, base = os.path.split(a)
            if not (base.lower().endswith(media.DATA_FILE_EXTS) and base in _data_files(folder)):
                add("", base, a)
        else:
            name = os.path.basename(os.path.normpath(a))
            if name in names and names[name][0] != a:
                raise PrepareError(f"sources {names[name][1]} and {label} share the folder name; give them "
                                   "distinct names")
            names[name] = (a, label)
            _walk_folder(a, out_abs, lambda rel, p, name=name: add(name, rel, p))
        if origins is not None:
            origins.extend([k] * (len(jobs) - before))
    return jobs


def _data_files(folder, names=None):
    """Files of folder that an .mhd there reads as its data file (names: its listing, when known)."""
    try:
        names = os.listdir(folder) if names is None else names
    except OSError:
        return set()
    if not any(n.lower().endswith(".mhd") for n in names):
        return set()
    return media.metaimage_data_files(folder, names, _open_regular)


def _walk_folder(root, out_abs, add):
    """Every file under root in sorted order, following symlinked folders once each: a folder reached
    again (a link loop, or two links to one folder) is passed to ``add`` itself and listed as skipped."""
    seen, out_real = set(), os.path.realpath(out_abs)  # the output folder, also when reached through a link
    for d, dirs, files in os.walk(root, followlinks=True):
        try:
            st = os.stat(d)
        except OSError:
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            add(os.path.relpath(d, root).replace(os.sep, "/"), d)
            continue
        seen.add((st.st_dev, st.st_ino))
        # real folders before links at each level, so a link to a folder of the source is the duplicate
        dirs[:] = sorted((x for x in dirs if os.path.realpath(os.path.join(d, x)) != out_real),
                         key=lambda x, d=d: (os.path.islink(os.path.join(d, x)), x))
        data = _data_files(d, files)
        for f in sorted(files):
            if f in data:
                continue
            p = os.path.join(d, f)
            add(os.path.relpath(p, root).replace(os.sep, "/"), p)


def _open_out(out, short_side):
    """Create or reopen the shard folder; refuse a non-empty folder that is not ours."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise PrepareError(f"--out {out} exists and is not a folder")
    if os.path.isdir(out) and set(os.listdir(out)) - {LOCK} and not is_shard_dir(out):
        raise PrepareError(f"--out {out} is not empty and not a shard folder; choose an empty or new folder")
    os.makedirs(out, exist_ok=True)
    lock = _lock(out)  # before anything else is written
    os.makedirs(os.path.join(out, SHARD_DIR), exist_ok=True)
    mpath = os.path.join(out, MARKER)
    if os.path.exists(mpath):
        with open(mpath) as f:
            meta = json.load(f)
        if meta.get("short_side") != short_side:
            raise PrepareError(
                f"{out} holds images with short side {meta.get('short_side')}; use --short-side "
                f"{meta.get('short_side')} or another --out"
            )
    else:
        with open(mpath, "w") as f:
            json.dump({"format": "urfm-shards", "version": 1, "short_side": short_side}, f)
            f.write("\n")
    # A crash mid-line leaves a torn last line: cut it before appending.
    for name in (INDEX, SKIPPED):
        p = os.path.join(out, name)
        if os.path.exists(p):
            with open(p, "rb+") as f:
                data = f.read()
                if data and not data.endswith(b"\n"):
                    f.truncate(data.rfind(b"\n") + 1)
    return lock


def _lock(out):
    """An exclusive lock on the shard folder for this run: two runs appending to one index would
    interleave and duplicate images. Released when the process ends, however it ends."""
    import fcntl

    f = open(os.path.join(out, LOCK), "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise PrepareError(f"another prepare is writing to {out} (its lock {LOCK} is held); wait for it to "
                           "finish or choose another --out") from None
    return f


class _ShardWriter:
    """Appends images to new shard files (never rewrites an existing one)."""

    def __init__(self, out):
        self.out = out
        existing = [int(f[6:11]) for f in os.listdir(os.path.join(out, SHARD_DIR)) if f.startswith("shard-")]
        self.k = max(existing, default=-1)
        self.f = None

    def write(self, data):
        """-> (shard number, byte offset) of data."""
        if self.f is None or self.f.tell() >= SHARD_BYTES:
            if self.f is not None:
                self.f.close()
            self.k += 1
            self.f = open(shard_path(self.out, self.k), "wb")
        off = self.f.tell()
        self.f.write(data)
        return self.k, off

    def flush(self):
        if self.f is not None:
            self.f.flush()
            os.fsync(self.f.fileno())

    def close(self):
        if self.f is not None:
            self.f.close()


def source_salt(out):
    """The shard folder's salt (hex) for hashing source names, made on first use and kept in its marker."""
    mpath = os.path.join(out, MARKER)
    with open(mpath) as f:
        meta = json.load(f)
    if "salt" not in meta:
        meta["salt"] = os.urandom(16).hex()
        with open(mpath + ".tmp", "w") as f:
            json.dump(meta, f)
            f.write("\n")
        os.replace(mpath + ".tmp", mpath)
    return meta["salt"]


def _hash(salt, kind, text):
    return hashlib.sha256(f"{salt}\0{kind}\0{text}".encode()).hexdigest()


def source_id(salt, src, rel):
    """Stable salted hash naming one source file in every output: 8 hex digits for the source folder
    name, 16 for the path inside it (so a labels file can name a file with or without its folder)."""
    return _hash(salt, "src", src)[:8] + _hash(salt, "path", rel)[:16]


def record_source(r):
    """The source (folder) of an index record, hashed or, in older folders, by name."""
    return r["src"] if "src" in r else r["id"][:8]


def path_lookup(root, records):
    """-> find(path) -> indices of the records of that source file, where path is "rel/path" or
    "src/rel/path" (for labels files that name files by path; the names are hashed the same way)."""
    if records and "path" in records[0]:  # written before sources were hashed
        by_key = {}
        for k, r in enumerate(records):
            for key in {r["path"], f"{r['src']}/{r['path']}" if r["src"] else r["path"]}:
                by_key.setdefault(key, []).append(k)
        return lambda p: by_key.get(p, [])
    with open(os.path.join(root, MARKER)) as f:
        salt = json.load(f).get("salt", "")
    by_id, by_rel = {}, {}
    for k, r in enumerate(records):
        by_id.setdefault(r["id"], []).append(k)
        by_rel.setdefault(r["id"][8:], []).append(k)

    def find(p):
        items = set(by_rel.get(_hash(salt, "path", p)[:16], []))
        if "/" in p:
            items.update(by_id.get(source_id(salt, *p.split("/", 1)), []))
        return sorted(items)

    return find


def _hash_old_names(out, salt):
    """Folders written before sources were hashed name them in index.jsonl and skipped.jsonl: replace
    those names by their ids (each file rewritten whole, atomically) -> [(id, src, rel)] replaced."""
    named = []
    for name in (INDEX, SKIPPED):
        p = os.path.join(out, name)
        rows = _read_jsonl(p)
        if not any("path" in r for r in rows):
            continue
        for k, r in enumerate(rows):
            if "path" in r:
                src, rel = r.pop("src"), r.pop("path")
                sid = source_id(salt, src, rel)
                named.append((sid, src, rel))
                rows[k] = {"id": sid, **r}
        _write_jsonl(p, rows)
    return named


def _check_path_map(path_map, out):
    """Refuse a --path-map inside the shard folder, or an existing file that is not a path map."""
    pm, root = os.path.realpath(path_map), os.path.realpath(out)
    if os.path.commonpath([pm, root]) == root:
        raise PrepareError(f"--path-map {path_map} is inside the shard folder; the map names patients' "
                           "files and must be kept apart from the shards (choose a path outside --out)")
    if os.path.isdir(pm) or not os.path.isdir(os.path.dirname(pm)):
        raise PrepareError(f"--path-map {path_map} is a folder or in a folder that does not exist")
    try:
        rows = _read_jsonl(pm)
    except (OSError, ValueError, UnicodeDecodeError):
        rows = None
    if rows is None or any(set(r) != {"id", "src", "path"} for r in rows):
        raise PrepareError(f"--path-map {path_map} exists and is not a path map of prepare; choose another file")
    return {r["id"]: r for r in rows}


def _write_path_map(path_map, known, entries):
    """Merge (id, src, rel) entries into the user's path map (JSON lines: id, src, path)."""
    for sid, src, rel in entries:
        known.setdefault(sid, {"id": sid, "src": src, "path": rel})
    _write_jsonl(path_map, sorted(known.values(), key=lambda r: (r["src"], r["path"])))


def prepare(
    sources, out, *, short_side=256, frame_stride=1, workers=None, retry_skipped=False, progress=True,
    path_map=None, burned_in="clean", list_file=None,
):
    """Library entry of the CLI; returns the summary dict. Raises PrepareError on bad inputs.

    Sources are named in the outputs by `source_id` only; path_map (a file outside out) receives
    the id -> (src, path) table. burned_in: "clean" or "skip" for DICOM BurnedInAnnotation YES.
    list_file: more sources, one path per line or a CSV with a `path` column (read_source_list)."""
    check_options(short_side, frame_stride, workers)
    if burned_in not in ("clean", "skip"):
        raise PrepareError("--burned-in must be clean or skip")
    try:
        deid.check_detector()
    except deid.DetectorUnavailable as e:
        raise PrepareError(str(e)) from None
    path_map = os.fspath(path_map) if path_map else None
    known = _check_path_map(path_map, out) if path_map else None
    sources = [os.fspath(s) for s in sources]
    labels = [f"argument {k + 1}" for k in range(len(sources))]
    shown = list(sources)  # as typed on the command line; list entries are shown by line only
    if list_file is not None:
        listed = read_source_list(list_file)
        sources += [p for p, _ in listed]
        labels += [lab for _, lab in listed]
        shown += [lab for _, lab in listed]
    origins = []
    files = walk_sources(sources, out, shown, origins)
    if not files:
        raise PrepareError(f"no files found under {' '.join(shown)}")
    _check_libraries(files)
    lock = _open_out(out, short_side)
    try:
        return _prepare_locked(files, out, short_side, frame_stride, workers, retry_skipped, progress,
                               path_map, known, burned_in, (labels, origins))
    finally:
        lock.close()


def read_source_list(list_file):
    """Sources of --list FILE -> [(path, label "--list line N")]: one path per line (blank lines and
    lines starting with # ignored), or a CSV whose header has a `path` column. Relative paths are
    relative to the list's folder, so one list names one corpus wherever it is run from. Messages
    name entries by line only: the paths may name patients."""
    try:
        with open(list_file, encoding="utf-8", newline="") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PrepareError(f"--list {list_file}: cannot read ({getattr(e, 'strerror', None) or type(e).__name__})"
                           ) from None
    base = os.path.dirname(os.path.abspath(list_file))
    first = next((k for k, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#")), None)
    if first is None:
        raise PrepareError(f"--list {list_file} names no sources")
    header = [c.strip().lower() for c in next(csv.reader([lines[first]]))]
    rows = []
    if "path" in header:
        col = header.index("path")
        for k, row in enumerate(csv.reader(lines[first + 1:]), start=first + 2):
            if len(row) > col and row[col].strip():
                rows.append((row[col].strip(), f"--list line {k}"))
    else:
        rows = [(line.strip(), f"--list line {k + 1}") for k, line in enumerate(lines)
                if line.strip() and not line.lstrip().startswith("#")]
    if not rows:
        raise PrepareError(f"--list {list_file} names no sources")
    return [(os.path.join(base, os.path.expanduser(p)), label) for p, label in rows]


def _check_libraries(files):
    """Refuse to start when clips or volumes are found and the library reading them is not installed."""
    found = {}
    for _, _, p, member in files:
        kind = media.kind_of(member or p)
        if kind:
            found[kind] = found.get(kind, 0) + 1
    for kind, n in sorted(found.items()):
        missing = media.missing_library(kind)
        if missing:
            raise PrepareError(f"{n} {kind} files found; {missing}")


def check_options(short_side, frame_stride, workers):
    """The numeric options, with their allowed ranges (PrepareError: one line, exit 2)."""
    for flag, value, lo, hi in (("--short-side", short_side, 16, 8192), ("--frame-stride", frame_stride, 1, 10**6),
                                ("--workers", 1 if workers is None else workers, 1, 1024)):
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise PrepareError(f"{flag} {value}: must be an integer in [{lo}, {hi}]")


def _prepare_locked(files, out, short_side, frame_stride, workers, retry_skipped, progress, path_map, known,
                    burned_in, provenance):
    """prepare() with the inputs checked and the output folder locked. provenance: (label of each
    source, source position of each file) for the per-source summary."""
    salt = source_salt(out)
    renamed = _hash_old_names(out, salt)
    ids = [source_id(salt, s, rel) for s, rel, _, _ in files]
    if known is not None:
        _write_path_map(path_map, known, [(i, s, rel) for i, (s, rel, _, _) in zip(ids, files)] + renamed)
    done = {r["id"] for r in read_index(out)}
    old_skips = _read_jsonl(os.path.join(out, SKIPPED))
    if retry_skipped:  # forget old skips; they are listed again if they fail again
        _write_jsonl(os.path.join(out, SKIPPED), [r for r in old_skips if r["id"] in done])
    else:
        done |= {r["id"] for r in old_skips}
    todo = [(i, rel, p, m) for i, (_, rel, p, m) in zip(ids, files) if i not in done]
    labels, origins = provenance
    per_source = _source_table(ids, done, labels, origins)
    origin_of = dict(zip(ids, origins))
    counts = {"files_seen": len(files), "files_already_done": len(files) - len(todo), "files_added": 0,
              "images_added": 0, "files_skipped": 0, "skip_reasons": {}, "crop": {},
              "images_blanked": 0, "burned_in_cleaned": 0, "frames_duplicate": 0}
    t0 = time.time()
    writer = _ShardWriter(out)
    jobs = [(p, m, rel, short_side, frame_stride) for _, rel, p, m in todo]
    _close_zips()  # no open archive may be shared with forked workers
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    with open(os.path.join(out, INDEX), "a", encoding="utf-8") as index, \
            open(os.path.join(out, SKIPPED), "a", encoding="utf-8") as skipped:
        if workers == 1:
            _quiet_worker(burned_in)
            results = map(_timed_process, jobs)
            pool = None
        else:
            # fork: workers start at once (spawn would re-import torch through the urfm_fast package);
            # they only run numpy/PIL/pydicom/onnxruntime code.
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            pool = mp.get_context(method).Pool(workers, initializer=_quiet_worker, initargs=(burned_in,))
            results = pool.imap(_timed_process, jobs, chunksize=1)  # ordered: same input, same shards
        try:
            bar = _progress(len(jobs), progress)
            for (sid, _, _, _), (seconds, (status, payload)) in zip(todo, results):
                row = per_source[origin_of[sid]]
                row["seconds"] += seconds
                if status == "skip":
                    _log_skip(skipped, counts, sid, payload)
                    key = _reason_key(payload)
                    row["skipped"][key] = row["skipped"].get(key, 0) + 1
                else:
                    _write_images(writer, index, counts, sid, payload)
                    row["files_added"] += 1
                    row["images_added"] += len(payload)
                bar.update(1)
                bar.set_postfix(images=counts["images_added"], skipped=counts["files_skipped"], refresh=False)
            bar.close()
        finally:
            writer.close()
            _close_zips()
            if pool is not None:
                pool.terminate()
    counts["images_total"] = len(read_index(out))
    counts["files_skipped_total"] = len(_read_jsonl(os.path.join(out, SKIPPED)))
    counts["seconds"] = round(time.time() - t0, 2)
    for row in per_source:
        row["seconds"] = round(row["seconds"], 2)
    counts["sources"] = per_source
    with open(os.path.join(out, SUMMARY), "w") as f:
        json.dump(counts, f, indent=1)
        f.write("\n")
    return counts


def _timed_process(job):
    """process_file and the seconds it took (summed per source in the summary)."""
    t = time.perf_counter()
    result = process_file(job)
    return time.perf_counter() - t, result


def _reason_key(reason):
    return reason.split(" (")[0]


def _source_table(ids, done, labels, origins):
    """One row per source for summary.json: its position and how it was given (argument or --list
    line), the hashed id of its folder name, never its path."""
    rows = [{"source": k + 1, "given_as": label, "id": None, "files": 0, "files_already_done": 0,
             "files_added": 0, "images_added": 0, "skipped": {}, "seconds": 0.0} for k, label in enumerate(labels)]
    for sid, k in zip(ids, origins):
        rows[k]["id"] = sid[:8]  # the source-folder part of the salted id
        rows[k]["files"] += 1
        rows[k]["files_already_done"] += sid in done
    return rows


def _log_skip(skipped, counts, sid, reason):
    skipped.write(json.dumps({"id": sid, "reason": reason}) + "\n")
    skipped.flush()
    counts["files_skipped"] += 1
    key = _reason_key(reason)
    counts["skip_reasons"][key] = counts["skip_reasons"].get(key, 0) + 1


def _write_images(writer, index, counts, sid, payload):
    """Pixels of one file to the shards, then its index lines (pixels on disk before the index points at them)."""
    lines = []
    for frame, h, w, kind, extra, data in payload:
        k, off = writer.write(data)
        rec = {"shard": k, "offset": off, "h": h, "w": w, "id": sid, "frame": frame, "crop": kind}
        rec["roi"] = extra["roi"]
        if extra["blank"]:
            rec["blank"] = extra["blank"]
            counts["images_blanked"] += 1
        if extra.get("burned_in"):
            rec["burned_in"] = True
        lines.append(json.dumps(rec))
        counts["crop"][kind] = counts["crop"].get(kind, 0) + 1
    writer.flush()
    index.write("\n".join(lines) + "\n")
    index.flush()
    counts["files_added"] += 1
    counts["images_added"] += len(payload)
    counts["burned_in_cleaned"] += bool(payload and payload[0][4].get("burned_in"))
    counts["frames_duplicate"] += payload[0][4].get("duplicates", 0) if payload else 0


def _progress(total, enabled):
    from tqdm import tqdm

    return tqdm(total=total, unit="file", disable=not enabled, dynamic_ncols=True, desc="prepare")


def _read_jsonl(p):
    if not os.path.exists(p):
        return []
    with open(p, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def _write_jsonl(p, rows):
    tmp = p + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, p)


def _shard_image(out, maps, r):
    """uint8 [h,w] of one index record (shard files memory-mapped once, in maps)."""
    m = maps.get(r["shard"])
    if m is None:
        m = maps[r["shard"]] = np.memmap(shard_path(out, r["shard"]), dtype=np.uint8, mode="r")
    return np.array(m[r["offset"]:r["offset"] + r["h"] * r["w"]]).reshape(r["h"], r["w"])


def write_review(out, n, seed=None, tile=200):
    """PNG contact sheet of n random prepared images of a shard folder (index order, each scaled to fit
    tile x tile, labelled with its index line and frame), the blanked areas outlined in red (the
    scan-region crop is the black around the image) -> path of out/review.png."""
    recs = read_index(out)
    if not recs:
        raise PrepareError(f"{out} holds no prepared images to review")
    pick = sorted(random.Random(seed).sample(range(len(recs)), min(n, len(recs))))
    cols = max(1, min(8, math.ceil(math.sqrt(len(pick)))))
    scale = [tile / max(recs[k]["h"], recs[k]["w"]) for k in pick]
    rows = [pick[i:i + cols] for i in range(0, len(pick), cols)]
    heights = [max(round(recs[k]["h"] * scale[pick.index(k)]) for k in row) + 16 for row in rows]
    sheet = Image.new("RGB", (cols * (tile + 4) + 4, sum(heights) + 4 * len(rows) + 4), (40, 40, 40))
    draw, maps, y0 = ImageDraw.Draw(sheet), {}, 4
    for row, height in zip(rows, heights):
        for c, k in enumerate(row):
            r, s, x0 = recs[k], scale[pick.index(k)], 4 + c * (tile + 4)
            img = Image.fromarray(_shard_image(out, maps, r))
            sheet.paste(img.resize((max(1, round(r["w"] * s)), max(1, round(r["h"] * s)))).convert("RGB"), (x0, y0))
            for by0, by1, bx0, bx1 in r.get("blank", []):
                draw.rectangle((x0 + bx0 * s - 1, y0 + by0 * s - 1, x0 + bx1 * s, y0 + by1 * s), outline=(255, 40, 40))
            draw.text((x0, y0 + height - 14), f"#{k} frame {r['frame']}", fill=(220, 220, 120))
        y0 += height + 4
    path = os.path.join(out, REVIEW)
    sheet.save(path)
    return path


def format_summary(c, out):
    lines = [
        f"{c['files_seen']} files seen, {c['files_already_done']} already done, {c['files_added']} added "
        f"({c['images_added']} images), {c['files_skipped']} skipped",
        f"{out}: {c['images_total']} images in total; {c['files_skipped_total']} files listed in {SKIPPED}",
    ]
    for reason, n in sorted(c["skip_reasons"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  skipped {n:6d}  {reason}")
    if c["crop"]:
        lines.append("  scan-region crop: " + ", ".join(f"{k} {v}" for k, v in sorted(c["crop"].items())))
    if c.get("frames_duplicate"):
        lines.append(f"  {c['frames_duplicate']} near-duplicate frames of cines and clips left out")
    for row in c.get("sources", []):
        skips = ", ".join(f"{n} {r}" for r, n in sorted(row["skipped"].items(), key=lambda kv: -kv[1]))
        lines.append(f"  source {row['source']} ({row['given_as']}, id {row['id']}): {row['files']} files, "
                     f"{row['files_added']} added ({row['images_added']} images), "
                     f"{sum(row['skipped'].values())} skipped{f' ({skips})' if skips else ''}, {row['seconds']} s")
    if c["images_added"]:
        lines.append(f"  text/overlays blanked inside the scan region in {c['images_blanked']} images; "
                     f"{c['burned_in_cleaned']} files flagged BurnedInAnnotation YES cleaned")
    return "\n".join(lines)


def main(argv=None):
    from urfm_fast.cli_checks import OneLineParser

    ap = OneLineParser(
        prog="python -m urfm_fast.prepare",
        epilog=MEMORY_NOTE + " Only regular files are read: FIFOs, devices and links to them are listed as "
        "skipped, unopened; symlinked folders are followed once each. Zip members are refused by their declared "
        f"size (over {MAX_MEMBER_BYTES >> 30} GiB) or compression ratio (over {MAX_MEMBER_RATIO}:1) before a "
        "byte is decompressed. One prepare at a time per --out (a lock file). Video clips and volumes need "
        f"the media extra ({media.EXTRA}); a volume's data over {media.MAX_VOLUME_BYTES >> 20} MiB is refused "
        "before it is read.",
        description="Convert folders and zip archives of ultrasound images (PNG, JPEG, BMP, TIFF), DICOM "
        "(cine) files, video clips (AVI, MP4, MOV, M4V) and volumes (NIfTI .nii/.nii.gz, MetaImage .mhd/.raw, "
        ".mha) into de-identified uint8 shards for python -m urfm_fast.pretrain --data DIR: burned-in text and "
        "overlays are blanked, near-duplicate consecutive frames dropped, sources are named by salted hashes. "
        "Unreadable files and archive members are listed in DIR/skipped.jsonl; a second run adds only new "
        "files; DIR/summary.json and the console give counts per source.",
    )
    ap.add_argument("sources", nargs="*", metavar="SRC",
                    help="folders (searched recursively), files or .zip archives (read like folders, "
                    "members named archive.zip/member/path in the --path-map)")
    ap.add_argument("--list", metavar="FILE", default=None, dest="list_file",
                    help="more sources: one path per line (# comments), or a CSV with a 'path' column; relative "
                    "paths are relative to FILE's folder. Its entries are named by line in messages and by "
                    "position in summary.json, never by path")
    ap.add_argument("--out", required=True, help="shard folder to create or extend (resumable)")
    ap.add_argument("--short-side", type=int, default=256, help="resize every image to this short side "
                    "(16 to 8192)")
    ap.add_argument("--frame-stride", type=int, default=1, help="keep every N-th frame of a cine or video clip, "
                    "every N-th slice of a volume (1 to 10^6)")
    ap.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores; 1 to "
                    "1024; see the memory note below)")
    ap.add_argument("--retry-skipped", action="store_true", help="read files listed in skipped.jsonl again")
    ap.add_argument("--path-map", metavar="FILE", default=None,
                    help="also write the table source id -> folder/relative path to FILE (JSON lines; it "
                    "names patients' files: must be outside --out; merged with FILE when it exists)")
    ap.add_argument("--burned-in", choices=("clean", "skip"), default="clean",
                    help="DICOM with BurnedInAnnotation YES: blank its text like any file and flag it in "
                    "index.jsonl (clean), or leave it out, listed in skipped.jsonl (skip)")
    ap.add_argument("--review", type=int, default=0, metavar="N",
                    help="write DIR/review.png, a contact sheet of N random prepared images with the "
                    "blanked areas outlined (with no SRC: only that, for an existing shard folder)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        if args.review < 0:
            raise PrepareError("--review must be >= 0")
        if not args.sources and not args.list_file and not args.review:
            raise PrepareError("give at least one SRC or --list FILE (or --review N for an existing shard folder)")
        if args.sources or args.list_file:
            c = prepare(args.sources, args.out, short_side=args.short_side, frame_stride=args.frame_stride,
                        workers=args.workers, retry_skipped=args.retry_skipped, progress=not args.quiet,
                        path_map=args.path_map, burned_in=args.burned_in, list_file=args.list_file)
            print(format_summary(c, args.out))
        if args.review:
            if not is_shard_dir(args.out):
                raise PrepareError(f"--out {args.out} is not a shard folder")
            print(f"review sheet: {write_review(args.out, args.review)}")
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full or read-only disk under --out
        print(f"error: {_out_path(e, args.out)}: {e.strerror or type(e).__name__}; check the disk and "
              "permissions of --out", file=sys.stderr)
        return 2
    return 0


def _out_path(e, out):
    """The file an OSError names, only when it is under --out: a source path may name a patient."""
    name = os.fspath(e.filename) if isinstance(e.filename, (str, bytes, os.PathLike)) else ""
    root = os.path.realpath(out)
    inside = name and os.path.commonpath([os.path.realpath(name), root]) == root
    return name if inside else out


if __name__ == "__main__":
    sys.exit(main())
