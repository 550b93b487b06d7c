"""The shard folder: the one module that owns its format, written by `urfm_fast.prepare`, read by
`urfm_fast.data.stream`.

A shard folder holds MARKER (urfm_shards.json), the shards (append-only uint8 pixel files), the index
(index.jsonl, one record per image, the source of truth) and its binary twin index.bin, the skip list
and the summary. This module has the file names, the shard writer, the JSON-lines helpers, and the
reading and writing of both index files.

index.bin
---------
The binary, memory-mapped twin of ``index.jsonl``.

Parsing ``index.jsonl`` costs ~9 s and gigabytes of Python objects per million images, in every rank.
``index.bin`` holds the same entries as fixed-width little-endian records behind a 64-byte header, so a
rank opens it as a numpy memory map: the header is read, the records' CRC32 checked (one pass at
memory speed, ~20 ms per million) and nothing is parsed; entries are read when a sample is drawn.

    header  magic b"URFMIDX1", record bytes (u4), pad (u4), count (u8), size in bytes of the
            index.jsonl it was built from (u8), CRC32 of the records (u4), CRC32 of the header
            bytes before it (u4), zero padding to 64 bytes
    record  RECORD below, 40 bytes: offset, shard, h, w (where the uint8 pixels are), frame, the
            salted source id as two integers (8 + 16 hex digits of the id; 0 in folders written
            before names were hashed: no name ever enters this file) and flags (burned_in, blanked)

``index.jsonl`` stays the source of truth, for people and tools (the review sheet, labels named by
path, prepare's resume bookkeeping). ``prepare`` rewrites ``index.bin`` at the end of every run;
a reader finding it missing or stale (the jsonl's size differs: a crash mid-run, a folder from an
older version) or damaged (bad magic, size or CRC: one warning) rebuilds it from the jsonl, written
to a temporary file and renamed into place, only when the folder is writable; otherwise it uses
the entries parsed from the jsonl for this run. A folder holding ``index.bin`` alone is read from it.

Before many ranks open a folder written by an older version (each would parse the jsonl once):

    python -m urfm_fast.data.shards /data/us_shards   # writes or checks DIR/index.bin
                                                     # (the older spelling python -m urfm_fast.shard_index works too)
"""

import hashlib
import json
import logging
import os
import struct
import sys
import zlib

import numpy as np

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
    """Appends images to new shard files (never rewrites an existing one). part (K, N): only shard
    numbers congruent to K-1 modulo N, so N parts writing into one folder at once never meet."""

    def __init__(self, out, part=None):
        self.out = out
        existing = [int(f[6:11]) for f in os.listdir(os.path.join(out, SHARD_DIR)) if f.startswith("shard-")]
        top = max(existing, default=-1)
        self.step = part[1] if part else 1
        # the number before this writer's first: above every shard there now, in this part's residue class
        self.k = top if part is None else top + 1 + ((part[0] - 1 - top - 1) % part[1]) - part[1]
        self.f = None

    def write(self, data):
        """-> (shard number, byte offset) of data."""
        if self.f is None or self.f.tell() >= SHARD_BYTES:
            if self.f is not None:
                self.f.close()
            self.k += self.step
            self.f = open(shard_path(self.out, self.k), "xb")
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

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Index parts: prepare --part K/N on many machines, then --merge


class PartError(ValueError):
    """Index parts that cannot be merged (missing, unfinished, of another split); one line."""


def part_name(k, n):
    return f"part-{k:04d}-of-{n:04d}"


def part_paths(root, k, n):
    """-> (index part, skip-list part, done record) of part k of n: the only files that part writes
    besides its own shards (prepare --part)."""
    name = part_name(k, n)
    return tuple(os.path.join(root, f) for f in (f"index.{name}.jsonl", f"skipped.{name}.jsonl", f"index.{name}.done"))


def parts_present(root):
    """Sorted (k, n) of the index parts found in root (by their index or done files)."""
    found = set()
    for f in os.listdir(root):
        if f.startswith("index.part-") and f.endswith((".jsonl", ".done")):
            k, n = f[len("index.part-"):].split(".")[0].split("-of-")
            if k.isdigit() and n.isdigit():
                found.add((int(k), int(n)))
    return sorted(found)


def unmerged_message(root):
    names = ", ".join(os.path.basename(part_paths(root, k, n)[0]) for k, n in parts_present(root))
    return (f"{root} holds index parts not merged yet ({names}): when every part is done, run "
            f"python -m urfm_fast.prepare --out {root} --merge")


def write_part_done(root, k, n, short_side):
    """Part k of n finished: record the sizes of its files (a merge reads a part only when they match)."""
    index, skipped, done = part_paths(root, k, n)
    sizes = {"index_bytes": os.path.getsize(index), "skipped_bytes": os.path.getsize(skipped)}
    tmp = f"{done}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"part": k, "of": n, "short_side": short_side, **sizes}, f)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, done)


def _finished_part(root, k, n, short_side):
    """The index and skip-list rows of part k of n; PartError naming the part's file when it is missing,
    unfinished (no done record, or its files changed since) or prepared with another --short-side."""
    index, skipped, done = part_paths(root, k, n)
    shown = os.path.basename(index)
    if not os.path.exists(index):
        raise PartError(f"{root}: {shown} is missing: run prepare --part {k}/{n} into this folder first")
    try:
        with open(done) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        raise PartError(f"{root}: {shown} is unfinished (its prepare --part {k}/{n} is still running or was cut "
                        "short): run that part again, then merge") from None
    if rec.get("index_bytes") != os.path.getsize(index) or rec.get("skipped_bytes") != _size(skipped):
        raise PartError(f"{root}: {shown} changed after its prepare --part {k}/{n} finished: run that part again")
    if rec.get("short_side") != short_side:
        raise PartError(f"{root}: {shown} was prepared with --short-side {rec.get('short_side')}, the folder with "
                        f"{short_side}: prepare that part again with --short-side {short_side}")
    return _read_jsonl(index), _read_jsonl(skipped)


def _size(p):
    return os.path.getsize(p) if os.path.exists(p) else 0


def _fsync_jsonl(p, rows):
    tmp = f"{p}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


def merge_parts(root, short_side, only=None):
    """Join the index parts of root into index.jsonl, skipped.jsonl and index.bin, then delete them.

    Every part 1..N of the split found must be finished (only=(K, N): that part alone, for a folder
    that holds one part of a split across folders). Rows already in the index (a merge cut short after
    its rename) are not added twice. The caller holds the folder's lock. -> (images added, parts)."""
    parts = [only] if only else parts_present(root)
    if not parts:
        raise PartError(f"{root} holds no index parts to merge")
    splits = sorted({n for _, n in parts})
    if len(splits) > 1:
        raise PartError(f"{root} holds parts of splits into {' and '.join(map(str, splits))}; prepare all parts "
                        "with the same --part K/N")
    n = splits[0]
    want = [only] if only else [(k, n) for k in range(1, n + 1)]
    got = [_finished_part(root, k, n, short_side) for k, n in want]  # every part checked before a byte is written
    index, skipped = read_index(root), _read_jsonl(os.path.join(root, SKIPPED))
    have = {(r["shard"], r["offset"]) for r in index}
    have_skip = {r["id"] for r in skipped}
    added = [r for rows, _ in got for r in rows if (r["shard"], r["offset"]) not in have]
    skipped += [r for _, rows in got for r in rows if r["id"] not in have_skip]
    _fsync_jsonl(os.path.join(root, SKIPPED), skipped)
    _fsync_jsonl(os.path.join(root, INDEX), index + added)  # the index last: readers see all or nothing
    write_index_bin(root)
    for k, n in want:
        for p in part_paths(root, k, n):
            if os.path.exists(p):
                os.remove(p)
    return len(added), want

INDEX_BIN = "index.bin"
MAGIC = b"URFMIDX1"
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQQI")  # magic, record bytes, pad, count, jsonl bytes, records CRC32
RECORD = np.dtype([("offset", "<i8"), ("path_id", "<u8"), ("src_id", "<u4"), ("shard", "<i4"), ("h", "<i4"),
                   ("w", "<i4"), ("frame", "<i4"), ("flags", "<u4")])
BURNED_IN, BLANKED = 1, 2  # flags bits


class ShardIndexError(ValueError):
    """A damaged index.bin with no index.jsonl to rebuild it from (the message is one line)."""


def records_to_array(records):
    """index.jsonl records (dicts) -> structured array of RECORD."""
    arr = np.zeros(len(records), dtype=RECORD)
    if not records:
        return arr
    ids = [r.get("id", "") for r in records]
    arr["offset"] = [r["offset"] for r in records]
    arr["shard"] = [r["shard"] for r in records]
    arr["h"] = [r["h"] for r in records]
    arr["w"] = [r["w"] for r in records]
    arr["frame"] = [r.get("frame", 0) for r in records]
    arr["src_id"] = [int(i[:8], 16) if len(i) == 24 else 0 for i in ids]
    arr["path_id"] = [int(i[8:], 16) if len(i) == 24 else 0 for i in ids]
    arr["flags"] = [BURNED_IN * bool(r.get("burned_in")) | BLANKED * bool(r.get("blank")) for r in records]
    return arr


def _header(count, jsonl_bytes, crc):
    head = _HEADER.pack(MAGIC, RECORD.itemsize, 0, count, jsonl_bytes, crc)
    head += struct.pack("<I", zlib.crc32(head))
    return head.ljust(HEADER_BYTES, b"\0")


def write_index_bin(root, records=None, jsonl_bytes=None):
    """Write root/index.bin from records (default: parsed from root/index.jsonl) atomically: a
    temporary file of this process, fsynced, then renamed over the old one."""
    if records is None:
        jsonl_bytes = _jsonl_bytes(root)
        records = read_index(root)
    arr = np.ascontiguousarray(records_to_array(records) if isinstance(records, list) else records, RECORD)
    data = memoryview(arr).cast("B")
    path = os.path.join(root, INDEX_BIN)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(_header(len(arr), jsonl_bytes or 0, zlib.crc32(data)))
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _jsonl_bytes(root):
    try:
        return os.path.getsize(os.path.join(root, INDEX))
    except OSError:
        return None


def read_index_bin(root):
    """-> (read-only memory map of RECORD [count], jsonl bytes it was built from), or None when root
    has no index.bin. Raises ShardIndexError naming what is wrong with a damaged one."""
    path = os.path.join(root, INDEX_BIN)
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return None
    if len(head) < HEADER_BYTES or head[:8] != MAGIC:
        raise ShardIndexError(f"{INDEX_BIN} is not a shard index (bad header)")
    magic, rec_bytes, _, count, jsonl_bytes, crc = _HEADER.unpack_from(head)
    (head_crc,) = struct.unpack_from("<I", head, _HEADER.size)
    if head_crc != zlib.crc32(head[:_HEADER.size]) or rec_bytes != RECORD.itemsize:
        raise ShardIndexError(f"{INDEX_BIN} has a damaged header or an unknown record layout")
    if size != HEADER_BYTES + count * RECORD.itemsize:
        raise ShardIndexError(f"{INDEX_BIN} is truncated or padded ({size} bytes for {count} entries)")
    if count == 0:
        return np.zeros(0, RECORD), jsonl_bytes
    arr = np.memmap(path, dtype=RECORD, mode="r", offset=HEADER_BYTES, shape=(count,))
    if zlib.crc32(memoryview(arr).cast("B")) != crc:
        raise ShardIndexError(f"{INDEX_BIN} is damaged (its entries fail their checksum)")
    return arr, jsonl_bytes


def open_index(root):
    """The entries of a shard folder as a structured array of RECORD: index.bin memory-mapped when it
    is intact and matches index.jsonl, else rebuilt from index.jsonl (and saved when the folder is
    writable). Raises ShardIndexError only when index.bin is damaged and there is no index.jsonl."""
    root = os.fspath(root)
    jsonl_bytes = _jsonl_bytes(root)
    try:
        found = read_index_bin(root)
    except ShardIndexError as e:
        if jsonl_bytes is None:
            raise ShardIndexError(f"shard folder {root}: {e}, and there is no {INDEX} to rebuild it from") from None
        log.warning("shard folder %s: %s; reading %s instead", root, e, INDEX)
        found = None
    if found is not None and (jsonl_bytes is None or found[1] == jsonl_bytes):
        return found[0]
    records = read_index(root)
    arr = records_to_array(records)
    if os.access(root, os.W_OK):
        try:
            write_index_bin(root, arr, jsonl_bytes)
            log.info("shard folder %s: wrote %s (%d entries) from %s", root, INDEX_BIN, len(arr), INDEX)
        except OSError as e:  # a full disk: this run still has the parsed entries
            log.warning("shard folder %s: cannot write %s (%s)", root, INDEX_BIN, e.strerror or e)
    return arr


def folder_id(root):
    """A salted id of a shard folder and its content (config.json of a run names its folders by it): 16 hex
    digits hashing the marker's key check (made from the folder's key) with the count and checksum of the
    index.bin entries; None when there is no readable index.bin."""

    try:
        with open(os.path.join(root, MARKER)) as f:
            check = json.load(f).get("key_check", "")
        with open(os.path.join(root, INDEX_BIN), "rb") as f:
            _, _, _, count, _, crc = _HEADER.unpack_from(f.read(HEADER_BYTES))
    except (OSError, ValueError, struct.error):
        return None
    return hashlib.sha256(f"{check}:{count}:{crc:08x}".encode()).hexdigest()[:16]


def reopen(root, count):
    """index.bin's records again as a memory map (in a DataLoader worker), as open_index left it."""
    return np.memmap(os.path.join(root, INDEX_BIN), dtype=RECORD, mode="r", offset=HEADER_BYTES, shape=(count,))


def main(argv=None):
    from urfm_fast.cli_checks import OneLineParser

    ap = OneLineParser(prog="python -m urfm_fast.data.shards",
                       description="Write (or check) the memory-mapped index.bin of a shard folder.")
    ap.add_argument("dir", help="a shard folder written by python -m urfm_fast.prepare")
    root = ap.parse_args(argv).dir
    if not is_shard_dir(root):
        print(f"error: {root} is not a shard folder (run python -m urfm_fast.prepare)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        n = len(open_index(root))
        found = read_index_bin(root)
    except (ShardIndexError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if found is None or len(found[0]) != n:
        print(f"error: {root}: cannot write {INDEX_BIN} there (read-only?)", file=sys.stderr)
        return 2
    print(f"{root}: {INDEX_BIN} holds all {n} entries of {INDEX}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
