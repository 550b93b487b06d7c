"""DICOM pixel values -> 8-bit grey for `urfm_fast.prepare`: one mapping per file, chosen from its header.

Every frame of a cine goes through the same mapping, so brightness never flickers from frame to
frame and matches what a viewer shows by default:

- RGB and YBR_* (pydicom converts YBR to RGB while decoding): ITU-R 601 luma; 8-bit colour, the
  common ultrasound file, is unchanged by this module; wider colour is scaled by its bit depth.
- PALETTE COLOR: the palette's RGB, then luma; 16-bit palette entries are scaled by 255 / 65535.
- MONOCHROME1/2 with a VOI LUT Sequence or Window Center/Width: the modality LUT (Rescale Slope /
  Intercept or a Modality LUT Sequence), then the first VOI LUT or window (pydicom's apply_voi_lut,
  the LUT preferred when both are given, as a viewer does), its output range (the LUT's bit depth,
  or the window's output range as pydicom computes it) scaled to 0..255.
- MONOCHROME1/2 without one: 8-bit unsigned data unchanged (0..255 is the stored range already).
  Wider or signed data get one range per file: the 0.5th..99.5th percentiles of the modality values
  of up to SAMPLE_FRAMES frames spread over the frames kept. The stored bit depth is no good here:
  10-12-bit data are often declared 16 bits and would come out nearly black; percentiles also keep a
  few hot pixels from setting the scale.
- MONOCHROME1 is inverted after the mapping (0 = white).

A window or LUT that pydicom cannot apply (a width under 1, an unknown VOI LUT Function, an unsupported
LUT depth) falls back to the per-file range. Windows given only inside the functional groups of
enhanced multi-frame objects are not read (ultrasound cines carry them at the top level, if at all).
"""

import numpy as np

from urfm_fast.data.media import map_to_uint8, robust_range
from urfm_fast.data.scan_region import to_grey8

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
SAMPLE_FRAMES = 8  # frames decoded to measure a file's range when it has no window
_SAMPLE_VALUES = 1 << 21  # pixel values kept from them for the percentiles
# Pixels mapped at a time: pydicom's float64 windowing of a whole 2^25-pixel frame (the budget in
# urfm_fast.data.sources) would hold ~1 GiB of temporaries; in row blocks it stays at a few tens of MB.
_BLOCK_PIXELS = 1 << 20


def photometric(ds):
    return str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()


def grey_mapper(ds, kept, decode):
    """-> function mapping one decoded frame (as pydicom's iter_pixels gives it) to uint8 [H,W].

    ds: the header; kept: the frame numbers that will be read; decode(frame numbers) -> iterator of
    decoded frames, called here only when a range must be measured."""
    pi = photometric(ds)
    if pi == "PALETTE COLOR":
        return lambda a: _palette_grey(a, ds)
    if pi not in MONOCHROME or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        bits = int(ds.get("BitsStored", 8) or 8)
        if bits <= 8:
            return to_grey8
        scale = 255.0 / (2**bits - 1)  # wider colour (rare): its bit depth, never the frame's own range
        return lambda a: to_grey8(a.astype(np.float32) * scale)
    to8 = _voi_mapper(ds) or _range_mapper(ds, kept, decode)
    return (lambda a: 255 - to8(a)) if pi == "MONOCHROME1" else to8


def _palette_grey(a, ds):
    from pydicom.pixels import apply_color_lut

    rgb = apply_color_lut(a, ds)
    if rgb.dtype != np.uint8:  # 16-bit entries: a fixed scale, never the frame's own range
        rgb = rgb.astype(np.float32) * (255.0 / 65535.0)
    return to_grey8(rgb)


def _modality(ds):
    """The modality LUT as a function, or None when it leaves values unchanged (no LUT, no rescale or
    the identity rescale most ultrasound files state)."""
    from pydicom.pixels import apply_modality_lut

    if not ds.get("ModalityLUTSequence"):
        slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
        if slope is None or intercept is None or (float(slope), float(intercept)) == (1.0, 0.0):
            return None
    return lambda a: apply_modality_lut(a, ds)


def _voi_mapper(ds):
    """Frame -> uint8 through the file's first VOI LUT or window; None when it has no usable one."""
    from pydicom.pixels import apply_voi_lut, apply_windowing

    try:
        seq = ds.get("VOILUTSequence")
        if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
            lo, hi = 0.0, float(2 ** int(seq[0].LUTDescriptor[2]) - 1)  # the LUT's output bit depth
        elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
            # The window's output range, exactly as pydicom computes it (from Bits Stored, the pixel
            # representation and the modality LUT): the images of -inf and +inf. It also checks the window.
            lo, hi = (float(v) for v in apply_windowing(np.array([-np.inf, np.inf]), ds))
        else:
            return None
        if hi == lo:
            return None
        modality = _modality(ds) or (lambda a: a)
        to8 = _by_rows(lambda a: map_to_uint8(apply_voi_lut(modality(a), ds, prefer_lut=True), lo, hi))
        to8(np.zeros((1, 1), np.int32))  # a LUT of unsupported depth, a bad window: raised here, once
        return to8
    except (ValueError, TypeError, IndexError, AttributeError, NotImplementedError, KeyError):
        return None  # a header this module cannot apply: the per-file range below


def _range_mapper(ds, kept, decode):
    """Frame -> uint8 with one range for the whole file (8-bit unsigned data: unchanged)."""
    modality = _modality(ds)
    bits = int(ds.get("BitsStored", 8) or 8)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    if modality is None and bits <= 8 and not signed:
        return lambda a: a if a.dtype == np.uint8 else np.clip(a, 0, 255).astype(np.uint8)
    modality = modality or (lambda a: a)
    kept = list(kept)
    picks = sorted({kept[round(k)] for k in np.linspace(0, len(kept) - 1, min(SAMPLE_FRAMES, len(kept)))})
    values = []
    for a in decode(picks):
        step = max(1, int(np.ceil(np.sqrt(a.size * len(picks) / _SAMPLE_VALUES))))
        values.append(np.asarray(modality(a[::step, ::step]), np.float32).ravel())
    found = robust_range(np.concatenate(values)) if values else None
    if found is None:  # a constant (or empty) file: black, as a stretch of a constant frame gives
        return lambda a: np.zeros(a.shape[:2], np.uint8)
    lo, hi = found
    return _by_rows(lambda a: map_to_uint8(modality(a), lo, hi))


def _by_rows(to8):
    """to8 applied to blocks of rows of a frame (bounded temporaries), the uint8 results stacked."""
    def run(a):
        rows = max(1, _BLOCK_PIXELS // max(1, a.shape[1]))
        if a.shape[0] <= rows:
            return to8(a)
        return np.concatenate([to8(a[r:r + rows]) for r in range(0, a.shape[0], rows)])
    return run
