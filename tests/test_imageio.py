"""plabel.data.imageio: decoding of hand-made PNG / JPEG / TIFF inputs with known pixels."""
from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

from plabel.data.imageio import (
    ImageDecodeError,
    decode_image,
    decode_mask,
    sniff_format,
    to_gray_float,
    to_rgb_uint8,
)

H, W = 12, 10


def _pil_bytes(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _tiff_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kw)
    return buf.getvalue()


def _gray8() -> np.ndarray:
    return (np.arange(H * W).reshape(H, W) * 2).astype(np.uint8)


def _rgb8() -> np.ndarray:
    g = _gray8()
    return np.dstack([g, 255 - g, g // 2]).astype(np.uint8)


# --------------------------------------------------------------------------------------------- ok


def test_png_gray8_roundtrip_and_float_scale():
    g = _gray8()
    img = decode_image(cv2.imencode(".png", g)[1].tobytes(), "g8.png")
    assert img.dtype == np.uint8 and img.shape == (H, W)
    np.testing.assert_array_equal(img, g)
    f = to_gray_float(img)
    assert f.dtype == np.float32 and f.shape == (H, W)
    assert f[0, 0] == 0.0
    assert f[0, 1] == pytest.approx(2 / 255)
    assert f.max() == pytest.approx(g.max() / 255)  # absolute scale, not min-max


def test_png_gray16_min_max_scaling():
    a = np.full((H, W), 2000, dtype=np.uint16)
    a[0, 0] = 1000
    a[0, 1] = 3000
    a[0, 2] = 1500
    img = decode_image(cv2.imencode(".png", a)[1].tobytes(), "g16.png")
    assert img.dtype == np.uint16
    np.testing.assert_array_equal(img, a)
    f = to_gray_float(img)
    assert f[0, 0] == 0.0 and f[0, 1] == 1.0
    assert f[0, 2] == pytest.approx(0.25)
    assert f[5, 5] == pytest.approx(0.5)


def test_constant_uint16_gives_zeros_and_no_nan():
    f = to_gray_float(np.full((H, W), 777, dtype=np.uint16))
    assert f.dtype == np.float32 and not np.isnan(f).any() and (f == 0).all()


def test_png_rgb_and_luminance():
    rgb = _rgb8()
    img = decode_image(_pil_bytes(Image.fromarray(rgb), "PNG"), "rgb.png")
    assert img.shape == (H, W, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(img, rgb)  # R, G, B order (not BGR)
    pure = np.zeros((H, W, 3), np.uint8)
    pure[..., 0] = 255  # red
    assert to_gray_float(pure)[0, 0] == pytest.approx(0.299, abs=1e-6)


def test_png_rgb16_keeps_16_bits():
    rgb = (np.arange(H * W * 3).reshape(H, W, 3) * 157).astype(np.uint16)
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    img = decode_image(cv2.imencode(".png", bgr)[1].tobytes(), "rgb16.png")
    assert img.dtype == np.uint16
    np.testing.assert_array_equal(img, rgb)


def test_png_rgba_drops_alpha():
    rgb = _rgb8()
    rgba = np.dstack([rgb, np.full((H, W), 7, np.uint8)])
    img = decode_image(_pil_bytes(Image.fromarray(rgba, "RGBA"), "PNG"), "rgba.png")
    np.testing.assert_array_equal(img, rgb)


def test_png_gray_alpha_drops_alpha():
    g = _gray8()
    la = Image.fromarray(np.dstack([g, 255 - g]), "LA")
    img = decode_image(_pil_bytes(la, "PNG"), "la.png")
    assert img.shape == (H, W)
    np.testing.assert_array_equal(img, g)


def test_png_palette_expanded():
    idx = (np.arange(H * W).reshape(H, W) % 3).astype(np.uint8)
    im = Image.fromarray(idx, "P")
    palette = [10, 20, 30, 200, 100, 0, 0, 0, 255]
    im.putpalette(palette + [0] * (768 - len(palette)))
    img = decode_image(_pil_bytes(im, "PNG"), "pal.png")
    expected = np.array(palette, np.uint8).reshape(3, 3)[idx]
    np.testing.assert_array_equal(img, expected)


def test_jpeg_gray_and_cmyk():
    g = np.full((16, 16), 128, np.uint8)
    img = decode_image(_pil_bytes(Image.fromarray(g), "JPEG", quality=95), "g.jpg")
    assert img.shape == (16, 16) and abs(int(img[8, 8]) - 128) <= 2
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:, :8] = (200, 40, 40)
    rgb[:, 8:] = (40, 40, 200)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    img = decode_image(_pil_bytes(cmyk, "JPEG", quality=95), "cmyk.jpg")
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8
    assert np.abs(img[4, 2].astype(int) - (200, 40, 40)).max() <= 12
    assert np.abs(img[4, 13].astype(int) - (40, 40, 200)).max() <= 12


def test_tiff_cmyk_palette_lzw():
    rgb = _rgb8()
    cmyk_tif = _pil_bytes(Image.fromarray(rgb).convert("CMYK"), "TIFF")
    np.testing.assert_array_equal(decode_image(cmyk_tif, "cmyk.tif"), rgb)
    # LZW needs imagecodecs in tifffile: the decoder must fall back to another backend
    lzw = _pil_bytes(Image.fromarray(rgb).convert("CMYK"), "TIFF", compression="tiff_lzw")
    np.testing.assert_array_equal(decode_image(lzw, "cmyk_lzw.tif"), rgb)
    idx = (np.arange(H * W).reshape(H, W) % 2).astype(np.uint8)
    pal = Image.fromarray(idx, "P")
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img = decode_image(_pil_bytes(pal, "TIFF"), "pal.tif")
    np.testing.assert_array_equal(img, np.array([[255, 0, 0], [0, 0, 255]], np.uint8)[idx])


def test_tiff_16bit_gray_rgb_and_miniswhite():
    a = (np.arange(H * W).reshape(H, W) * 500).astype(np.uint16)
    img = decode_image(_tiff_bytes(a), "g16.tif")
    assert img.dtype == np.uint16
    np.testing.assert_array_equal(img, a)
    f = to_gray_float(img)
    assert f[0, 1] == pytest.approx(500 / a.max())
    rgb = (np.arange(H * W * 3).reshape(H, W, 3) * 150).astype(np.uint16)
    np.testing.assert_array_equal(decode_image(_tiff_bytes(rgb, photometric="rgb"), "rgb16.tif"), rgb)
    inverted = decode_image(_tiff_bytes(_gray8(), photometric="miniswhite"), "mw.tif")
    np.testing.assert_array_equal(inverted, 255 - _gray8())


def test_decode_mask_nonzero_inside():
    m = np.zeros((H, W), np.uint8)
    m[2:5, 3:7] = 255
    m[9, 9] = 1
    mask = decode_mask(cv2.imencode(".png", m)[1].tobytes(), "m.png")
    assert mask.dtype == np.bool_ and mask.shape == (H, W)
    np.testing.assert_array_equal(mask, m != 0)
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[1, 1, 2] = 9
    assert decode_mask(_pil_bytes(Image.fromarray(rgb), "PNG"), "m_rgb.png").sum() == 1


def test_to_rgb_uint8():
    g = np.array([[0.0, 0.5, 1.0, 2.0, -1.0, np.nan]] * 8, np.float32)
    out = to_rgb_uint8(g)
    assert out.dtype == np.uint8 and out.shape == (8, 6, 3)
    np.testing.assert_array_equal(out[0, :, 0], [0, 128, 255, 255, 0, 0])
    assert (out[..., 0] == out[..., 2]).all()


def test_sniff_format():
    assert sniff_format(cv2.imencode(".png", _gray8())[1].tobytes()) == "png"
    assert sniff_format(_pil_bytes(Image.fromarray(_gray8()), "JPEG")) == "jpeg"
    assert sniff_format(_tiff_bytes(_gray8())) == "tiff"
    assert sniff_format(b"GIF89a....") is None


# ------------------------------------------------------------------------------------------ errors


def _raises_naming(data: bytes, name: str, match: str | None = None, **kw):
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, name, **kw)
    assert name in str(info.value)
    if match:
        assert match in str(info.value)
    return info.value


def test_zero_byte():
    _raises_naming(b"", "empty_001.png", "zero-byte")


def test_corrupt_bytes():
    rng = np.random.default_rng(0)
    _raises_naming(rng.integers(0, 256, 500, dtype=np.uint8).tobytes(), "noise_002.png", "unrecognised")
    png = cv2.imencode(".png", _gray8())[1].tobytes()
    _raises_naming(png[:8] + b"\x00" * 200, "sig_only_003.png")
    _raises_naming(b"\xff\xd8\xff" + b"garbage" * 20, "bad_004.jpg")
    _raises_naming(b"II*\x00" + b"\x00" * 60, "bad_005.tif")


def test_truncated_png():
    rng = np.random.default_rng(1)
    noisy = rng.integers(0, 256, (64, 64), dtype=np.uint8)  # incompressible: IDAT is large
    png = cv2.imencode(".png", noisy)[1].tobytes()
    for cut in (len(png) // 2, len(png) - 20, 30):
        _raises_naming(png[:cut], f"trunc_{cut}.png")


def test_truncated_jpeg():
    rng = np.random.default_rng(2)
    jpg = _pil_bytes(Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)), "JPEG")
    _raises_naming(jpg[: len(jpg) // 2], "trunc.jpg")


def test_tiny_images():
    _raises_naming(cv2.imencode(".png", np.zeros((1, 20), np.uint8))[1].tobytes(), "line_1x20.png", "1x20")
    _raises_naming(cv2.imencode(".png", np.zeros((4, 4), np.uint8))[1].tobytes(), "tiny_4x4.png", "at least")
    _raises_naming(_tiff_bytes(np.zeros((7, 30), np.uint8)), "tiny.tif", "7x30")
    assert decode_image(cv2.imencode(".png", np.zeros((8, 8), np.uint8))[1].tobytes(), "ok8.png").shape == (8, 8)


def test_oversized_image():
    png = cv2.imencode(".png", np.zeros((100, 120), np.uint8))[1].tobytes()
    err = _raises_naming(png, "big.png", "max_pixels=5000", max_pixels=5000)
    assert "12000" in str(err)
    _raises_naming(_tiff_bytes(np.zeros((100, 120), np.uint16)), "big.tif", "max_pixels", max_pixels=5000)
    _raises_naming(_pil_bytes(Image.fromarray(np.zeros((100, 120), np.uint8)), "JPEG"), "big.jpg",
                   "max_pixels", max_pixels=5000)


def test_unsupported_dtypes():
    _raises_naming(_tiff_bytes(np.zeros((H, W), np.float32)), "float.tif", "unsupported")
    _raises_naming(_tiff_bytes(np.zeros((H, W), np.int16)), "signed.tif")


def test_decode_mask_error_names_input():
    with pytest.raises(ImageDecodeError, match="masks/heart/x.png"):
        decode_mask(b"not an image", "masks/heart/x.png")
