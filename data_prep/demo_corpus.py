"""A synthetic captioned-image corpus whose captions say exactly what is visible.

"a large red circle in the top left on a white background" is drawn as exactly that, so the CPU
demo can check a generated sample against its prompt (dominant colour, rough position) without
any learned metric. The corpus is written like a real dataset: JPEG files plus a URL+caption
parquet (columns ``url``, ``caption``), and is served over loopback HTTP by
:class:`data_prep.http_server.DemoHTTPServer` so the download stage runs the real img2dataset path.

Everything is a pure function of ``seed``: same seed, same files, same bytes.

``bad_fraction > 0`` adds deliberately broken rows so tests can assert exact failure counts:
``missing`` (404), ``html`` (an HTML page served as ``.jpg``), ``truncated`` (half a JPEG),
``empty`` (zero bytes) and, only with ``include_bomb=True``, ``bomb`` (a tiny PNG that declares
40000x40000 pixels; OpenCV refuses it before allocating).
"""
from __future__ import annotations

import contextlib
import io
import itertools
import os
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw
from pydantic import Field

from data_prep.http_server import DemoHTTPServer
from pipeline.configbase import StrictModel

# Eight shape colours, far apart in RGB (min pairwise distance ~90, yellow-orange) and from the backgrounds,
# so "nearest named colour" of a pixel is unambiguous even after JPEG and a bit of diffusion noise.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "orange": (245, 130, 20),
    "purple": (120, 40, 160),
    "cyan": (40, 200, 220),
    "pink": (245, 130, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
# Shape centre as a fraction of the image side (x, y); a 3x3 grid including the centre.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top center": (0.5, 0.25),
    "top right": (0.75, 0.25),
    "middle left": (0.25, 0.5),
    "center": (0.5, 0.5),
    "middle right": (0.75, 0.5),
    "bottom left": (0.25, 0.75),
    "bottom center": (0.5, 0.75),
    "bottom right": (0.75, 0.75),
}
# Shape extent (bounding-box side) as a fraction of the image side. Shapes are large on purpose: a
# diffusion model's loss is spread over pixels, so the shape's share of the image is how much of
# the training signal says "colour" and "position". A large shape at a corner (centre 0.25,
# half-extent <= 0.227 with jitter) still fits inside the image.
SIZES: dict[str, float] = {"small": 0.28, "large": 0.42}
BAD_KINDS: tuple[str, ...] = ("missing", "html", "truncated", "empty")

_CAPTION_RE = re.compile(
    r"^an? (?P<size>\w+) (?P<color>\w+) (?P<shape>\w+) in the (?P<position>[\w ]+?) "
    r"on an? (?P<background>\w+) background$"
)


@dataclass(frozen=True)
class CaptionAttrs:
    """The structured content of a demo caption."""

    color: str
    shape: str
    position: str
    size: str
    background: str

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLORS[self.color]

    @property
    def background_rgb(self) -> tuple[int, int, int]:
        return BACKGROUNDS[self.background]

    @property
    def center_xy(self) -> tuple[float, float]:
        """Nominal shape centre as fractions of width/height."""
        return POSITIONS[self.position]


@dataclass(frozen=True)
class CorpusInfo:
    parquet_path: str  # URL list: columns url, caption (bad rows included)
    image_dir: str  # where the served files live
    num_good: int
    num_bad: int
    bad_kinds: dict[str, int]  # kind -> count, e.g. {"missing": 2, "html": 1, ...}

    @property
    def num_images(self) -> int:
        return self.num_good + self.num_bad


class DemoCorpusConfig(StrictModel):
    """The synthetic corpus generated when ``download.url_list == "demo"``."""

    num_images: int = Field(512, gt=0, description="Rows in the URL list, good and bad together.")
    image_size: int = Field(256, ge=16, le=2048, description="Side of the generated square JPEGs, in pixels.")
    seed: int = Field(0, description="Everything in the corpus (captions, jitter, bad rows) follows from this seed.")
    bad_fraction: float = Field(
        0.05, ge=0.0, le=0.9,
        description="Fraction of rows that are deliberately broken (404, HTML as .jpg, truncated or empty JPEG).",
    )


def caption_of(attrs: CaptionAttrs) -> str:
    art = "an" if attrs.size[0] in "aeiou" else "a"
    bg_art = "an" if attrs.background[0] in "aeiou" else "a"
    return f"{art} {attrs.size} {attrs.color} {attrs.shape} in the {attrs.position} on {bg_art} {attrs.background} background"


def parse_caption(caption: str) -> CaptionAttrs:
    """Inverse of :func:`caption_of`; ValueError for anything that is not a demo caption."""
    m = _CAPTION_RE.match(caption.strip().lower())
    if m is None:
        raise ValueError(f"not a demo caption: {caption!r} (expected e.g. {caption_of(all_attrs()[0])!r})")
    d = m.groupdict()
    for key, table in (("size", SIZES), ("color", COLORS), ("shape", SHAPES), ("position", POSITIONS),
                       ("background", BACKGROUNDS)):
        if d[key] not in table:
            raise ValueError(f"demo caption {caption!r}: unknown {key} {d[key]!r}; allowed: {', '.join(table)}")
    return CaptionAttrs(**d)


def all_attrs() -> list[CaptionAttrs]:
    """Every distinct caption's attributes (8 colours x 5 shapes x 9 positions x 2 sizes x 3 backgrounds)."""
    return [
        CaptionAttrs(color=c, shape=s, position=p, size=z, background=b)
        for c, s, p, z, b in itertools.product(COLORS, SHAPES, POSITIONS, SIZES, BACKGROUNDS)
    ]


def nearest_color(rgb) -> str:
    """Name of the COLORS entry closest (Euclidean RGB) to ``rgb``."""
    v = np.asarray(rgb, dtype=np.float64)
    return min(COLORS, key=lambda k: float(np.sum((np.asarray(COLORS[k], dtype=np.float64) - v) ** 2)))


# The demo check's prompts. Each is a caption the corpus never contains (make_demo_corpus leaves
# them out), while every colour, position and (colour, position) pair of them is still taught
# by other captions: the check then measures composition, not recall of a memorised image.
NUM_CHECK_PROMPTS = 48


def check_attrs(n: int = NUM_CHECK_PROMPTS) -> list[CaptionAttrs]:
    """``n`` held-out captions: every colour equally often, positions spread evenly over the grid
    (colour i takes positions i, i+1, ... of the 9, so no colour is checked at one place only),
    shape/size/background varied by a fixed seed. A pure function of ``n``."""
    colours, positions = list(COLORS), list(POSITIONS)
    rng = np.random.default_rng(12345)
    out: list[CaptionAttrs] = []
    for i in range(n):
        ci, k = i % len(colours), i // len(colours)
        out.append(CaptionAttrs(color=colours[ci], position=positions[(ci + k) % len(positions)],
                                shape=SHAPES[int(rng.integers(len(SHAPES)))],
                                size=list(SIZES)[int(rng.integers(len(SIZES)))],
                                background=list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]))
    if len(set(out)) != len(out):
        raise ValueError(f"check_attrs({n}): more prompts than distinct (colour, position) pairs allow")
    return out


def training_attrs() -> list[CaptionAttrs]:
    """Every caption the corpus may draw: :func:`all_attrs` minus the held-out check prompts."""
    held = set(check_attrs())
    return [a for a in all_attrs() if a not in held]


def demo_prompts(n: int = NUM_CHECK_PROMPTS) -> list[str]:
    """The fixed prompt list of the demo check: the held-out captions of :func:`check_attrs`."""
    return [caption_of(a) for a in check_attrs(n)]


def render(attrs: CaptionAttrs, image_size: int, rng: np.random.Generator | None = None) -> Image.Image:
    """Draw the caption. ``rng`` adds variety that never changes what the caption says: size +-8%
    and a colour offset of at most 12 per channel (colours are >= 90 apart, so the nearest named
    colour stays the caption's). The position is exact, so the shape always covers its nominal
    centre pixel (``attrs.center_xy``)."""
    s = image_size
    scale = 1.0
    fill = COLORS[attrs.color]
    if rng is not None:
        scale = float(rng.uniform(0.92, 1.08))
        fill = tuple(int(np.clip(c + o, 0, 255)) for c, o in zip(fill, rng.integers(-12, 13, size=3)))
    cx = POSITIONS[attrs.position][0] * s
    cy = POSITIONS[attrs.position][1] * s
    h = SIZES[attrs.size] * scale * s / 2  # half extent
    img = Image.new("RGB", (s, s), BACKGROUNDS[attrs.background])
    d = ImageDraw.Draw(img)
    if attrs.shape == "circle":
        d.ellipse((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif attrs.shape == "square":
        d.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif attrs.shape == "triangle":
        d.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)
    elif attrs.shape == "diamond":
        d.polygon([(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)], fill=fill)
    elif attrs.shape == "cross":
        t = h * 0.4  # arm half-thickness: thick enough that JPEG keeps the centre's colour
        d.rectangle((cx - h, cy - t, cx + h, cy + t), fill=fill)
        d.rectangle((cx - t, cy - h, cx + t, cy + h), fill=fill)
    else:
        raise ValueError(f"unknown shape {attrs.shape!r}; allowed: {', '.join(SHAPES)}")
    return img


def _jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    # optimize=False and no EXIF/timestamps: the encoder output is a pure function of the pixels.
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _bomb_png(side: int = 40000) -> bytes:
    """A ~200 KB PNG declaring side x side 1-bit pixels (1.6 Gpx): a decompression bomb by size.
    OpenCV rejects it from the header (CV_IO_MAX_IMAGE_PIXELS = 2^30) without allocating."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * ((side + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    parts = [comp.compress(row * 1000) for _ in range(side // 1000)]
    parts.append(comp.compress(row * (side % 1000)))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


_HTML = b"<!doctype html><html><head><title>Not an image</title></head><body><p>Moved.</p></body></html>\n"


def make_demo_corpus(
    out_dir: str,
    num_images: int,
    image_size: int,
    seed: int,
    bad_fraction: float = 0.0,
    *,
    base_url: str | None = None,
    include_bomb: bool = False,
) -> CorpusInfo:
    """Write ``num_images`` rows (good + bad) under ``out_dir``: ``images/*.jpg`` and ``urls.parquet``.

    ``base_url`` is where ``out_dir`` is served (``DemoHTTPServer(out_dir).base_url``); without it the
    URLs are ``file://`` URIs (for reading the corpus directly: the download stage refuses them). ``num_bad =
    round(num_images * bad_fraction)`` rows are broken, cycling through BAD_KINDS (plus ``bomb``
    with ``include_bomb``) and placed at seed-determined row positions.
    """
    if num_images <= 0:
        raise ValueError(f"num_images must be > 0, got {num_images}")
    if not 0.0 <= bad_fraction < 1.0:
        raise ValueError(f"bad_fraction must be in [0, 1), got {bad_fraction}")
    out_dir = os.path.abspath(out_dir)
    image_dir = os.path.join(out_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    rng = np.random.default_rng(seed)

    num_bad = int(round(num_images * bad_fraction))
    num_good = num_images - num_bad
    kinds = BAD_KINDS + (("bomb",) if include_bomb else ())
    bad_rows = set(rng.choice(num_images, size=num_bad, replace=False).tolist()) if num_bad else set()

    # A random order over the distinct captions minus the check's held-out ones; cycled (with
    # fresh jitter) past their number.
    catalogue = training_attrs()
    order = rng.permutation(len(catalogue))

    if base_url is None:
        def url_of(name: str) -> str:
            return "file://" + os.path.join(image_dir, name)
    else:
        def url_of(name: str) -> str:
            return f"{base_url.rstrip('/')}/images/{name}"

    urls, captions = [], []
    bad_i = 0
    bad_counts: dict[str, int] = {}
    for row in range(num_images):
        attrs = catalogue[order[row % len(catalogue)]]
        item_rng = np.random.default_rng([seed, row])
        name = f"{row:06d}.jpg"
        if row in bad_rows:
            kind = kinds[bad_i % len(kinds)]
            bad_i += 1
            bad_counts[kind] = bad_counts.get(kind, 0) + 1
            path = os.path.join(image_dir, name)
            if kind == "missing":
                name = f"missing_{row:06d}.jpg"  # never written: the server answers 404
            elif kind == "html":
                _write(path, _HTML)
            elif kind == "truncated":
                data = _jpeg_bytes(render(attrs, image_size, item_rng))
                _write(path, data[: len(data) // 2])
            elif kind == "empty":
                _write(path, b"")
            elif kind == "bomb":
                name = f"{row:06d}.png"
                _write(os.path.join(image_dir, name), _bomb_png())
        else:
            _write(os.path.join(image_dir, name), _jpeg_bytes(render(attrs, image_size, item_rng)))
        urls.append(url_of(name))
        captions.append(caption_of(attrs))

    parquet_path = os.path.join(out_dir, "urls.parquet")
    pq.write_table(pa.table({"url": urls, "caption": captions}), parquet_path)
    return CorpusInfo(parquet_path=parquet_path, image_dir=image_dir, num_good=num_good, num_bad=num_bad,
                      bad_kinds=bad_counts)


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


@contextlib.contextmanager
def serve_demo_corpus(out_dir: str, num_images: int, image_size: int, seed: int, bad_fraction: float = 0.0,
                      *, include_bomb: bool = False) -> Iterator[CorpusInfo]:
    """Generate the corpus and serve it on 127.0.0.1 for the duration of the ``with`` block;
    the parquet's URLs point at the live server."""
    with _demo_server(out_dir, f"{num_images}-{image_size}-{seed}-{bad_fraction}-{include_bomb}") as server:
        yield make_demo_corpus(out_dir, num_images, image_size, seed, bad_fraction,
                               base_url=server.base_url, include_bomb=include_bomb)


def _demo_server(out_dir: str, corpus_id: str) -> DemoHTTPServer:
    """The server on a port chosen by the corpus, so that the URLs (which every sample's stored
    json keeps) and with them the download shards are the same bytes run after run; any free port
    when that one is taken (another demo serving at the same time)."""
    preferred = 40_000 + zlib.crc32(corpus_id.encode()) % 10_000
    try:
        return DemoHTTPServer(out_dir, port=preferred).start()
    except OSError:
        return DemoHTTPServer(out_dir).start()
