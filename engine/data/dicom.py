"""DICOM radiographs (one image per file) to the image layout of plabel.data.imageio.

    header(data)  -> DicomHeader(rows, columns, frames, transfer_syntax, sop_instance_uid, ...)
    pixels(data)  -> uint16 (H, W) for MONOCHROME1/2, uint8 or uint16 (H, W, 3) for colour

Grey images go through the DICOM display pipeline once, in float64, and leave it as uint16 (the
16 bits are kept until plabel's one conversion to [0, 1], imageio.to_gray_float):

1. Modality LUT: Rescale Slope / Intercept (or a Modality LUT Sequence), pydicom.pixels.apply_modality_lut.
2. VOI: a window (Window Center / Width, the first pair, with VOI LUT Function LINEAR, LINEAR_EXACT or
   SIGMOID, DICOM PS3.3 C.11.2.1.2) mapped to [0, 1] here: three one-line formulas, written out
   because pydicom's apply_windowing returns the stored bit range instead of [0, 1]; or a VOI LUT
   Sequence (pydicom.pixels.apply_voi, scaled by its output range); without either, the image's
   own min..max.
3. MONOCHROME1 (0 = white) is inverted, so that bright is dense bone as in MONOCHROME2.

Compressed transfer syntaxes decode through pydicom's plugins (RLE built in; JPEG baseline /
extended / lossless and JPEG 2000 through pylibjpeg); one without a plugin here (e.g. JPEG-LS,
which needs pyjpegls) is refused with its name. Multi-frame files are refused (plabel labels one
image per file).
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

__all__ = ["DicomHeader", "DicomRefused", "header", "is_dicom", "pixels"]


class DicomRefused(ValueError):
    """A DICOM file plabel cannot use as an image (the message says why, not naming the file)."""


def is_dicom(data: bytes) -> bool:
    """Part 10 files: a 128-byte preamble, then 'DICM'."""
    return len(data) >= 132 and bytes(data[128:132]) == b"DICM"


@dataclass(frozen=True)
class DicomHeader:
    """What plabel reads from a DICOM file besides the pixels."""

    rows: int
    columns: int
    frames: int
    photometric: str
    transfer_syntax: str  # the UID's name, e.g. "JPEG 2000 Image Compression"
    transfer_syntax_uid: str
    sop_instance_uid: str | None
    modality: str | None


def _read(data: bytes, stop_before_pixels: bool):
    import pydicom  # local: pydicom loads only when a DICOM file is seen
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=stop_before_pixels)
    except (InvalidDicomError, EOFError, ValueError, KeyError, OSError) as exc:
        raise DicomRefused(f"not a readable DICOM file ({type(exc).__name__}: {exc})") from None


def _header_of(ds) -> DicomHeader:
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if "Rows" not in ds or "Columns" not in ds:
        raise DicomRefused("no image in this DICOM file (Rows / Columns missing: not an image object)")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    return DicomHeader(rows=int(ds.Rows), columns=int(ds.Columns), frames=frames,
                       photometric=str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip(),
                       transfer_syntax=str(getattr(ts, "name", ts)), transfer_syntax_uid=str(ts),
                       sop_instance_uid=str(ds.SOPInstanceUID) if "SOPInstanceUID" in ds else None,
                       modality=str(ds.Modality) if "Modality" in ds else None)


def header(data: bytes) -> DicomHeader:
    """The header of a DICOM file (the pixel data is not read)."""
    return _header_of(_read(data, stop_before_pixels=True))


def _window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 VOI functions mapped to [0, 1]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    # LINEAR (the default): width >= 1
    return np.clip((x - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0) if width > 1 else (x >= center).astype(float)


def _first(value) -> float:
    """The first value of a possibly multi-valued DS element."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def _voi(x: np.ndarray, ds) -> np.ndarray:
    """Modality values (float64) -> display values in [0, 1] (step 2 of the module docstring)."""
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        from pydicom.pixels import apply_voi  # local: pydicom loads only for DICOM

        item = ds.VOILUTSequence[0]
        bits = int(item.LUTDescriptor[2]) or 16
        return np.clip(apply_voi(x, ds, index=0).astype(np.float64) / (2 ** bits - 1), 0.0, 1.0)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        function = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper() or "LINEAR"
        if width > 0:
            return _window(x, center, width, function)
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def pixels(data: bytes) -> np.ndarray:
    """Decode the image of a single-frame DICOM file (see the module docstring for the grey
    pipeline). Returns uint16 (H, W) for MONOCHROME1/2, the stored uint8 / uint16 (H, W, 3) RGB
    for colour. Raises DicomRefused saying why (multi-frame, no decoder for the transfer syntax,
    no pixel data, signed or float colour data ...)."""
    from pydicom.pixels import apply_modality_lut  # local: pydicom loads only for DICOM

    ds = _read(data, stop_before_pixels=False)
    head = _header_of(ds)
    if head.frames > 1:
        raise DicomRefused(f"multi-frame DICOM ({head.frames} frames): plabel labels one image per file; "
                           "split the frames into files first")
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DicomRefused("the DICOM file has no pixel data")
    try:
        arr = ds.pixel_array  # colour: pydicom converts YBR to RGB
    except Exception as exc:  # no plugin for the syntax, a corrupt stream ...
        text = " ".join(str(exc).split())[:300]
        raise DicomRefused(f"cannot decode its pixel data (transfer syntax {head.transfer_syntax}, "
                           f"{head.transfer_syntax_uid}): {text}") from None
    if head.photometric.startswith("MONOCHROME"):
        if arr.ndim != 2:
            raise DicomRefused(f"grey image of shape {arr.shape}, expected (rows, columns)")
        y = _voi(apply_modality_lut(arr, ds).astype(np.float64), ds)
        if head.photometric == "MONOCHROME1":
            y = 1.0 - y
        return np.round(y * 65535.0).astype(np.uint16)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise DicomRefused(f"{head.photometric} image of shape {arr.shape} is not grey or RGB")
    if arr.dtype not in (np.uint8, np.uint16):
        raise DicomRefused(f"{head.photometric} samples of type {arr.dtype} (only unsigned 8 / 16 bit colour)")
    return np.ascontiguousarray(arr)
