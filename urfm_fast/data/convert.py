"""Ultrasound archives -> a de-identified shard folder: the library half of `python -m urfm_fast.prepare`.

Reads PNG (8/16-bit), JPEG, BMP, TIFF and DICOM (pydicom 3: single- and multi-frame, decoded frame
by frame; MONOCHROME1/2, RGB, YBR_FULL(_422), PALETTE COLOR; JPEG baseline/lossless through Pillow
or the pylibjpeg plugins; DICOM files are recognised by content, with or without a .dcm suffix), and
with the media extra video clips (AVI/MP4/MOV/M4V) and NIfTI / MetaImage volumes (urfm_fast.data.media
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
Every image/frame becomes 8-bit grey (a DICOM through its window or VOI LUT, else one range per file
for all its frames: urfm_fast.data.dicom_grey), is cropped to the scan region, de-identified (burned-in text and
overlays blanked, urfm_fast.data.deid), resized to a fixed short side and appended
to memory-mappable shards (the files of the folder are listed in urfm_fast.data.shards).

Scan region: the DICOM Sequence of Ultrasound Regions (0018,6011) when present (union of the 2-D
regions); otherwise the largest connected bright blob after an opening that erases text and thin
lines (the fan or rectangle of live image), holes filled; pixels outside it (text, UI, calipers)
are blanked and the image is cropped to it. When nothing convincing is found the frame is kept whole.

Inside it (urfm_fast.data.deid): text boxes found by the PP-OCRv6 detection network, cine pixels that never
change (overlays), and in a region box small flat marks on black outside the scan hull are blanked.
DICOM with BurnedInAnnotation YES are cleaned and flagged (or left out with --burned-in skip); an image
whose text covers over 35 % of it is left out (skipped.jsonl gives the reason). Without the detector
prepare refuses to run.

Names: sources appear in every output only as `source_id` (a salted hash of the SRC folder name and
the relative path), so folder and file names (often patient names, dates, record numbers) never reach
the shard folder, the logs or the console. The salt is the folder's key and lives outside it: DIR.key
beside DIR (mode 0600) or --key FILE; share DIR, keep the key (and the --path-map, FILE outside DIR,
the id -> path table for whoever may hold it). A second run needs the key to recognise the files it
has done; without it it stops (exit 2) rather than add every file again under new ids. No DICOM header
value is written anywhere.

In parts, across a cluster: `--part K/N` prepares the files whose salted id is K-1 modulo N (the hash
balances the slices) into index part K (index.part-K-of-N.jsonl, its own shard numbers, its own lock),
so N machines can run at once against one shared --out (one key for all: the first creates DIR.key, or
give --key); `--merge` then joins the finished parts into index.jsonl and index.bin atomically (a
missing or unfinished part is named, never read). A folder with unmerged parts is refused by readers.

Resumable and idempotent: files already in the index (or in skipped.jsonl) are not read again, so a
second run adds only new files; a crash loses at most the file being written. A folder written
before names were hashed has its index and skip list rewritten with ids on the next run; one whose
salt is in its marker has it moved out to the key file (ids unchanged).

The shard format is owned by urfm_fast.data.shards, the scan region by urfm_fast.data.scan_region, finding
and decoding files (and the memory budgets) by urfm_fast.data.sources, source ids and the path map by
urfm_fast.data.source_ids, the review sheet by urfm_fast.data.review.
"""

import contextlib
import json
import multiprocessing as mp
import os
import signal
import sys
import time

from urfm_fast.data import deid, index_bin, media, shards
from urfm_fast.data.shards import INDEX, SKIPPED, ShardWriter, read_index, read_jsonl, write_jsonl
from urfm_fast.data.source_ids import (
    check_key_path,
    check_path_map,
    folder_salt,
    hash_old_names,
    source_id,
    write_path_map,
)
from urfm_fast.data.sources import (
    PrepareError,
    close_zips,
    process_file,
    quiet_decoders,
    read_source_list,
    walk_sources,
)

MEMORY_NOTE = (
    "Memory per worker is bounded: one decoded frame of at most 2^25 pixels (DICOM) or Pillow's "
    "decompression-bomb limit (images), its float copy, up to 256 MiB of resized frames of one file and a "
    "zip member of up to 64 MiB in memory: about 1.5 GiB at worst, ~100 MB for typical ultrasound; a volume "
    "adds its data, up to 512 MiB (refused from its header beyond that)."
)


def _open_out(out, short_side, part=None, key=None):
    """Create or join the shard folder and lock it for this run -> (locks, the folder's key). All of it
    happens under the folder's setup lock, so N prepares starting at once into one new folder share one
    marker and one key. part (K, N): one of N prepares writing into it at once (each its own lock,
    shards and index part)."""
    with contextlib.ExitStack() as undo:
        try:
            with shards.setup_locked(out):
                locks, meta = shards.join(out, short_side, part)
                undo.callback(locks.close)
                if meta.get("short_side") != short_side:
                    raise PrepareError(f"{out} holds images with short side {meta.get('short_side')}; use "
                                       f"--short-side {meta.get('short_side')} or another --out")
                salt = folder_salt(out, key, create=True)
        except shards.FolderError as e:
            raise PrepareError(str(e)) from None
        appended = shards.part_paths(out, *part)[:2] if part else (os.path.join(out, INDEX), os.path.join(out, SKIPPED))
        for p in appended:
            shards.cut_torn_line(p)
        if not _last_run_finished(out, part):
            shards.drop_last_source(appended[0])
        undo.pop_all()
    return locks, salt


def _last_run_finished(out, part):
    """Did the last run on this index end normally? Its end rewrites index.bin to match index.jsonl
    (plain) or writes the part's done record; a run killed, interrupted or out of disk did neither."""
    if part:
        return shards.part_is_done(out, *part) or not os.path.exists(shards.part_paths(out, *part)[0])
    index = os.path.join(out, INDEX)
    if not os.path.exists(index) or not os.path.getsize(index):
        return True
    try:
        found = index_bin.read_index_bin(out)
    except index_bin.ShardIndexError:
        return False
    return found is not None and found[1] == os.path.getsize(index)


def parse_part(text):
    """--part K/N -> (K, N), 1 <= K <= N <= 10000 (PrepareError: one line)."""
    k, _, n = str(text).partition("/")
    if not (k.strip().isdigit() and n.strip().isdigit() and 1 <= int(k) <= int(n) <= 10000):
        raise PrepareError(f"--part {text}: must be K/N with 1 <= K <= N <= 10000 (e.g. 3/8)")
    return int(k), int(n)


def merge(out, part=None):
    """Join the finished index parts of `out` (prepare --part) into its index -> (images added, parts).
    part (K, N): that part alone (a folder holding one part of a split across folders)."""
    if not shards.is_shard_dir(out):
        raise PrepareError(f"--out {out} is not a shard folder")
    try:
        with shards.lock_folder(out):  # exclusive: no part may still be writing
            merged = shards.merge_parts(out, shards.read_marker(out).get("short_side"), only=part)
            index_bin.write_index_bin(out)
            return merged
    except (shards.PartError, shards.FolderError) as e:
        raise PrepareError(str(e)) from None


def prepare(
    sources, out, *, short_side=256, frame_stride=1, workers=None, retry_skipped=False, progress=True,
    path_map=None, burned_in="clean", list_file=None, key=None, part=None,
):
    """Library entry of the CLI; returns the summary dict. Raises PrepareError on bad inputs.

    Sources are named in the outputs by `source_id` only; path_map (a file outside out) receives
    the id -> (src, path) table. burned_in: "clean" or "skip" for DICOM BurnedInAnnotation YES.
    list_file: more sources, one path per line or a CSV with a `path` column (read_source_list).
    key: the file holding the folder's key (default DIR.key beside out; never inside out).
    part (K, N): only the K-th of N slices of the files (by salted id), into index part K (then merge)."""
    check_options(short_side, frame_stride, workers)
    if burned_in not in ("clean", "skip"):
        raise PrepareError("--burned-in must be clean or skip")
    try:
        deid.check_detector()
    except deid.DetectorUnavailable as e:
        raise PrepareError(str(e)) from None
    path_map = os.fspath(path_map) if path_map else None
    known = check_path_map(path_map, out) if path_map else None
    if key is not None:
        check_key_path(os.fspath(key), out)
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
    lock, salt = _open_out(out, short_side, part, key)
    try:
        return _prepare_locked(files, out, salt, short_side, frame_stride, workers, retry_skipped, progress,
                               path_map, known, burned_in, (labels, origins), part)
    finally:
        lock.close()


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


def _prepare_locked(files, out, salt, short_side, frame_stride, workers, retry_skipped, progress, path_map, known,
                    burned_in, provenance, part=None):
    """prepare() with the inputs checked and the output folder locked. provenance: (label of each
    source, source position of each file) for the per-source summary."""
    if part is None and shards.parts_present(out):  # their files would be added again under the main index
        raise PrepareError(shards.unmerged_message(out))
    renamed = hash_old_names(out, salt) if part is None else _no_old_names(out)
    ids = [source_id(salt, s, rel) for s, rel, _, _ in files]
    labels, origins = provenance
    if part is not None:  # this part's slice: files whose salted id is K-1 modulo N (balanced by the hash)
        mine = [int(i, 16) % part[1] == part[0] - 1 for i in ids]
        files, ids, origins = ([x for x, m in zip(xs, mine) if m] for xs in (files, ids, origins))
    index_path, skipped_path = (shards.part_paths(out, *part)[:2] if part else
                                (os.path.join(out, INDEX), os.path.join(out, SKIPPED)))
    if known is not None:
        write_path_map(path_map, known, [(i, s, rel) for i, (s, rel, _, _) in zip(ids, files)] + renamed)
    done = {r["id"] for r in read_index(out)}
    if part is not None:  # the merged index and skip list, and this part's own
        done |= {r["id"] for r in read_jsonl(os.path.join(out, SKIPPED))} | {r["id"] for r in read_jsonl(index_path)}
    old_skips = read_jsonl(skipped_path)
    if retry_skipped:  # forget old skips; they are listed again if they fail again
        write_jsonl(skipped_path, [r for r in old_skips if r["id"] in done])
    else:
        done |= {r["id"] for r in old_skips}
    todo = [(i, rel, p, m) for i, (_, rel, p, m) in zip(ids, files) if i not in done]
    per_source = _source_table(ids, done, labels, origins)
    origin_of = dict(zip(ids, origins))
    counts = {"files_seen": len(files), "files_already_done": len(files) - len(todo), "files_added": 0,
              "images_added": 0, "files_skipped": 0, "skip_reasons": {}, "crop": {},
              "images_blanked": 0, "burned_in_cleaned": 0, "frames_duplicate": 0}
    t0 = time.time()
    writer = ShardWriter(out, part)
    jobs = [(p, m, rel, short_side, frame_stride) for _, rel, p, m in todo]
    close_zips()  # no open archive may be shared with the workers
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    with open(index_path, "a", encoding="utf-8") as index, open(skipped_path, "a", encoding="utf-8") as skipped:
        if workers == 1:
            quiet_decoders(burned_in)
            results = map(_timed_process, jobs)
            pool = None
        else:
            # forkserver: workers are forked from a clean single-threaded server, never from this process,
            # whose decoder threads (PyAV's scaler, onnxruntime) a forked child would wait on forever.
            # The server imports this module once; no torch is imported on this path.
            method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
            ctx = mp.get_context(method)
            if method == "forkserver":
                ctx.set_forkserver_preload([__name__])
            pool = ctx.Pool(workers, initializer=start_worker, initargs=(burned_in, os.getpid()))
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
            close_zips()
            if pool is not None:
                pool.terminate()
    _finish_index(out, counts, part, short_side)
    counts["seconds"] = round(time.time() - t0, 2)
    for row in per_source:
        row["seconds"] = round(row["seconds"], 2)
    counts["sources"] = per_source
    shards.write_summary(out, counts, part)
    return counts


def _no_old_names(out):
    """--part needs a folder whose index names sources by id (parts cannot rewrite the shared index)."""
    if any("path" in r for r in read_index(out)[:1]):
        raise PrepareError(f"{out} was written before names were hashed: run one prepare without --part on it first")
    return []


def _finish_index(out, counts, part, short_side):
    """After the files: index.bin (or, for a part, its done record) and the totals of the summary."""
    if part is None:
        jsonl_bytes = os.path.getsize(os.path.join(out, INDEX))
        records = read_index(out)
        counts["images_total"] = len(records)
        index_bin.write_index_bin(out, records, jsonl_bytes)  # what every rank memory-maps
        counts["files_skipped_total"] = len(read_jsonl(os.path.join(out, SKIPPED)))
        return
    index_path, skipped_path, _ = shards.part_paths(out, *part)
    shards.write_part_done(out, *part, short_side)
    counts["part"] = list(part)
    counts["images_total"] = len(read_index(out)) + len(read_jsonl(index_path))
    counts["files_skipped_total"] = len(read_jsonl(os.path.join(out, SKIPPED))) + len(read_jsonl(skipped_path))


def start_worker(burned_in, prepare_pid):
    """A decoding worker's set-up: it dies with its parent, the fork server, which ends with the prepare
    that started it (a killed prepare must not leave orphans that keep decoding and printing), then
    quiet_decoders. Ctrl-C is the prepare's to handle: it ends the pool."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        try:
            os.kill(prepare_pid, 0)
        except ProcessLookupError:  # the prepare died before prctl took effect
            os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stderr = open(os.devnull, "w")  # errors reach the prepare through the pool; a dying pool says nothing
    quiet_decoders(burned_in)


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
    if c.get("part"):
        k, n = c["part"]
        lines.append(f"  part {k}/{n} done: its images join the index when every part is done and "
                     f"python -m urfm_fast.prepare --out {out} --merge has run")
    if c["images_added"]:
        lines.append(f"  text/overlays blanked inside the scan region in {c['images_blanked']} images; "
                     f"{c['burned_in_cleaned']} files flagged BurnedInAnnotation YES cleaned")
    return "\n".join(lines)

