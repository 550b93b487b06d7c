"""index.bin: the binary, memory-mapped twin of a shard folder's index.jsonl (urfm_fast.data.shards).

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

    python -m urfm_fast.data.index_bin /data/us_shards   # writes or checks DIR/index.bin
"""

import hashlib
import logging
import os
import struct
import sys
import zlib

import numpy as np

from urfm_fast.data.shards import INDEX, is_shard_dir, read_index, read_marker

log = logging.getLogger(__name__)


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
        check = read_marker(root).get("key_check", "")
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

    ap = OneLineParser(prog="python -m urfm_fast.data.index_bin",
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
