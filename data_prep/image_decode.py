"""One image decoder for every process that turns downloaded bytes into pixels.

Safe by default: the pixel count, the shorter side and the aspect ratio are read from the
image *header* (Pillow's ``Image.open`` is lazy) and checked before a single pixel is decoded,
so a 20000x20000 PNG of a few hundred KB costs microseconds, not 1.6 GB and seconds. Faithful:

* high bit depth (16-bit grey/RGB PNG, 32-bit int/float TIFF) is scaled to 8 bits, not clipped
  to white as a plain ``convert("RGB")`` of an ``I`` image (or a uint16 array JPEG-encoded) does;
* the EXIF orientation tag is applied, so a phone photo stands upright;
* transparency (alpha, palette or ``tRNS``) is composited on a configurable background colour;
* an animated GIF/WebP/APNG gives its first frame.

Used by the download stage (installed into img2dataset's resizer in its child process, see
data_prep/download/child.py), and by the training loader (stages/training/loader.py). Rejections raise
:class:`ImageRejected` whose message starts with a stable reason phrase (``REASONS``), which is how
the download stage counts rejections by reason from img2dataset's per-shard error strings.
"""
from __future__ import annotations

import io
import math
import threading
import warnings
from typing import Any, Sequence

import numpy as np
from PIL import Image

# About Pillow's own default (89,478,485 = 2^30 / 12, a 9459x9459 image): 256 MB of RGB.
DEFAULT_MAX_PIXELS = 90_000_000
# Decoded only after the header check; Pillow's global limit is then only a second line of defence
# (it warns above MAX_IMAGE_PIXELS and refuses above twice that).
Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, DEFAULT_MAX_PIXELS)

# Message prefixes (the first words of an ImageRejected) -> reason counted by the download stage.
# "image too small" and "aspect ratio too large" are also img2dataset's own strings.
TOO_LARGE = "image too large"
TOO_SMALL = "image too small"
BAD_ASPECT = "aspect ratio too large"
UNDECODABLE = "Image decoding error"
REASONS = {TOO_LARGE: "too_large", TOO_SMALL: "too_small", BAD_ASPECT: "aspect_ratio", UNDECODABLE: "undecodable"}


class ImageRejected(ValueError):
    """Bytes that must not become a training image; ``reason`` is a key of the stage's counts."""

    def __init__(self, prefix: str, detail: str = ""):
        super().__init__(f"{prefix}: {detail}" if detail else prefix)
        self.reason = REASONS[prefix]


def header_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as declared by the header; nothing decoded yet."""
    return img.size


def check_size(w: int, h: int, max_pixels: int | None, min_side: int = 0,
               max_aspect_ratio: float | None = None) -> None:
    """Raise ImageRejected for a declared size the stage must not decode or keep."""
    if w <= 0 or h <= 0:
        raise ImageRejected(UNDECODABLE, f"header declares {w}x{h}")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageRejected(TOO_LARGE, f"{w}x{h} = {w * h / 1e6:.1f} MP exceeds max_image_pixels "
                                       f"{max_pixels / 1e6:.1f} MP")
    if min(w, h) < min_side:
        raise ImageRejected(TOO_SMALL, f"{w}x{h}, shorter side under min_image_size {min_side}")
    if max_aspect_ratio is not None and math.isfinite(max_aspect_ratio) and max(w, h) / min(w, h) > max_aspect_ratio:
        raise ImageRejected(BAD_ASPECT, f"{w}x{h} exceeds max_aspect_ratio {max_aspect_ratio:g}")


# EXIF orientation (tag 0x0112) -> the transpose that undoes it (same table as ImageOps.exif_transpose).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # a broken EXIF block must not cost the image: treat as upright
        return 1


def _to_8bit(img: Image.Image) -> Image.Image:
    """High-bit-depth single-channel modes -> 'L' by scaling, keeping the full range."""
    mode = img.mode
    if mode.startswith("I;16"):
        a = np.asarray(img).astype(np.uint32)  # I;16 / I;16B / I;16L: 0..65535
        return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L")
    if mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if mode == "F" and np.nanmax(a, initial=0.0) <= 1.0:
            top = 1.0  # float images are conventionally 0..1
        elif np.nanmax(a, initial=0.0) <= 65535:
            top = 65535.0 if np.nanmax(a, initial=0.0) > 255 else 255.0  # 16-bit PNG/TIFF read as 'I'
        else:
            top = float(np.nanmax(a))
        a = np.nan_to_num(a / top * 255.0, nan=0.0)
        return Image.fromarray(np.rint(a.clip(0, 255)).astype(np.uint8), "L")
    return img


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def _composite(img: Image.Image, background: Sequence[int]) -> Image.Image:
    rgba = img.convert("RGBA")
    if rgba.mode != "RGBA":  # RGBa/La (premultiplied) convert through RGBA as well
        rgba = rgba.convert("RGBA")
    bg = Image.new("RGBA", rgba.size, (*[int(c) for c in background], 255))
    return Image.alpha_composite(bg, rgba).convert("RGB")


_PIL_LIMIT = threading.Lock()


def _open(data: bytes, max_pixels: int | None) -> Image.Image:
    """Image.open under our limit. Pillow refuses at open above 2x its global MAX_IMAGE_PIXELS; a
    config allowing more lifts that global only for this (lazy, header-only) call, so the rest of
    the process keeps Pillow's guard."""
    ceiling = Image.MAX_IMAGE_PIXELS
    if ceiling is None or (max_pixels is not None and max_pixels <= 2 * ceiling):
        return Image.open(io.BytesIO(data))
    with _PIL_LIMIT:
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(io.BytesIO(data))
        finally:
            Image.MAX_IMAGE_PIXELS = ceiling


def open_checked(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS, min_side: int = 0,
                 max_aspect_ratio: float | None = None) -> Image.Image:
    """Image.open + the header checks; raises ImageRejected. Nothing is decoded yet."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = _open(data, max_pixels)
        except Image.DecompressionBombError as e:
            raise ImageRejected(TOO_LARGE, str(e)) from e
        except Exception as e:  # not an image Pillow knows (HTML, empty, garbage)
            raise ImageRejected(UNDECODABLE, f"{type(e).__name__}: {e}") from e
    w, h = header_size(img)
    check_size(w, h, max_pixels, min_side, max_aspect_ratio)
    return img


def decode_rgb(data: bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, min_side: int = 0,
               max_aspect_ratio: float | None = None, background: Sequence[int] = (255, 255, 255),
               draft: tuple[int, int] | None = None) -> Image.Image:
    """Bytes -> an upright 8-bit RGB PIL image (first frame), or ImageRejected.

    ``draft`` lets a JPEG decode directly at 1/2..1/8 scale, never below that size (the loader
    asks for its crop size). EXIF orientation swaps width and height, which leaves the shorter
    side and the aspect ratio unchanged, so the header checks hold for the upright image too.
    """
    img = open_checked(data, max_pixels, min_side, max_aspect_ratio)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's "palette with transparency" and EXIF warnings
            orientation = _orientation(img)
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)  # animations: the first frame (what a browser shows before playing)
            if draft is not None and img.format == "JPEG":
                img.draft("RGB", draft)
            img.load()
            img = _to_8bit(img)
            if _has_alpha(img):
                img = _composite(img, background)
            elif img.mode != "RGB":
                img = img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV
            if orientation in _ORIENTATION:
                img = img.transpose(_ORIENTATION[orientation])
    except ImageRejected:
        raise
    except Exception as e:  # truncated data, bad CRC, unsupported mode, decoder errors
        raise ImageRejected(UNDECODABLE, f"{type(e).__name__}: {e}") from e
    return img


def _complete(img: Image.Image, data: bytes) -> bool:
    """Whether the file ends the way its format ends (OpenCV decodes half a JPEG into a grey-filled
    image without complaint; Pillow raises). Odd but valid files fail this and take Pillow's path."""
    if img.format == "JPEG":
        return b"\xff\xd9" in data[-32:]
    if img.format == "PNG":
        return data[-12:-4] == b"\x00\x00\x00\x00IEND"
    if img.format == "WEBP":
        return len(data) >= 12 and int.from_bytes(data[4:8], "little") + 8 <= len(data)
    return False


# Modes OpenCV's IMREAD_COLOR turns into the same pixels as decode_rgb (grey -> BGR, 16-bit -> 8-bit).
_CV2_MODES = ("RGB", "L", "I;16", "I;16B", "I;16L", "CMYK")


def decode_bgr_array(data: bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, min_side: int = 0,
                     max_aspect_ratio: float | None = None, background: Sequence[int] = (255, 255, 255)) -> np.ndarray:
    """decode_rgb as OpenCV's HxWx3 uint8 BGR array (what img2dataset's resizer works on).

    Same header checks first. A complete, opaque, single-frame JPEG/PNG/WebP (nearly all web
    images) is then decoded by OpenCV, ~3x faster than Pillow here: IMREAD_COLOR applies the EXIF
    orientation and scales 16 bits to 8 itself. Everything else (transparency, animation,
    palettes, truncated files, other formats) goes through decode_rgb.
    """
    img = open_checked(data, max_pixels, min_side, max_aspect_ratio)
    if img.format in ("JPEG", "PNG", "WEBP") and img.mode in _CV2_MODES and not _has_alpha(img) \
            and getattr(img, "n_frames", 1) == 1 and _complete(img, data):
        import cv2  # cv2 (img2dataset's dependency): only on the fast decode path

        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if arr is not None and arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype == np.uint8:
            return arr
    arr = np.asarray(decode_rgb(data, max_pixels=max_pixels, min_side=min_side, max_aspect_ratio=max_aspect_ratio,
                                background=background), dtype=np.uint8)
    return np.ascontiguousarray(arr[:, :, ::-1])


def reason_of(error: str) -> str:
    """Reason key for an ImageRejected message (also img2dataset's own resizer strings)."""
    for prefix, reason in REASONS.items():
        if error.startswith(prefix):
            return reason
    if error == "image area too large":  # img2dataset's max_image_area, after decoding
        return "too_large"
    return "undecodable"


__all__ = ["DEFAULT_MAX_PIXELS", "ImageRejected", "check_size", "decode_bgr_array", "decode_rgb",
           "open_checked", "reason_of"]


_RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0, "lanczos": 1, "random": 3}  # PIL.Image.Resampling values


def preprocess_image(data: bytes, pp: dict[str, Any]) -> np.ndarray:
    """Encoded image bytes -> [3, H, W] float32 normalised as the CLIP model expects (raises on bad data).

    The embed stage's preprocess of every training image, and the evaluation's and reranking's
    of every sample (data_prep/clip_score.py), so the two can never differ."""
    size = pp["size"]
    th, tw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    resample = _RESAMPLE.get(pp.get("interpolation", "bicubic"), 3)
    im = decode_rgb(data)  # the download stage's decoder: pixel limits, EXIF, 16-bit, alpha
    w, h = im.size
    mode = pp.get("resize_mode", "shortest")
    if mode == "squash":
        im = im.resize((tw, th), resample)
    elif mode == "longest":  # fit inside, pad with fill_color
        s = min(tw / w, th / h)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        canvas = Image.new("RGB", (tw, th), (int(pp.get("fill_color", 0)),) * 3)
        canvas.paste(im.resize((nw, nh), resample), ((tw - nw) // 2, (th - nh) // 2))
        im = canvas
    else:  # "shortest": resize the short side, centre crop (open_clip's eval transform)
        s = max(tw / w, th / h)
        nw, nh = max(tw, round(w * s)), max(th, round(h * s))
        im = im.resize((nw, nh), resample)
        left, top = (nw - tw) // 2, (nh - th) // 2
        im = im.crop((left, top, left + tw, top + th))
    x = np.asarray(im, dtype=np.float32) / 255.0
    x = (x - np.asarray(pp["mean"], np.float32)) / np.asarray(pp["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))
