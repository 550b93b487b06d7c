"""Video clips (AVI / MP4 / MOV / M4V) and volumes (NIfTI, MetaImage) as grey frames for prepare.

Each reader returns the frames of one file as an iterator of (frame number, uint8 [H,W]) plus what
prepare's cleaning needs (how many frames to expect; for volumes a crop box and a frame to find the
scan region in); urfm_fast.prepare crops, de-identifies, de-duplicates and resizes them like DICOM cines.

Video: decoded frame by frame with PyAV (its wheels carry FFmpeg), the first video stream, luma only.
A frame over the pixel budget is refused before decoding (declared size) and while decoding (actual
size); a clip that stops decoding with an error, or yields fewer frames than its container declares,
is refused as corrupt or truncated (the whole clip: its frame numbers would not be trustworthy).

Volumes: NIfTI-1/2 (``.nii``, ``.nii.gz``; header parsed by nibabel) and MetaImage (``.mha`` with its
data inside, ``.mhd`` with a data file in the same folder; raw or zlib-compressed). The declared size
is checked against MAX_VOLUME_BYTES before any voxel is read. Slices are taken along the third voxel
axis (for NIfTI, along the slice axis its header names in dim_info, the acquisition plane, when it
names one); the other two voxel axes, in order, run across and down the slice (x across, y down).
4-D volumes (3-D + time, or 2-D + time with one slice) give every slice of every time point, numbered
t * slices + z. Intensities are mapped to 0..255 with one range per volume: its 0.5th to 99.5th
percentile (robust to a few hot voxels and to padding), clipped. A slice with under 1 % of its pixels
above grey level 8 after the mapping has no signal and is left out.

Files from strangers: an ``.mhd``'s data file must be a regular file inside the ``.mhd``'s folder (no
absolute path, no ``..``, no link leading out); lists and patterns of data files are refused.
"""

import gzip
import io
import math
import os
import zlib

import numpy as np

VIDEO_EXTS = (".avi", ".mp4", ".mov", ".m4v")
NIFTI_EXTS = (".nii", ".nii.gz")
METAIMAGE_EXTS = (".mhd", ".mha")
MEDIA_EXTS = VIDEO_EXTS + NIFTI_EXTS + METAIMAGE_EXTS
DATA_FILE_EXTS = (".raw", ".zraw")  # data files of .mhd headers: never sources of their own
EXTRA = "pip install 'urfm_fast[media]'"
MAX_VOLUME_BYTES = 512 << 20  # a volume's declared voxel data, read whole (one copy) before slicing
PERCENTILES = (0.5, 99.5)  # the intensity range of a volume (and of a wide grey DICOM without a window)
SIGNAL_LEVEL, SIGNAL_MIN = 8, 0.01  # a slice needs this fraction of pixels above this grey level
_MAX_HEADER = 64 << 10  # MetaImage header text
_MAX_EXTENSIONS = 64 << 20  # NIfTI header extensions before the data (some hold a DICOM header)
_SAMPLE = 1 << 21  # voxels sampled for the percentiles
_MET_TYPES = {"MET_UCHAR": "u1", "MET_CHAR": "i1", "MET_USHORT": "u2", "MET_SHORT": "i2", "MET_UINT": "u4",
              "MET_INT": "i4", "MET_ULONG": "u8", "MET_LONG": "i8", "MET_ULONG_LONG": "u8",
              "MET_LONG_LONG": "i8", "MET_FLOAT": "f4", "MET_DOUBLE": "f8"}


def kind_of(name):
    """'video', 'nifti', 'metaimage' or None, by the file name's suffix."""
    n = name.lower()
    for kind, exts in (("video", VIDEO_EXTS), ("nifti", NIFTI_EXTS), ("metaimage", METAIMAGE_EXTS)):
        if n.endswith(exts):
            return kind
    return None


def missing_library(kind):
    """None when the library for this kind of file imports, else the line that says what to install."""
    module = {"video": "av", "nifti": "nibabel"}.get(kind)
    if module is None:
        return None
    try:
        __import__(module)
    except ImportError:
        return f"{kind} files need the '{module}' package: {EXTRA}"
    return None


# ---------------------------------------------------------------------------------------------
# Video


def video_frames(src, stride, max_pixels):
    """src: a path or seekable binary file -> (iterator of (frame number, uint8 [H,W]), frames expected)."""
    import av

    try:
        container = av.open(src, mode="r", metadata_errors="ignore")
    except Exception as e:  # FFmpeg's messages quote the file name: keep the class only
        raise ValueError(f"not a readable video clip ({type(e).__name__})") from None
    if not container.streams.video:
        container.close()
        raise ValueError("video file without a video stream")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        container.close()
        raise ValueError("video stream of an unknown or corrupt codec")
    stream.thread_type, stream.codec_context.thread_count = "NONE", 1  # prepare runs one worker per core
    w, h = stream.codec_context.width, stream.codec_context.height
    if w * h > max_pixels:
        container.close()
        raise ValueError(f"video frame of {w} x {h} exceeds the pixel budget of {max_pixels}; not decoded")
    declared = max(0, stream.frames or 0)
    expected = len(range(0, declared, stride)) if declared else 1000  # unknown: assume a long clip
    return _decode(container, stream, stride, declared, max_pixels), expected


def _decode(container, stream, stride, declared, max_pixels):
    import av

    n = 0
    try:
        for frame in container.decode(stream):
            if frame.width * frame.height > max_pixels:
                raise ValueError(f"video frame of {frame.width} x {frame.height} exceeds the pixel budget")
            if n % stride == 0:
                yield n, frame.to_ndarray(format="gray")
            n += 1
    except av.error.FFmpegError as e:
        raise ValueError(f"corrupt video clip (decoding stopped after {n} frames; {type(e).__name__})") from None
    finally:
        container.close()
    if n == 0:
        raise ValueError("video clip without decodable frames")
    if n < declared:
        raise ValueError(f"truncated video clip ({n} of {declared} declared frames decoded)")


# ---------------------------------------------------------------------------------------------
# Volumes


def volume_frames(src, name, stride, max_pixels, open_regular=None):
    """src: a seekable binary file of a NIfTI or MetaImage volume named name (a path, or a zip member
    name when open_regular is None: an .mhd's data file can then not be reached)
    -> (iterator of (slice number, uint8 [H,W]), slices expected, crop box, frame to find the scan region in)."""
    if kind_of(name) == "nifti":
        vol, invert = _read_nifti(src)
    else:
        vol, invert = _read_metaimage(src, name, open_regular)
    if vol.shape[2] * vol.shape[3] > max_pixels:
        raise ValueError(f"volume slice of {vol.shape[3]} x {vol.shape[2]} exceeds the pixel budget of {max_pixels}")
    lo, hi = _intensity_range(vol)
    to8 = lambda s: map_to_uint8(s, lo, hi, invert)
    keep, proj = [], None
    for k in range(0, vol.shape[0] * vol.shape[1], stride):
        g = to8(vol[k // vol.shape[1], k % vol.shape[1]])
        if (g > SIGNAL_LEVEL).mean() >= SIGNAL_MIN:
            keep.append(k)
            proj = g if proj is None else np.maximum(proj, g)
    if not keep:
        raise ValueError("volume without signal (no slice above the signal threshold)")
    ys, xs = np.nonzero(proj > SIGNAL_LEVEL)
    box = (int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1)
    if box[1] - box[0] < 16 or box[3] - box[2] < 16:
        box = None
    frames = ((k, to8(vol[k // vol.shape[1], k % vol.shape[1]])) for k in keep)
    return frames, len(keep), box, proj


def map_to_uint8(s, lo, hi, invert=False):
    """Values lo..hi -> 0..255 (clipped; NaN -> 0), then 255 - g when invert."""
    g = np.nan_to_num(np.asarray(s, np.float32), nan=lo)
    g = np.clip((g - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255).astype(np.uint8)
    return 255 - g if invert else g


def robust_range(values):
    """(lo, hi) of values: their PERCENTILES, their min..max when those meet; None without finite values
    or when all are equal."""
    sample = np.asarray(values, np.float32).ravel()
    sample = sample[np.isfinite(sample)]
    if not sample.size:
        return None
    lo, hi = (float(v) for v in np.percentile(sample, PERCENTILES))
    if hi <= lo:
        lo, hi = float(sample.min()), float(sample.max())
    return (lo, hi) if hi > lo else None


def _intensity_range(vol):
    """(lo, hi) of a volume: its robust percentiles on a strided sample, min..max when they meet."""
    step = max(1, math.ceil((vol.size / _SAMPLE) ** (1 / 3)))
    sample = np.asarray(vol[:, ::step, ::step, ::step], np.float32)
    if not np.isfinite(sample).any():
        raise ValueError("volume without finite values")
    found = robust_range(sample)
    if found is None:
        raise ValueError("volume without signal (constant intensity)")
    return found


def _check_volume(shape, itemsize):
    if not shape or any(d <= 0 for d in shape):
        raise ValueError(f"volume with empty dimensions {tuple(shape)}")
    if len(shape) > 4 and any(d != 1 for d in shape[4:]):
        raise ValueError(f"volume with {len(shape)} dimensions (2-D, 3-D or 3-D + time only)")
    nbytes = math.prod(shape) * itemsize
    if nbytes > MAX_VOLUME_BYTES:
        raise ValueError(f"volume of {nbytes} bytes exceeds the budget of {MAX_VOLUME_BYTES} bytes; not read")
    return nbytes


def _read_exact(f, n, what):
    data = f.read(n)
    if len(data) < n:
        raise ValueError(f"truncated {what} ({len(data)} of {n} bytes)")
    return data


def _read_nifti(src):
    """-> (volume [t, z, y, x] view, invert) of a NIfTI-1/2 file (gzipped or not)."""
    from nibabel.nifti1 import Nifti1Header
    from nibabel.nifti2 import Nifti2Header
    from nibabel.spatialimages import HeaderDataError

    src.seek(0)
    f = gzip.GzipFile(fileobj=src) if src.read(2) == b"\x1f\x8b" else src
    src.seek(0)
    try:
        head = f.read(540)
        size = int.from_bytes(head[:4], "little")
        cls = {348: Nifti1Header, 540: Nifti2Header}.get(size) or {
            348: Nifti1Header, 540: Nifti2Header}.get(int.from_bytes(head[:4], "big"))
        if cls is None or len(head) < cls.template_dtype.itemsize:
            raise ValueError("not a NIfTI file (no NIfTI header)")
        try:  # check=False: nibabel would log its fixes of a stranger's header to the console
            hdr = cls.from_fileobj(io.BytesIO(head[:cls.template_dtype.itemsize]), check=False)
            shape, dtype = hdr.get_data_shape(), hdr.get_data_dtype()
            offset, slice_dim = int(hdr.get_data_offset()), hdr.get_dim_info()[2]
            slope = hdr.get_slope_inter()[0]
        except Exception as e:
            raise ValueError(f"corrupt NIfTI header ({type(e).__name__})") from None
        if dtype.fields or dtype.kind not in "uif":
            raise ValueError(f"NIfTI of data type {dtype} (grey integer or float volumes only)")
        nbytes = _check_volume(shape, dtype.itemsize)
        if offset < cls.template_dtype.itemsize:
            raise ValueError("NIfTI header of a .hdr/.img pair or with a bad vox_offset (single-file .nii only)")
        if offset > _MAX_EXTENSIONS:
            raise ValueError(f"NIfTI data offset {offset} beyond {_MAX_EXTENSIONS} bytes of header extensions")
        if offset < len(head):  # the data started inside what was read as the header
            body = head[offset:offset + nbytes]
        else:
            for start in range(len(head), offset, 1 << 20):  # extensions skipped, a MiB at a time
                _read_exact(f, min(1 << 20, offset - start), "NIfTI header extension")
            body = b""
        if len(body) < nbytes:
            body += _read_exact(f, nbytes - len(body), "NIfTI volume data")
    except (HeaderDataError, OSError, EOFError, zlib.error) as e:
        raise ValueError(f"corrupt NIfTI file ({type(e).__name__})") from None
    shape4 = tuple(shape[:4]) + (1,) * (4 - min(4, len(shape)))  # dimensions past the 4th are 1 (checked)
    a = np.frombuffer(body, dtype, count=math.prod(shape)).reshape(shape4, order="F")
    if slice_dim is not None and slice_dim != 2 and len(shape) >= 3:
        a = np.moveaxis(a, slice_dim, 2)
    return a.transpose(3, 2, 1, 0), bool(slope is not None and slope < 0)


def _metaimage_header(f):
    """Key -> value of a MetaImage header (up to and including ElementDataFile) and the header's byte length."""
    fields, size = {}, 0
    while True:
        line = f.readline(_MAX_HEADER)
        size += len(line)
        if not line or size > _MAX_HEADER or b"=" not in line:
            raise ValueError("not a MetaImage file (no ElementDataFile in its header)")
        key, _, value = line.decode("latin-1").partition("=")
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            return fields, size


def _metaimage_layout(fields):
    """-> (shape in C order [.., y, x], numpy dtype, compressed) from a MetaImage header."""
    try:
        dims = [int(v) for v in fields["DimSize"].split()]
        ndims = int(fields.get("NDims", len(dims)))
        dtype = np.dtype(_MET_TYPES[fields["ElementType"].upper()])
        channels = int(fields.get("ElementNumberOfChannels", 1))
    except (KeyError, ValueError):
        raise ValueError("MetaImage header without a readable DimSize / ElementType") from None
    if ndims != len(dims) or ndims < 2 or channels != 1:
        raise ValueError("MetaImage of unsupported layout (2 to 4 dimensions, one channel)")
    msb = (fields.get("BinaryDataByteOrderMSB") or fields.get("ElementByteOrderMSB") or "False").lower() == "true"
    _check_volume(dims, dtype.itemsize)
    compressed = fields.get("CompressedData", "False").lower() == "true"
    return dims[::-1], dtype.newbyteorder(">" if msb else "<"), compressed


def _read_metaimage(src, name, open_regular):
    """-> (volume [t, z, y, x] view, False) of an .mha (data inside) or .mhd (data file beside it)."""
    src.seek(0)
    fields, header_size = _metaimage_header(src)
    shape, dtype, compressed = _metaimage_layout(fields)
    nbytes = math.prod(shape) * dtype.itemsize
    target = fields["ElementDataFile"]
    skip = int(fields.get("HeaderSize", 0) or 0)
    if target.upper() == "LOCAL":
        data = _metaimage_data(src, nbytes, compressed, 0)
    elif open_regular is None:
        raise ValueError("MetaImage .mhd inside a zip archive (its data file is another member; extract the archive)")
    else:
        with _open_data_file(name, target, open_regular) as f:
            data = _metaimage_data(f, nbytes, compressed, skip)
    a = np.frombuffer(data, dtype, count=math.prod(shape)).reshape(shape)
    return a.reshape((1,) * (4 - a.ndim) + a.shape), False


def _open_data_file(header_path, target, open_regular):
    """The data file an .mhd names, refused unless it is one regular file inside the header's folder."""
    if target.upper() == "LIST" or "%" in target:
        raise ValueError("MetaImage with a list or pattern of data files (one data file only)")
    folder = os.path.realpath(os.path.dirname(header_path))
    if os.path.isabs(target) or ".." in target.replace("\\", "/").split("/"):
        raise ValueError("MetaImage data file outside the header's folder; not read")
    path = os.path.realpath(os.path.join(folder, target))
    if os.path.commonpath([path, folder]) != folder:
        raise ValueError("MetaImage data file outside the header's folder; not read")
    if not os.path.exists(path):
        raise ValueError("MetaImage data file missing")
    return open_regular(path)


def _metaimage_data(f, nbytes, compressed, skip):
    if skip < 0:  # -1: the data are the last nbytes of the file
        f.seek(0, os.SEEK_END)
        if f.tell() < nbytes:
            raise ValueError("MetaImage data file shorter than its header declares")
        f.seek(f.tell() - nbytes)
    elif skip:
        _read_exact(f, skip, "MetaImage data file")
    if not compressed:
        try:
            return _read_exact(f, nbytes, "MetaImage data")
        except ValueError:
            raise ValueError("MetaImage data file shorter than its header declares") from None
    z, out = zlib.decompressobj(), []
    size = 0
    while size < nbytes and (chunk := f.read(1 << 20)):
        try:
            part = z.decompress(chunk, nbytes - size)  # never inflates past the declared size
        except zlib.error:
            raise ValueError("corrupt compressed MetaImage data") from None
        out.append(part)
        size += len(part)
    if size < nbytes:
        raise ValueError("MetaImage compressed data shorter than its header declares")
    return b"".join(out)


def metaimage_data_files(folder, names, open_regular):
    """Names among ``names`` (files of ``folder``) that an .mhd there names as its data file: they are
    read with their header, never listed as files of their own. Unreadable headers name nothing."""
    found = set()
    for n in names:
        if not n.lower().endswith(".mhd"):
            continue
        try:
            with open_regular(os.path.join(folder, n)) as f:
                target = _metaimage_header(f)[0]["ElementDataFile"]
        except Exception:
            continue
        if target in names:
            found.add(target)
    return found


def zip_data_members(members):
    """Zip members that are the data file of an .mhd member of the same name stem (not read alone)."""
    stems = {m[:-4].lower() for m in members if m.lower().endswith(".mhd")}
    return {m for m in members if m.lower().endswith(DATA_FILE_EXTS) and m.rsplit(".", 1)[0].lower() in stems}
