"""Images whose pixels the tests know exactly: a smooth RGB pattern saved in every format a
faithful decoder must handle (16-bit, EXIF, alpha, palette transparency, first frame, CMYK...), and
valid grey PNGs of any size (a 100 MP one is ~100 KB).

Used by the decoder's own tests (tests/unit/test_image_decode.py) and, through the real
img2dataset path, by the download tests (tests/stages/test_download_realworld.py, _lists.py).
"""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

W, H = 64, 48
BACKGROUND = (0, 128, 255)  # a non-white background, so compositing on it is visible


def truth_rgb(w: int = W, h: int = H) -> np.ndarray:
    """A smooth, asymmetric RGB pattern (orientation and channel mistakes change it a lot)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 255 * x / (w - 1)
    g = 255 * y / (h - 1)
    b = 127.5 + 127.5 * np.sin(x / w * 2 * np.pi) * np.cos(y / h * np.pi)
    return np.stack([r, g, b], -1).round().clip(0, 255).astype(np.uint8)


def corr(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def save_image(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_gray(w: int, h: int, value: int = 0) -> bytes:
    """A valid 8-bit grey PNG of any size, written row by row (a 100 MP one is ~100 KB)."""
    comp = zlib.compressobj(9)
    row = b"\x00" + bytes([value]) * w
    idat = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def faithful_cases() -> dict[str, tuple[bytes, np.ndarray]]:
    """name -> (file bytes, the RGB pixels a faithful decoder must produce, composited on BACKGROUND)."""
    import cv2

    rgb = truth_rgb()
    gray = rgb.mean(-1).round().astype(np.uint8)
    out: dict[str, tuple[bytes, np.ndarray]] = {}
    out["jpeg"] = (save_image(Image.fromarray(rgb), "JPEG", quality=95), rgb)
    # EXIF orientation 6 = "rotate 90 deg clockwise to display": store the CCW-rotated pixels.
    exif = Image.Exif()
    exif[0x0112] = 6
    out["jpeg_exif_rotated"] = (save_image(Image.fromarray(rgb).transpose(Image.Transpose.ROTATE_90), "JPEG",
                                      quality=95, exif=exif.tobytes()), rgb)
    # 16-bit grey with real information in the high byte; low byte noise must not matter.
    g16 = gray.astype(np.uint16) * 257 + np.random.default_rng(0).integers(0, 200, gray.shape).astype(np.uint16)
    out["png16_gray"] = (save_image(Image.fromarray(g16), "PNG"), np.repeat(gray[..., None], 3, -1))
    out["tiff16_gray"] = (save_image(Image.fromarray(g16), "TIFF"), np.repeat(gray[..., None], 3, -1))
    ok, png48 = cv2.imencode(".png", (rgb[..., ::-1].astype(np.uint16) * 257))  # 16 bits per channel
    assert ok
    out["png16_rgb"] = (png48.tobytes(), rgb)
    alpha = np.linspace(0, 255, W)[None, :].repeat(H, 0).round().astype(np.uint8)
    a = alpha[..., None] / 255.0
    comp = (rgb * a + np.array(BACKGROUND) * (1 - a)).round().astype(np.uint8)
    out["png_rgba"] = (save_image(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "PNG"), comp)
    # Palette image whose index 0 is transparent (tRNS): the left third shows the background.
    pal = np.zeros((H, W), np.uint8)
    pal[:, W // 3:] = 1 + (np.arange(W - W // 3)[None, :] * 200 // (W - W // 3)).astype(np.uint8)
    p = Image.fromarray(pal, "P")
    p.putpalette([0, 0, 0] + [v for i in range(255) for v in (i, 255 - i, 128)])
    lut = np.array([BACKGROUND] + [(i, 255 - i, 128) for i in range(255)], np.uint8)
    out["png_palette_transparent"] = (save_image(p, "PNG", transparency=0), lut[pal])
    frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
    out["gif_animated"] = (save_image(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0),
                           rgb)
    out["jpeg_cmyk"] = (save_image(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95), rgb)
    out["webp"] = (save_image(Image.fromarray(rgb), "WEBP", quality=95), rgb)
    out["jpeg_gray"] = (save_image(Image.fromarray(gray, "L"), "JPEG", quality=95), np.repeat(gray[..., None], 3, -1))
    return out
