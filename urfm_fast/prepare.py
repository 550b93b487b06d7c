"""Placeholder; filled in below."""

import json
import os

import numpy as np
from PIL import Image

MARKER = "urfm_shards.json"  # {"format": "urfm-shards", "version": 1, "short_side": 256}
INDEX = "index.jsonl"  # one JSON object per image/frame, see read_index
SKIPPED = "skipped.jsonl"
SHARD_DIR = "shards"


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
