"""Robust decoding of medical images (PNG, JPEG, TIFF, DICOM) from bytes.

Every decoder returns one of two layouts:

* ``(H, W)``    grayscale,
* ``(H, W, 3)`` RGB (channel order R, G, B; alpha is dropped, palettes are expanded, CMYK is
  converted),

with dtype ``uint8`` or ``uint16``. Anything else (float or signed samples, multi-channel data
that is not gray/RGB, images smaller than :data:`MIN_SIDE` pixels on a side, images larger
than ``max_pixels``, zero-byte, truncated or corrupt data) raises :class:`ImageDecodeError`,
whose message names the input and the reason.

Backends: PNG goes through ``cv2.imdecode`` (exact for 8/16-bit gray and colour) after a chunk
walk (lengths, CRCs, IEND) that catches truncation libpng lets through, JPEG through Pillow
(handles CMYK/YCCK correctly, refuses truncated streams), TIFF through ``tifffile`` with ``cv2`` and Pillow as
fallbacks (``tifffile`` needs ``imagecodecs`` for LZW/PackBits, ``cv2`` does not). EXIF
orientation tags are ignored: pixels are returned in stored order. DICOM (Part 10, one frame)
goes through plabel.data.dicom: modality and VOI LUT applied, MONOCHROME1 inverted, uint16 out.
"""
from __future__ import annotations

import io
import warnings
import zlib

import cv2
import numpy as np
import tifffile
from PIL import Image

from plabel.data import dicom
from plabel.errors import InputError

__all__ = [
    "ImageDecodeError",
    "MIN_SIDE",
    "decode_image",
    "decode_mask",
    "sniff_format",
    "to_gray_float",
    "to_rgb_uint8",
]

#: Images with fewer pixels than this on either side are rejected.
MIN_SIDE = 8

# BT.601 luma weights (the ones cv2.cvtColor uses for RGB -> gray).
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)


class _Refused(ValueError):
    """A definitive refusal (unsupported content, broken structure): no other backend is tried."""


class ImageDecodeError(InputError):
    """An input could not be decoded into a supported image; the message names the input."""

    def __init__(self, name: str, reason: str):
        self.name = name
        self.reason = reason
        super().__init__(f"cannot decode image {name!r}: {reason}")


def sniff_format(data: bytes) -> str | None:
    """Return ``"png"``, ``"jpeg"``, ``"tiff"`` or ``"dicom"`` from the magic bytes, or None if unknown."""
    if dicom.is_dicom(data):
        return "dicom"
    head = bytes(data[:8])
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    return None


# ---------------------------------------------------------------------------------------------
# header probing (image size before the pixel data is decoded)


def _probe_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """(height, width) from the header, or None when the header cannot be read cheaply."""
    if fmt == "dicom":
        try:
            head = dicom.header(data)
        except dicom.DicomRefused as exc:
            raise _Refused(str(exc)) from None
        return head.rows, head.columns
    if fmt == "png" and len(data) >= 24 and data[12:16] == b"IHDR":
        width = int.from_bytes(data[16:20], "big")
        height = int.from_bytes(data[20:24], "big")
        return height, width
    if fmt == "tiff":
        try:
            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                page = tif.pages[0]
                return int(page.imagelength), int(page.imagewidth)
        except Exception:  # fall through to Pillow
            pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                return int(height), int(width)
    except Exception:
        return None


def _check_size(height: int, width: int, name: str, max_pixels: int) -> None:
    if height < MIN_SIDE or width < MIN_SIDE:
        raise ImageDecodeError(
            name, f"image is {height}x{width} (HxW); at least {MIN_SIDE}x{MIN_SIDE} is required"
        )
    if height * width > max_pixels:
        raise ImageDecodeError(
            name, f"image is {height}x{width} = {height * width} pixels, above max_pixels={max_pixels}"
        )


# ---------------------------------------------------------------------------------------------
# normalisation of backend output to (H, W) / (H, W, 3) uint8/uint16


def _normalise_dtype(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * np.uint8(255)
    if arr.dtype.kind == "u" and arr.dtype.itemsize in (1, 2):
        return arr.astype(arr.dtype.newbyteorder("="), copy=False)
    raise _Refused(f"unsupported sample type {arr.dtype} (only 8/16-bit unsigned integers)")


def _finish(arr: np.ndarray, bgr: bool) -> np.ndarray:
    """Drop alpha, fold single channels, reorder BGR -> RGB; returns a contiguous array."""
    arr = _normalise_dtype(np.asarray(arr))
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    elif arr.ndim == 3 and arr.shape[2] == 2:  # gray + alpha
        arr = arr[:, :, 0]
    elif arr.ndim == 3 and arr.shape[2] in (3, 4):
        arr = arr[:, :, :3]
        if bgr:
            arr = arr[:, :, ::-1]
    elif arr.ndim != 2:
        raise _Refused(f"unsupported pixel layout with shape {arr.shape}")
    return np.ascontiguousarray(arr)


def _check_png_chunks(data: bytes) -> int:
    """Walk the PNG chunks (lengths, CRCs, IEND present); return the IHDR colour type.

    libpng (through OpenCV) may return an image for a file cut inside its last chunks; this
    catches truncation and corruption that the decoder lets through.
    """
    pos, n = 8, len(data)
    colour_type = -1
    while True:
        if pos + 12 > n:
            raise _Refused(f"truncated PNG: chunk header at byte {pos} runs past the end ({n} bytes)")
        length = int.from_bytes(data[pos : pos + 4], "big")
        ctype = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > n:
            raise _Refused(f"truncated PNG: chunk {ctype!r} at byte {pos} needs {end} bytes, file has {n}")
        crc = int.from_bytes(data[end - 4 : end], "big")
        if zlib.crc32(data[pos + 4 : end - 4]) != crc:
            raise _Refused(f"corrupt PNG: CRC mismatch in chunk {ctype!r} at byte {pos}")
        if ctype == b"IHDR" and length >= 13:
            colour_type = data[pos + 8 + 9]
        if ctype == b"IEND":
            return colour_type
        pos = end


def _decode_png(data: bytes) -> np.ndarray:
    colour_type = _check_png_chunks(data)
    arr = _decode_cv2(data)
    if colour_type in (0, 4) and arr.ndim == 3:  # gray / gray+alpha expanded by OpenCV
        arr = np.ascontiguousarray(arr[:, :, 0])
    return arr


def _decode_cv2(data: bytes) -> np.ndarray:
    buf = np.frombuffer(data, dtype=np.uint8)
    arr = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ValueError("OpenCV could not decode the data")
    return _finish(arr, bgr=True)


def _decode_pil(data: bytes) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            mode = im.mode
            if mode == "1":
                im = im.convert("L")
            elif mode in ("L", "RGB"):
                pass
            elif mode == "LA":
                im = im.getchannel("L")
            elif mode.startswith("I;16"):
                arr = np.asarray(im)
                if arr.dtype.kind != "u":
                    raise _Refused(f"unsupported sample type {arr.dtype} (Pillow mode {mode})")
                return _finish(arr.astype(np.uint16), bgr=False)
            elif mode == "I":
                arr = np.asarray(im)
                if arr.size and (arr.min() < 0 or arr.max() > 65535):
                    raise _Refused("32-bit integer samples outside the 16-bit range")
                return _finish(arr.astype(np.uint16), bgr=False)
            elif mode == "F":
                raise _Refused("floating-point samples are not supported")
            else:  # P, PA, RGBA, CMYK, YCbCr, LAB, HSV, ...
                im = im.convert("RGB")
            return _finish(np.asarray(im), bgr=False)


def _decode_tifffile(data: bytes) -> np.ndarray:
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = tif.pages[0]
        arr = page.asarray()
        axes = page.axes
        photometric = int(page.photometric)
        colormap = page.colormap if photometric == 3 else None
    if arr.ndim == 3 and axes.startswith("S"):  # planar configuration: (S, Y, X)
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim != 2 and not (arr.ndim == 3 and arr.shape[2] <= 4):
        raise ValueError(f"unsupported TIFF layout {axes} with shape {arr.shape}")
    if arr.dtype.kind not in "ub" or arr.dtype.itemsize > 2:
        raise _Refused(f"unsupported sample type {arr.dtype} (only 8/16-bit unsigned integers)")
    if photometric == 0:  # MINISWHITE: 0 is white
        arr = ~arr if arr.dtype == np.bool_ else np.iinfo(arr.dtype).max - arr
    elif photometric == 3:  # palette
        if colormap is None or arr.ndim != 2:
            raise ValueError("palette TIFF without a usable colour map")
        cmap = np.asarray(colormap).astype(np.uint32)
        if cmap.max() > 255:  # TIFF colour maps are 16-bit (x*257 or x*256 by convention)
            cmap = cmap >> 8
        arr = cmap[:, arr.astype(np.intp)].transpose(1, 2, 0).astype(np.uint8)
    elif photometric == 5:  # SEPARATED (CMYK)
        if arr.ndim != 3 or arr.shape[2] < 4:
            raise ValueError("CMYK TIFF without four channels")
        top = float(np.iinfo(arr.dtype).max)
        cmy = arr[:, :, :3].astype(np.float64)
        k = arr[:, :, 3:4].astype(np.float64)
        rgb = (top - cmy) * (top - k) / top
        arr = np.round(rgb).astype(arr.dtype)
    elif photometric not in (1, 2):  # 1 MINISBLACK, 2 RGB; others (YCbCr, CIELab, ...) elsewhere
        raise ValueError(f"TIFF photometric interpretation {photometric} not handled by tifffile")
    return _finish(arr, bgr=False)


def _decode_dicom(data: bytes) -> np.ndarray:
    try:
        return dicom.pixels(data)
    except dicom.DicomRefused as exc:
        raise _Refused(str(exc)) from None


_BACKENDS = {
    "png": (("opencv", _decode_png), ("pillow", _decode_pil)),
    "jpeg": (("pillow", _decode_pil),),
    "tiff": (("tifffile", _decode_tifffile), ("opencv", _decode_cv2), ("pillow", _decode_pil)),
    "dicom": (("pydicom", _decode_dicom),),
}


def decode_image(data: bytes, name: str, max_pixels: int = 64_000_000) -> np.ndarray:
    """Decode PNG/JPEG/TIFF/DICOM bytes.

    Args:
        data: encoded file content.
        name: how to refer to the input in error messages (file name or id).
        max_pixels: refuse images with more than this many pixels (checked from the header,
            before decoding where the header allows it).

    Returns:
        ``uint8`` or ``uint16`` array of shape ``(H, W)`` (gray; gray+alpha loses alpha) or
        ``(H, W, 3)`` (RGB; RGBA loses alpha, palettes are expanded, CMYK is converted).

    Raises:
        ImageDecodeError: naming ``name`` for zero-byte, unknown-format, corrupt or truncated
        data, unsupported sample types (float, signed, >16 bit), images smaller than
        ``MIN_SIDE`` on a side or larger than ``max_pixels``.
    """
    if data is None or len(data) == 0:
        raise ImageDecodeError(name, "zero-byte input")
    data = bytes(data)
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageDecodeError(name, "not a PNG, JPEG, TIFF or DICOM file (unrecognised signature)")
    try:
        size = _probe_size(data, fmt)
    except _Refused as exc:
        raise ImageDecodeError(name, str(exc)) from None
    if size is not None:
        _check_size(size[0], size[1], name, max_pixels)
    reasons = []
    for backend, fn in _BACKENDS[fmt]:
        try:
            arr = fn(data)
        except ImageDecodeError:
            raise
        except _Refused as exc:
            raise ImageDecodeError(name, str(exc)) from None
        except Exception as exc:  # backend-specific failure: try the next one
            reasons.append(f"{backend}: {type(exc).__name__}: {exc}")
            continue
        _check_size(arr.shape[0], arr.shape[1], name, max_pixels)
        return arr
    raise ImageDecodeError(name, f"corrupt, truncated or unsupported {fmt.upper()} data ({'; '.join(reasons)})")


def decode_mask(data: bytes, name: str) -> np.ndarray:
    """Decode a binary mask image: bool ``(H, W)``, True where any channel is nonzero.

    Raises ImageDecodeError naming ``name`` when the data cannot be decoded.
    """
    arr = decode_image(data, name)
    if arr.ndim == 3:
        return np.any(arr != 0, axis=2)
    return arr != 0


def to_gray_float(image: np.ndarray) -> np.ndarray:
    """Convert a decoded image to float32 ``(H, W)`` in ``[0, 1]`` without NaNs.

    * ``(H, W, 3)`` RGB is reduced to BT.601 luminance first;
    * ``uint8`` is divided by 255 (absolute scale);
    * ``uint16`` (and other integers) are min-max scaled over the image; a constant image gives
      zeros;
    * ``bool`` maps to {0, 1}; float input is clipped to ``[0, 1]`` with NaN -> 0.
    """
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        gray = arr[:, :, :3].astype(np.float64) @ _LUMA
    elif arr.ndim == 2:
        gray = arr.astype(np.float64)
    else:
        raise ValueError(f"expected (H, W) or (H, W, 3) image, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        out = gray / 255.0
    elif arr.dtype == np.bool_:
        out = gray
    elif arr.dtype.kind in "ui":
        lo, hi = (float(gray.min()), float(gray.max())) if gray.size else (0.0, 0.0)
        out = (gray - lo) / (hi - lo) if hi > lo else np.zeros_like(gray)
    else:
        out = np.nan_to_num(gray, nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def to_rgb_uint8(gray: np.ndarray) -> np.ndarray:
    """float ``(H, W)`` in ``[0, 1]`` -> uint8 ``(H, W, 3)`` (values clipped, NaN -> 0, rounded)."""
    g = np.asarray(gray, dtype=np.float32)
    if g.ndim != 2:
        raise ValueError(f"expected a (H, W) array, got shape {g.shape}")
    g = np.clip(np.nan_to_num(g, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    u8 = np.rint(g * 255.0).astype(np.uint8)
    return np.repeat(u8[:, :, None], 3, axis=2)
