"""data_prep.image_decode: safe (header checks before decoding) and faithful (16-bit, EXIF, alpha,
first frame) decoding, each format checked against its ground-truth pixels by correlation.

The image generators (tests/support/images.py) are also used by tests/stages/test_download_realworld.py
(through the real img2dataset path): every "odd but real" file is built from a known RGB array, so
the test knows exactly what the stored pixels must look like.
"""
from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from data_prep.image_decode import DEFAULT_MAX_PIXELS, ImageRejected, decode_rgb
from tests.support.images import BACKGROUND, corr, faithful_cases, png_gray, save_image, truth_rgb


@pytest.mark.parametrize("name", sorted(faithful_cases()))
def test_decodes_faithfully_per_format(name):
    data, want = faithful_cases()[name]
    got = np.asarray(decode_rgb(data, background=BACKGROUND))
    assert got.dtype == np.uint8 and got.shape == want.shape, (name, got.shape)
    c = corr(got, want)
    assert c > 0.98, (name, c)
    # The per-channel mean is right too (a white or black image can still correlate by luck).
    assert np.abs(got.astype(float).mean((0, 1)) - want.astype(float).mean((0, 1))).max() < 12, name


def test_the_bugs_this_fixes_are_real():
    """Pillow's plain path gives what the issue saw: 16-bit white, EXIF ignored, alpha dropped."""
    cases = faithful_cases()
    plain = np.asarray(Image.open(io.BytesIO(cases["png16_gray"][0])).convert("RGB"))
    assert plain.min() == 255  # clipped to white
    data, want = cases["jpeg_exif_rotated"]
    assert np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).shape != want.shape
    gif = np.asarray(decode_rgb(cases["gif_animated"][0]))
    assert corr(gif, 255 - truth_rgb()) < -0.9  # the first frame, not the second


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    big = png_gray(10_000, 10_000)  # 100 MP, valid, ~100 KB
    assert len(big) < 300_000
    t0 = time.perf_counter()
    with pytest.raises(ImageRejected, match=r"image too large: 10000x10000 = 100.0 MP exceeds") as e:
        decode_rgb(big)
    assert e.value.reason == "too_large"
    assert time.perf_counter() - t0 < 0.5  # decoding it would take ~1 s and 100 MB
    assert DEFAULT_MAX_PIXELS == 90_000_000
    assert decode_rgb(big, max_pixels=None, draft=None).size == (10_000, 10_000)  # the limit is the only guard


@pytest.mark.parametrize("size,kw,reason", [
    ((1, 1), {"min_side": 32}, "too_small"),
    ((8000, 10), {"min_side": 32, "max_aspect_ratio": 4.0}, "too_small"),
    ((400, 40), {"min_side": 32, "max_aspect_ratio": 4.0}, "aspect_ratio"),
])
def test_degenerate_sizes_are_rejected_by_reason(size, kw, reason):
    with pytest.raises(ImageRejected) as e:
        decode_rgb(png_gray(*size), **kw)
    assert e.value.reason == reason
    assert decode_rgb(png_gray(*size)).size == size  # off by default in the decoder itself


@pytest.mark.parametrize("data", [b"", b"<html>not an image</html>", png_gray(64, 64)[:60]])
def test_garbage_is_undecodable(data):
    with pytest.raises(ImageRejected, match="Image decoding error") as e:
        decode_rgb(data)
    assert e.value.reason == "undecodable"


@pytest.mark.parametrize("name", sorted(faithful_cases()))
def test_bgr_path_matches_the_pillow_path(name):
    """decode_bgr_array (img2dataset's child) takes OpenCV for plain files, Pillow for the rest:
    either way the same pixels as decode_rgb."""
    from data_prep.image_decode import decode_bgr_array

    data, want = faithful_cases()[name]
    bgr = decode_bgr_array(data, background=BACKGROUND)
    assert bgr.dtype == np.uint8 and bgr.shape == want.shape, (name, bgr.shape)
    rgb = bgr[:, :, ::-1]
    assert corr(rgb, np.asarray(decode_rgb(data, background=BACKGROUND))) > 0.99, name
    assert corr(rgb, want) > 0.98, name


def test_truncated_jpeg_is_rejected_not_grey_filled():
    data = save_image(Image.fromarray(truth_rgb(256, 256)), "JPEG")
    from data_prep.image_decode import decode_bgr_array

    with pytest.raises(ImageRejected, match="Image decoding error"):
        decode_bgr_array(data[: len(data) // 2])


def test_a_higher_configured_limit_is_honoured_and_pillows_guard_stays():
    huge = png_gray(15_000, 14_000)  # 210 MP: over twice Pillow's own limit, which refuses it at open
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(huge))
    # Allowed by the config, so the header checks run (here the shorter side decides, nothing decoded).
    with pytest.raises(ImageRejected, match="image too small: 15000x14000") as e:
        decode_rgb(huge, max_pixels=300_000_000, min_side=20_000)
    assert e.value.reason == "too_small"
    with pytest.raises(ImageRejected, match="too large"):
        decode_rgb(huge)  # the default limit
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(huge))  # Pillow's global guard is back for everyone else
