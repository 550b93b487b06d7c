"""The shard folder format that `urfm_fast.prepare` writes and `urfm_fast.data` reads.

File names (MARKER, INDEX, SKIPPED, SUMMARY, the shard subfolder), the image suffixes read as
plain images, where shard k lives, how the index is read (a torn last line is ignored), the
append-only shard writer and the JSON-lines helpers of the index and skip list."""

import json
import os

MARKER = "urfm_shards.json"
INDEX = "index.jsonl"
SKIPPED = "skipped.jsonl"
SUMMARY = "summary.json"
SHARD_DIR = "shards"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SHARD_BYTES = 1 << 30  # start a new shard file after ~1 GiB


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
