"""`python -m urfm_fast.prepare SRC [SRC ...] [--list FILE] --out DIR`: ultrasound archives -> uint8 shards.

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
overlays blanked, urfm_fast.data.deid), resized to a fixed short side and appended to memory-mappable shards:

    DIR/urfm_shards.json   format marker, the short side and a check of the key (never the key itself)
    DIR/shards/shard-NNNNN.bin   raw uint8 pixels, row-major, images back to back
    DIR/index.jsonl        one line per image: shard, offset, h, w, id, frame, crop, roi (crop box in
                           the source frame), blank (boxes blanked inside it, output pixels), burned_in
    DIR/index.bin          the same entries (no boxes) as fixed-width binary records that the training
                           data stream memory-maps (urfm_fast.data.shards), rewritten at each run's end
    DIR/skipped.jsonl      one line per file or archive member left out: id, reason
    DIR/summary.json       counts of the last run, in total and per source (by position, never by path)
    DIR/review.png         with --review N: N random images, blanked areas outlined
    DIR/index.part-K-of-N.jsonl, skipped.part-K-of-N.jsonl, index.part-K-of-N.done
                           with --part K/N: the part's index, skip list and done record, until --merge;
                           summary.part-K-of-N.json its counts
    DIR.key                beside DIR, not in it (or --key FILE): the key of the source ids, mode 0600

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

This module holds the pipeline and the CLI; the shard format is in urfm_fast.data.shards, the scan region
in urfm_fast.data.scan_region, finding and decoding files (and the memory budgets) in urfm_fast.data.sources,
source ids and the path map in urfm_fast.data.source_ids. Their names stay importable from here.

    python -m urfm_fast.prepare /data/us_archive --out /data/us_shards
    python -m urfm_fast.prepare /data/cines.zip /data/more_scans --out /data/us_shards
    python -m urfm_fast.pretrain --data /data/us_shards
"""

import json
import math
import multiprocessing as mp
import os
import random
import sys
import time

import numpy as np
from PIL import Image, ImageDraw

from urfm_fast.data import deid, media, shards, sources

# Re-exported so the old import paths keep working; the budgets are read in data/sources.py (patch them there).
from urfm_fast.data.scan_region import (  # noqa: F401 (re-exported)
    DUPLICATE_MAD,
    crop_to_mask,
    detect_scan_region,
    load_image_grey8,
    near_duplicate,
    region_box,
    resize_short,
    to_grey8,
)
from urfm_fast.data.shards import (  # noqa: F401 (re-exported)
    IMAGE_EXTS,
    INDEX,
    MARKER,
    SHARD_BYTES,
    SHARD_DIR,
    SKIPPED,
    SUMMARY,
    _read_jsonl,
    _ShardWriter,
    _write_jsonl,
    is_shard_dir,
    read_index,
    shard_path,
)
from urfm_fast.data.source_ids import (  # noqa: F401 (re-exported)
    _check_path_map,
    _hash_old_names,
    _write_path_map,
    check_key_path,
    folder_salt,
    path_lookup,
    record_source,
    source_id,
)
from urfm_fast.data.sources import (  # noqa: F401 (re-exported)
    MAX_FRAME_PIXELS,
    MAX_OUTPUT_BYTES,
    PrepareError,
    _close_zips,
    _open_regular,
    _OverBudget,
    _quiet_worker,
    is_dicom,
    process_file,
    read_dicom_file,
    read_image_file,
    read_media_file,
    read_source_list,
    scrub_names,
    walk_sources,
)

REVIEW = "review.png"
LOCK = ".prepare.lock"


MEMORY_NOTE = (
    "Memory per worker is bounded: one decoded frame of at most 2^25 pixels (DICOM) or Pillow's "
    "decompression-bomb limit (images), its float copy, up to 256 MiB of resized frames of one file and a "
    "zip member of up to 64 MiB in memory: about 1.5 GiB at worst, ~100 MB for typical ultrasound; a volume "
    "adds its data, up to 512 MiB (refused from its header beyond that)."
)


def _open_out(out, short_side, part=None):
    """Create or reopen the shard folder; refuse a non-empty folder that is not ours. part (K, N): one
    of N prepares writing into it at once (each its own lock, shards and index part)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise PrepareError(f"--out {out} exists and is not a folder")
    if os.path.isdir(out) and [f for f in os.listdir(out) if not f.startswith(LOCK)] and not is_shard_dir(out):
        raise PrepareError(f"--out {out} is not empty and not a shard folder; choose an empty or new folder")
    os.makedirs(out, exist_ok=True)
    lock = _lock(out, part)  # before anything else is written
    os.makedirs(os.path.join(out, SHARD_DIR), exist_ok=True)
    mpath = os.path.join(out, MARKER)
    if not os.path.exists(mpath):  # created whole or not at all: a part beside us may be creating it too
        tmp = f"{mpath}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"format": "urfm-shards", "version": 1, "short_side": short_side}, f)
            f.write("\n")
        try:
            os.link(tmp, mpath)
        except FileExistsError:
            pass
        finally:
            os.remove(tmp)
    with open(mpath) as f:
        meta = json.load(f)
    if meta.get("short_side") != short_side:
        lock.close()
        raise PrepareError(
            f"{out} holds images with short side {meta.get('short_side')}; use --short-side "
            f"{meta.get('short_side')} or another --out"
        )
    # A crash mid-line leaves a torn last line: cut it before appending (to the files this run appends to).
    for p in shards.part_paths(out, *part)[:2] if part else (os.path.join(out, INDEX), os.path.join(out, SKIPPED)):
        if os.path.exists(p):
            with open(p, "rb+") as f:
                data = f.read()
                if data and not data.endswith(b"\n"):
                    f.truncate(data.rfind(b"\n") + 1)
    return lock


def _lock(out, part=None):
    """An exclusive lock on the shard folder for this run: two runs appending to one index would
    interleave and duplicate images. Released when the process ends, however it ends. part (K, N): the
    folder's lock shared with the other parts, and an exclusive one of part K's own."""
    import contextlib
    import fcntl

    locks = contextlib.ExitStack()
    for name, mode, who in [(LOCK, fcntl.LOCK_SH if part else fcntl.LOCK_EX, "another prepare")] + (
            [(f"{LOCK}.{shards.part_name(*part)}", fcntl.LOCK_EX, f"another prepare --part {part[0]}/{part[1]}")]
            if part else []):
        f = locks.enter_context(open(os.path.join(out, name), "a"))
        try:
            fcntl.flock(f, mode | fcntl.LOCK_NB)
        except OSError:
            locks.close()
            raise PrepareError(f"{who} is writing to {out} (its lock {name} is held); wait for it to finish or "
                               "choose another --out") from None
    return locks


def parse_part(text):
    """--part K/N -> (K, N), 1 <= K <= N <= 10000 (PrepareError: one line)."""
    k, _, n = str(text).partition("/")
    if not (k.strip().isdigit() and n.strip().isdigit() and 1 <= int(k) <= int(n) <= 10000):
        raise PrepareError(f"--part {text}: must be K/N with 1 <= K <= N <= 10000 (e.g. 3/8)")
    return int(k), int(n)


def merge(out, part=None):
    """Join the finished index parts of `out` (prepare --part) into its index -> (images added, parts).
    part (K, N): that part alone (a folder holding one part of a split across folders)."""
    if not is_shard_dir(out):
        raise PrepareError(f"--out {out} is not a shard folder")
    lock = _lock(out)  # exclusive: no part may still be writing
    try:
        with open(os.path.join(out, MARKER)) as f:
            short_side = json.load(f).get("short_side")
        added, parts = shards.merge_parts(out, short_side, only=part)
        for k, n in parts:  # the parts' own locks: no part of these can be running (the folder lock is ours)
            lock_file = os.path.join(out, f"{LOCK}.{shards.part_name(k, n)}")
            if os.path.exists(lock_file):
                os.remove(lock_file)
        return added, parts
    except shards.PartError as e:
        raise PrepareError(str(e)) from None
    finally:
        lock.close()


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
    known = _check_path_map(path_map, out) if path_map else None
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
    lock = _open_out(out, short_side, part)
    try:
        salt = folder_salt(out, key, create=True)
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
    renamed = _hash_old_names(out, salt) if part is None else _no_old_names(out)
    ids = [source_id(salt, s, rel) for s, rel, _, _ in files]
    labels, origins = provenance
    if part is not None:  # this part's slice: files whose salted id is K-1 modulo N (balanced by the hash)
        mine = [int(i, 16) % part[1] == part[0] - 1 for i in ids]
        files, ids, origins = ([x for x, m in zip(xs, mine) if m] for xs in (files, ids, origins))
    index_path, skipped_path = (shards.part_paths(out, *part)[:2] if part else
                                (os.path.join(out, INDEX), os.path.join(out, SKIPPED)))
    if known is not None:
        _write_path_map(path_map, known, [(i, s, rel) for i, (s, rel, _, _) in zip(ids, files)] + renamed)
    done = {r["id"] for r in read_index(out)}
    if part is not None:  # the merged index and skip list, and this part's own
        done |= {r["id"] for r in _read_jsonl(os.path.join(out, SKIPPED))} | {r["id"] for r in _read_jsonl(index_path)}
    old_skips = _read_jsonl(skipped_path)
    if retry_skipped:  # forget old skips; they are listed again if they fail again
        _write_jsonl(skipped_path, [r for r in old_skips if r["id"] in done])
    else:
        done |= {r["id"] for r in old_skips}
    todo = [(i, rel, p, m) for i, (_, rel, p, m) in zip(ids, files) if i not in done]
    per_source = _source_table(ids, done, labels, origins)
    origin_of = dict(zip(ids, origins))
    counts = {"files_seen": len(files), "files_already_done": len(files) - len(todo), "files_added": 0,
              "images_added": 0, "files_skipped": 0, "skip_reasons": {}, "crop": {},
              "images_blanked": 0, "burned_in_cleaned": 0, "frames_duplicate": 0}
    t0 = time.time()
    writer = _ShardWriter(out, part)
    jobs = [(p, m, rel, short_side, frame_stride) for _, rel, p, m in todo]
    _close_zips()  # no open archive may be shared with forked workers
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    with open(index_path, "a", encoding="utf-8") as index, open(skipped_path, "a", encoding="utf-8") as skipped:
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
    _finish_index(out, counts, part, short_side)
    counts["seconds"] = round(time.time() - t0, 2)
    for row in per_source:
        row["seconds"] = round(row["seconds"], 2)
    counts["sources"] = per_source
    summary = SUMMARY if part is None else f"summary.{shards.part_name(*part)}.json"
    with open(os.path.join(out, summary), "w") as f:
        json.dump(counts, f, indent=1)
        f.write("\n")
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
        shards.write_index_bin(out, records, jsonl_bytes)  # what every rank memory-maps
        counts["files_skipped_total"] = len(_read_jsonl(os.path.join(out, SKIPPED)))
        return
    index_path, skipped_path, _ = shards.part_paths(out, *part)
    shards.write_part_done(out, *part, short_side)
    counts["part"] = list(part)
    counts["images_total"] = len(read_index(out)) + len(_read_jsonl(index_path))
    counts["files_skipped_total"] = len(_read_jsonl(os.path.join(out, SKIPPED))) + len(_read_jsonl(skipped_path))


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
    if c.get("part"):
        k, n = c["part"]
        lines.append(f"  part {k}/{n} done: its images join the index when every part is done and "
                     f"python -m urfm_fast.prepare --out {out} --merge has run")
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
        f"size (over {sources.MAX_MEMBER_BYTES >> 30} GiB) or compression ratio (over {sources.MAX_MEMBER_RATIO}:1) "
        "before a byte is decompressed. One prepare at a time per --out (a lock file). Video clips and volumes need "
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
    ap.add_argument("--key", metavar="FILE", default=None,
                    help="the file holding the key that names this folder's sources (default: DIR.key beside "
                    "--out, created mode 0600 on the first run; must be outside --out). Share the folder, keep "
                    "the key: a rerun needs it to skip what is done")
    ap.add_argument("--burned-in", choices=("clean", "skip"), default="clean",
                    help="DICOM with BurnedInAnnotation YES: blank its text like any file and flag it in "
                    "index.jsonl (clean), or leave it out, listed in skipped.jsonl (skip)")
    ap.add_argument("--part", metavar="K/N", default=None,
                    help="prepare only the K-th of N slices of the files (by salted id, so slices balance) into "
                    "index part K of --out: N machines can run at once against one shared --out (give them one "
                    "--key), then --merge; or each into its own folder (then --merge --part K/N there)")
    ap.add_argument("--merge", action="store_true",
                    help="join the finished index parts of --out (from --part runs) into its index; a missing "
                    "or unfinished part is named and nothing is changed (with no SRC; --part K/N: that part alone)")
    ap.add_argument("--review", type=int, default=0, metavar="N",
                    help="write DIR/review.png, a contact sheet of N random prepared images with the "
                    "blanked areas outlined (with no SRC: only that, for an existing shard folder)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        if args.review < 0:
            raise PrepareError("--review must be >= 0")
        part = parse_part(args.part) if args.part is not None else None
        if args.merge and (args.sources or args.list_file):
            raise PrepareError("--merge takes no SRC: run it after every prepare --part K/N has finished")
        if not args.sources and not args.list_file and not args.review and not args.merge:
            raise PrepareError("give at least one SRC or --list FILE (or --review N for an existing shard folder)")
        if args.merge:
            added, parts = merge(args.out, part)
            print(f"{args.out}: merged {len(parts)} index part(s), {added} images added; "
                  f"{len(read_index(args.out))} images in total")
        elif args.sources or args.list_file:
            c = prepare(args.sources, args.out, short_side=args.short_side, frame_stride=args.frame_stride,
                        workers=args.workers, retry_skipped=args.retry_skipped, progress=not args.quiet,
                        path_map=args.path_map, burned_in=args.burned_in, list_file=args.list_file,
                        key=args.key, part=part)
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
