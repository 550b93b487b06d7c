"""The shard folder: the one module that names, writes and reads every file in it (written by
urfm_fast.data.convert for `python -m urfm_fast.prepare`, read by urfm_fast.data.stream):

    DIR/urfm_shards.json   format marker, the short side and a check of the key (never the key itself)
    DIR/shards/shard-NNNNN.bin   raw uint8 pixels, row-major, images back to back (append-only)
    DIR/index.jsonl        one line per image: shard, offset, h, w, id, frame, crop, roi (crop box in
                           the source frame), blank (boxes blanked inside it, output pixels), burned_in;
                           the source of truth
    DIR/index.bin          its fixed-width binary twin, memory-mapped by training (below)
    DIR/skipped.jsonl      one line per file or archive member left out: id, reason
    DIR/summary.json       counts of the last run, in total and per source (by position, never by path)
    DIR/review.png, review-LINE.png   the review sheet and single images at full size (data/review.py)
    DIR/index.part-K-of-N.jsonl, skipped.part-K-of-N.jsonl, index.part-K-of-N.done
                           with --part K/N: the part's index, skip list and done record, until --merge;
                           summary.part-K-of-N.json its counts
    DIR/.prepare.lock, .prepare.lock.setup, .prepare.lock.part-K-of-N   flock files (never stale:
                           the kernel drops a lock with its process)
    DIR.key                beside DIR, not in it (or --key FILE): the key of the source ids, mode 0600
                           (urfm_fast.data.source_ids)

index.bin, the memory-mapped twin of index.jsonl, has its own module: urfm_fast.data.index_bin.

"""

import contextlib
import fcntl
import json
import os

import numpy as np

MARKER = "urfm_shards.json"
INDEX = "index.jsonl"
SKIPPED = "skipped.jsonl"
SUMMARY = "summary.json"
SHARD_DIR = "shards"
REVIEW = "review.png"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SHARD_BYTES = 1 << 30  # start a new shard file after ~1 GiB


LOCK = ".prepare.lock"  # the folder's lock: exclusive for a plain prepare or a merge, shared by --part runs
SETUP_LOCK = LOCK + ".setup"  # held only while a prepare creates or joins the folder


def shard_path(root, k):
    return os.path.join(root, SHARD_DIR, f"shard-{k:05d}.bin")


# ---------------------------------------------------------------------------------------------
# Creating and joining a folder: any number of prepares may start at once on one new --out


class FolderError(ValueError):
    """--out cannot be used as a shard folder, or another prepare holds it (one line)."""


def check_out(out):
    """Refuse an --out that is a file, or a folder holding files that are not a shard folder's. What a
    prepare leaves in a new folder before its marker exists (locks, the marker's temporary file) is ours."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise FolderError(f"--out {out} exists and is not a folder")
    if os.path.isdir(out) and not is_shard_dir(out) and [f for f in os.listdir(out) if not _before_marker(f)]:
        raise FolderError(f"--out {out} is not empty and not a shard folder; choose an empty or new folder")


def _before_marker(name):
    return name.startswith(LOCK) or name.startswith(MARKER + ".tmp")


@contextlib.contextmanager
def setup_locked(out):
    """Hold `out`'s setup lock (creating the folder): creating or joining a shard folder, and its key,
    is one step against any number of prepares (plain or --part) starting at once, so each sees the
    folder either absent or whole. Refuses (FolderError) a file, or a folder that is not ours."""
    check_out(out)  # before anything is written into a folder that may not be ours
    os.makedirs(out, exist_ok=True)
    with _flock(os.path.join(out, SETUP_LOCK), fcntl.LOCK_EX):
        check_out(out)  # again: no other prepare is half-way through creating it now
        yield


def join(out, short_side, part=None):
    """Under setup_locked: lock `out` for this run and create what a new folder lacks -> (its locks,
    its marker). The locks (an ExitStack) are released when the process ends, however it ends."""
    locks = lock_folder(out, part)
    try:
        meta = _create_marker(out, short_side)
        os.makedirs(os.path.join(out, SHARD_DIR), exist_ok=True)
    except BaseException:
        locks.close()
        raise
    return locks, meta


def _create_marker(out, short_side):
    """The folder's marker, written whole first (a crash before the rename leaves only a temporary
    file, removed here next time) -> its contents."""
    mpath = os.path.join(out, MARKER)
    for f in os.listdir(out):
        if f.startswith(MARKER + ".tmp"):
            os.remove(os.path.join(out, f))
    if not os.path.exists(mpath):
        write_marker(out, {"format": "urfm-shards", "version": 1, "short_side": short_side})
    return read_marker(out)


def read_marker(out):
    with open(os.path.join(out, MARKER), encoding="utf-8") as f:
        return json.load(f)


def write_marker(out, meta):
    """Replace the marker atomically (tmp + fsync + rename): readers see the old or the new one whole."""
    mpath = os.path.join(out, MARKER)
    tmp = f"{mpath}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, mpath)


def lock_folder(out, part=None):
    """The locks of one run on `out`: two runs appending to one index would interleave and duplicate
    images. Plain (and merge): the folder's lock, exclusive. part (K, N): the folder's lock shared with
    the other parts, and part K's own exclusively. FolderError (one line) when one is held."""
    locks = contextlib.ExitStack()
    wanted = [(LOCK, fcntl.LOCK_SH if part else fcntl.LOCK_EX, "another prepare")]
    if part:
        wanted.append((part_lock(*part), fcntl.LOCK_EX, f"another prepare --part {part[0]}/{part[1]}"))
    for name, mode, who in wanted:
        try:
            locks.enter_context(_flock(os.path.join(out, name), mode | fcntl.LOCK_NB))
        except BlockingIOError:
            locks.close()
            raise FolderError(f"{who} is writing to {out} (its lock {name} is held); wait for it to finish or "
                              "choose another --out") from None
    return locks


def part_lock(k, n):
    return f"{LOCK}.{part_name(k, n)}"


@contextlib.contextmanager
def _flock(path, mode):
    """flock on `path` (created if absent). The descriptor is close-on-exec and prepare's workers come
    from a fork server, so no other process holds it: a killed prepare never leaves its lock held."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, mode)
        yield fd
    finally:
        os.close(fd)


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


class ShardWriter:
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


def read_jsonl(p):
    if not os.path.exists(p):
        return []
    with open(p, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def write_jsonl(p, rows):
    tmp = p + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, p)

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
    rec = _done_record(done)
    if rec is None:
        raise PartError(f"{root}: {shown} is unfinished (its prepare --part {k}/{n} is still running or was cut "
                        "short): run that part again, then merge")
    if not _sizes_match(rec, index, skipped):
        raise PartError(f"{root}: {shown} changed after its prepare --part {k}/{n} finished: run that part again")
    if rec.get("short_side") != short_side:
        raise PartError(f"{root}: {shown} was prepared with --short-side {rec.get('short_side')}, the folder with "
                        f"{short_side}: prepare that part again with --short-side {short_side}")
    return read_jsonl(index), read_jsonl(skipped)


def review_name(line):
    """The full-size review image of index line `line` (prepare --show)."""
    return f"review-{line}.png"


def write_summary(root, counts, part=None):
    """The counts of one run: SUMMARY, or summary.part-K-of-N.json for part (K, N)."""
    name = SUMMARY if part is None else f"summary.{part_name(*part)}.json"
    tmp = os.path.join(root, f"{name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(counts, f, indent=1)
        f.write("\n")
    os.replace(tmp, os.path.join(root, name))


def read_image(root, maps, r):
    """uint8 [h,w] of one index record (its shard file memory-mapped once, kept in maps)."""
    m = maps.get(r["shard"])
    if m is None:
        m = maps[r["shard"]] = np.memmap(shard_path(root, r["shard"]), dtype=np.uint8, mode="r")
    return np.array(m[r["offset"]:r["offset"] + r["h"] * r["w"]]).reshape(r["h"], r["w"])


def cut_torn_line(p):
    """A crash mid-line leaves a torn last line in an append-only JSON-lines file: cut it before appending."""
    if os.path.exists(p):
        with open(p, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)


def drop_last_source(p, tail=1 << 23):
    """Cut the lines of the last source file from an index (or index part) whose run did not finish.
    A file's lines are appended in one write, but a process killed inside that write can leave the
    first lines of a multi-frame file only, and the file would count as done; the rerun reads it again.
    Looks at the last `tail` bytes (a file's lines are far fewer)."""
    if not os.path.exists(p):
        return
    with open(p, "rb+") as f:
        start = max(0, f.seek(0, os.SEEK_END) - tail)
        f.seek(start)
        lines = f.read().split(b"\n")[:-1]  # whole lines only: the torn one is cut already
        if start:
            lines = lines[1:]  # the first may be the end of a line that began before the tail
        if not lines:
            return
        name = _source_of(lines[-1])
        k = len(lines)
        while k and _source_of(lines[k - 1]) == name:
            k -= 1
        f.truncate(f.tell() - sum(len(line) + 1 for line in lines[k:]))


def _source_of(line):
    r = json.loads(line)
    return r.get("id") or (r.get("src"), r.get("path"))  # by id, or by name in folders from before ids


def part_is_done(root, k, n):
    """True when part k of n finished and its files are as it left them (its done record matches)."""
    index, skipped, done = part_paths(root, k, n)
    rec = _done_record(done)
    return rec is not None and _sizes_match(rec, index, skipped)


def _done_record(done):
    try:
        with open(done) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _sizes_match(rec, index, skipped):
    return rec.get("index_bytes") == _size(index) and rec.get("skipped_bytes") == _size(skipped)


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
    """Join the index parts of root into index.jsonl and skipped.jsonl, then delete them (the caller
    then rewrites index.bin).

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
    index, skipped = read_index(root), read_jsonl(os.path.join(root, SKIPPED))
    have = {(r["shard"], r["offset"]) for r in index}
    have_skip = {r["id"] for r in skipped}
    added = [r for rows, _ in got for r in rows if (r["shard"], r["offset"]) not in have]
    skipped += [r for _, rows in got for r in rows if r["id"] not in have_skip]
    _fsync_jsonl(os.path.join(root, SKIPPED), skipped)
    _fsync_jsonl(os.path.join(root, INDEX), index + added)  # the index last: readers see all or nothing
    for k, n in want:  # no part of these can be running: the caller holds the folder's lock
        for p in (*part_paths(root, k, n), os.path.join(root, part_lock(k, n))):
            if os.path.exists(p):
                os.remove(p)
    return len(added), want
