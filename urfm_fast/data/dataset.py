"""What a data folder holds, as map-style datasets of uint8 grey images (item = uint8 tensor [1,H,W]).

- `ShardDataset(dir)`       pre-decoded shards written by `python -m urfm_fast.prepare` (fast path:
                            a memory-map read per image, no decoding).
- `ImageFolderDataset(dir)` PNG/JPEG/BMP/TIFF found recursively, decoded on the fly and resized to
                            a short side of 256; unreadable files are logged once, counted and replaced.

Plain classes (a DataLoader needs only ``__len__`` and ``__getitem__``) that import torch only when an item is
read, so the wing's face, ``from urfm_fast.data import ShardDataset``, costs prepare (torch-free) nothing.
"""

import logging
import os

import numpy as np

from urfm_fast.data import index_bin, shards
from urfm_fast.data.scan_region import load_image_grey8, resize_short
from urfm_fast.data.shards import IMAGE_EXTS

log = logging.getLogger(__name__)

_MAX_BAD_IN_A_ROW = 32  # an ImageFolderDataset gives up when this many files in a row are unreadable


class DataError(ValueError):
    """Unusable training data (missing/empty folder, nothing readable). The message is one line."""


class ShardDataset:
    """Images/frames of a shard folder from `python -m urfm_fast.prepare`; item = uint8 [1,H,W].

    The index (urfm_fast.data.shards) and the shards are opened as read-only memory maps, the shards
    lazily in each process (DataLoader workers included), so opening a folder of a million images
    parses nothing and pickling the dataset to workers never copies pixels or index entries."""

    def __init__(self, root):
        root = os.fspath(root)
        if not shards.is_shard_dir(root):
            raise DataError(
                f"{root} is not a shard folder (no {shards.MARKER}); run python -m urfm_fast.prepare"
            )
        if shards.parts_present(root):  # prepare --part runs not merged: the index is incomplete
            raise DataError(shards.unmerged_message(root))
        try:
            self.index = index_bin.open_index(root)  # structured RECORD [n]
        except index_bin.ShardIndexError as e:
            raise DataError(str(e)) from None
        if not len(self.index):
            raise DataError(f"shard folder {root} holds no images")
        self.root = root
        self._maps = {}

    def __len__(self):
        return len(self.index)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = {}  # memory maps are reopened in the receiving process
        if isinstance(self.index, np.memmap):
            state["index"] = len(self.index)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if isinstance(self.index, int):
            self.index = index_bin.reopen(self.root, self.index)

    def _map(self, k):
        m = self._maps.get(k)
        if m is None:
            m = np.memmap(shards.shard_path(self.root, k), dtype=np.uint8, mode="r")
            self._maps[k] = m
        return m

    def __getitem__(self, i):
        rec = self.index[i]
        h, w, o, k = int(rec["h"]), int(rec["w"]), int(rec["offset"]), int(rec["shard"])
        px = np.array(self._map(k)[o : o + h * w])  # copy out of the map
        if h <= 0 or w <= 0 or o < 0 or px.size != h * w:
            raise DataError(f"shard folder {self.root}: entry {i} lies outside shard {k}; the shards do not "
                            "match the index (copied in part?)")
        import torch  # here, not at the top: prepare imports this wing without torch

        return torch.from_numpy(px).view(1, h, w)


def find_images(root):
    """Sorted relative paths of PNG/JPEG/BMP/TIFF files under root (recursive, case-insensitive)."""
    out = []
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files):
            if f.lower().endswith(IMAGE_EXTS):
                out.append(os.path.relpath(os.path.join(d, f), root))
    return out


def _no_images_message(root: str, max_sniffed: int = 1000) -> str:
    """What to do with a folder without PNG/JPEG/BMP/TIFF: when it holds files that only prepare reads
    (DICOM, zip archives, video clips, volumes), the prepare command to run first."""
    import shlex

    from urfm_fast.data.media import MEDIA_EXTS
    from urfm_fast.data.sources import ARCHIVE_EXTS, DICOM_EXTS, is_dicom

    counts = {"DICOM": 0, "zip": 0, "video/volume": 0}
    sniffed = 0
    for d, _, files in os.walk(root):
        for f in files:
            name = f.lower()
            if name.endswith(DICOM_EXTS):
                counts["DICOM"] += 1
            elif name.endswith(ARCHIVE_EXTS):
                counts["zip"] += 1
            elif name.endswith(MEDIA_EXTS):
                counts["video/volume"] += 1
            elif sniffed < max_sniffed:  # DICOM files often have no suffix: their 'DICM' magic tells
                sniffed += 1
                counts["DICOM"] += is_dicom(os.path.join(d, f))
    found = ", ".join(f"{n} {kind} file{'s' if n > 1 else ''}" for kind, n in counts.items() if n)
    if not found:
        return f"no PNG/JPEG/BMP/TIFF images found under {root}"
    shards = os.path.normpath(root) + "_shards"
    return (f"{root} holds {found} and no PNG/JPEG/BMP/TIFF images: convert it to a shard folder first with "
            f"`python -m urfm_fast.prepare {shlex.quote(root)} --out {shlex.quote(shards)}`, then pass "
            f"--data {shlex.quote(shards)}")


class ImageFolderDataset:
    """PNG/JPEG/BMP/TIFF (8/16-bit, colour -> grey) under `root`, searched recursively, decoded on the
    fly and resized to `short_side`; item = uint8 [1,H,W].

    An unreadable file is logged once, counted in `.skipped` and replaced by the next readable one,
    so a run never stops on a bad file. (Counts made in DataLoader workers reach the main process
    through the train stream, which calls `note_bad`.)"""

    def __init__(self, root, short_side=256):
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise DataError(f"data folder {root} does not exist")
        self.root, self.short_side = root, short_side
        self.files = find_images(root)
        if not self.files:
            raise DataError(_no_images_message(root))
        self.bad = {}  # relative path -> reason, in this process

    def __len__(self):
        return len(self.files)

    @property
    def skipped(self):
        return len(self.bad)

    def load(self, i):
        """-> (uint8 [1,H,W], [(rel_path, reason), ...] of unreadable files met on the way)."""
        import torch  # (see ShardDataset.__getitem__)

        met = []
        for k in range(_MAX_BAD_IN_A_ROW):
            rel = self.files[(i + k) % len(self.files)]
            try:
                g = load_image_grey8(os.path.join(self.root, rel))
                g = resize_short(g, self.short_side)
                return torch.from_numpy(np.array(g, dtype=np.uint8)).unsqueeze(0), met  # writable copy
            except Exception as e:  # any decoder failure: skip the file, never stop the run
                met.append((rel, f"{type(e).__name__}: {e}"[:200]))
        raise DataError(
            f"{_MAX_BAD_IN_A_ROW} unreadable images in a row under {self.root}; is this an image folder?"
        )

    def note_bad(self, met):
        for rel, reason in met:
            if rel not in self.bad:
                self.bad[rel] = reason
                log.warning("skipping unreadable image %s (%s)", rel, reason)

    def __getitem__(self, i):
        img, met = self.load(i)
        self.note_bad(met)
        return img

    def summary(self):
        return f"{len(self.files)} images under {self.root}, {self.skipped} unreadable skipped"
