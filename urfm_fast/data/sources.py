"""Sources of `urfm_fast.prepare`: finding files, reading them, and the budgets on strangers' files.

Walking SRC folders and zip archives (members streamed, never extracted), the --list file, the
regular-file checks (FIFOs, devices and links to them are refused), the per-worker memory budgets
(frame pixels, resized output, zip member size and ratio), decoding of images, DICOM, clips and
volumes into cleaned frames (crop, de-identify, resize, de-duplicate) and the scrubbing of names
out of decoder messages. The worker entry is `process_file`."""

import csv
import io
import logging
import os
import stat
import tempfile
import warnings
import zipfile
import zlib

import numpy as np

from urfm_fast.data import deid, dicom_grey, media
from urfm_fast.data.scan_region import load_image_grey8, near_duplicate, region_box, resize_short, scan_geometry
from urfm_fast.data.shards import IMAGE_EXTS

DICOM_EXTS = (".dcm", ".dicom", ".dic")
ARCHIVE_EXTS = (".zip",)
SPOOL_BYTES = 64 << 20  # zip members up to this size are read into memory, larger ones into a temp file
# Budgets that bound a worker's memory whatever a stranger's file declares (stated in --help):
MAX_FRAME_PIXELS = 1 << 25  # one DICOM frame (rows x columns x samples), ~33.5 M: 5792 x 5792 grey
MAX_OUTPUT_BYTES = 256 << 20  # resized frames of one file held before they are written
MAX_MEMBER_BYTES = 4 << 30  # a zip member's declared uncompressed size
MAX_MEMBER_RATIO = 100  # ... and its compression ratio (members over 1 MiB): zip bombs reach ~1000:1


class _OverBudget(ValueError):
    """A file that would take more memory than a worker is allowed (the message says which budget)."""


class PrepareError(Exception):
    """A problem with the command line inputs (printed as one line, exit status 2)."""


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


def _clean_frames(frames, short_side, box=None, kept=1, geometry_frame=None):
    """Crop, de-identify (urfm_fast.data.deid), resize and de-duplicate the grey frames of one file.

    frames: iterable of (frame number, uint8 [H,W]) -> [(frame, uint8 [h,w], crop kind, extra)],
    extra = {"roi": crop box in the source frame, "blank": boxes blanked inside it (output pixels),
    "duplicates": frames left out as near-duplicates of the frame before}. The scan region is found
    in geometry_frame when given (a volume's projection), else in the first frame. Every frame is
    seen by the de-identification (text, static overlays); a near-duplicate is then dropped."""
    cleaner, kind, numbers, shape, duplicates = None, None, [], None, 0
    for idx, g in frames:
        if cleaner is None:
            roi, live, kind, outside = scan_geometry(g if geometry_frame is None else geometry_frame, box)
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
    """-> iterator of (frame number, uint8 grey [H,W]) of a DICOM, decoded one frame at a time, all
    frames through one mapping (urfm_fast.data.dicom_grey: the file's window or VOI LUT, else one range)."""
    from pydicom.pixels import iter_pixels

    kept = range(0, n, stride)
    decode = lambda indices: iter_pixels(_rewind(src), indices=indices)
    to8 = dicom_grey.grey_mapper(ds, kept, decode)
    for idx, a in zip(kept, decode(kept)):
        yield idx, to8(a)


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


_BURNED_IN = ["clean"]  # this process's --burned-in policy (set by quiet_decoders)


def quiet_decoders(burned_in="clean"):
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
    """A video clip or a NIfTI / MetaImage volume (urfm_fast.data.media), cleaned like a DICOM cine."""
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
        close_zips()
        zf = _ZIPS[key] = zipfile.ZipFile(path)
    return zf


def close_zips():
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
