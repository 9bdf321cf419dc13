"""Does a sample follow its demo-corpus prompt?  A cheap, model-free measurement.

The demo corpus (``data_prep/demo_corpus.py``) draws coloured shapes on a plain background and
captions them ("a red circle on the left", ...). Its captions parse back into attributes, so for a
sample whose prompt is such a caption we can check the two attributes a small CPU-trained cascade
can plausibly learn:

* colour: the dominant *non-background* colour — every pixel far from the background colour
  votes for its nearest entry of the corpus ``COLORS`` table; the winner must be the prompt's
  colour. Chance is ``1 / len(COLORS)`` (printed beside the accuracy so a reader can tell
  "learned something" from "lucky").
* position (when the prompt names one): the centroid of the coloured mass must be nearest to
  the prompt's nominal position among the corpus ``POSITIONS`` (a 3x3 grid; chance 1/9).

* grain: the pixel standard deviation (0-255) of the background in the image's border band
  (the outer 1/16 of the side, shape pixels left out). The corpus's backgrounds are flat, so a
  model that learned them scores ~0-3; visible grain is > 8.

The background colour is estimated from the image border (median), so the check needs nothing
from the corpus beyond ``parse_caption``, ``COLORS`` and ``POSITIONS``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageFilter

ANALYSIS_SIZE = 96  # samples are analysed at <= this size: colour and centroid survive, cost doesn't grow
FOREGROUND_DISTANCE = 60.0  # RGB distance from the background beyond which a pixel is "coloured"
MIN_FOREGROUND_FRACTION = 0.002  # fewer coloured pixels than this: the image shows nothing
BORDER_FRACTION = 1 / 16  # the band whose background grain is measured (shapes stay inside it mostly)


# ---------------------------------------------------------------- corpus adapters


def corpus_colours() -> dict[str, tuple[int, int, int]]:
    """The demo corpus's colour table: name -> (r, g, b) in 0..255."""
    from data_prep import demo_corpus  # pyarrow: t2i run prints demo checks with this module, lightly

    return {name: tuple(int(c) for c in rgb) for name, rgb in demo_corpus.COLORS.items()}


def parse_demo_prompt(prompt: str) -> tuple[str, str] | None:
    """(colour, position) if ``prompt`` is a demo-corpus caption, else None."""
    from data_prep import demo_corpus  # pyarrow: t2i run prints demo checks with this module, lightly

    try:
        attrs = demo_corpus.parse_caption(prompt)
    except ValueError:
        return None
    return attrs.color, attrs.position


def is_demo_prompt(prompt: str) -> bool:
    return parse_demo_prompt(prompt) is not None


# ---------------------------------------------------------------- measurement


def _as_image(img: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img.astype(np.uint8))
    img = img.convert("RGB")
    if max(img.size) > ANALYSIS_SIZE:
        # NEAREST keeps pure palette colours (a box filter would invent blends at shape edges)
        # and keeps per-pixel grain (a box filter would average it away before it is measured).
        scale = ANALYSIS_SIZE / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.NEAREST)
    return img


def _as_array(img: Image.Image | np.ndarray) -> np.ndarray:
    # A median filter removes per-pixel grain (few-step samplers, small upsamplers) that would
    # otherwise count as "coloured" pixels of every hue; flat shapes and their colours survive it.
    return np.asarray(_as_image(img).filter(ImageFilter.MedianFilter(5)), dtype=np.float32)


def background_std(img: Image.Image | np.ndarray) -> float:
    """Grain of the background: std (0-255, RMS over the RGB channels) of the unfiltered pixels of
    the border band that are background. Which pixels are background is decided on the
    median-filtered image, so grain itself cannot hide from the measurement, while the pixels of a
    shape reaching into the band are left out."""
    small = _as_image(img)
    raw = np.asarray(small, dtype=np.float32)
    smooth = np.asarray(small.filter(ImageFilter.MedianFilter(5)), dtype=np.float32)
    h, w = raw.shape[:2]
    k = max(1, round(min(h, w) * BORDER_FRACTION))
    band = np.zeros((h, w), dtype=bool)
    band[:k], band[-k:], band[:, :k], band[:, -k:] = True, True, True, True
    bg = background_colour(smooth)
    fg = np.linalg.norm(smooth - bg, axis=-1) > FOREGROUND_DISTANCE
    # Grown by 3 pixels: the median filter rounds a shape's corners, whose raw pixels are no grain.
    fg = np.asarray(Image.fromarray(fg.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(7))) > 0
    sel = band & ~fg
    if sel.sum() < 2:
        sel = band
    return float(np.sqrt(raw[sel].var(axis=0).mean()))


def background_colour(arr: np.ndarray) -> np.ndarray:
    """Median colour of the 1-pixel border: the corpus draws shapes away from the edges."""
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]], axis=0)
    return np.median(border, axis=0)


@dataclass
class Analysis:
    colour: str | None  # dominant non-background colour, None when nothing stands out
    centroid: tuple[float, float] | None  # (x, y) of the coloured mass in [0, 1]
    foreground_fraction: float


def analyse(img: Image.Image | np.ndarray, colours: Mapping[str, tuple[int, int, int]]) -> Analysis:
    arr = _as_array(img)
    bg = background_colour(arr)
    fg = np.linalg.norm(arr - bg, axis=-1) > FOREGROUND_DISTANCE
    frac = float(fg.mean())
    if frac < MIN_FOREGROUND_FRACTION:
        return Analysis(None, None, frac)
    names = list(colours)
    table = np.asarray([colours[n] for n in names], dtype=np.float32)  # [K, 3]
    pix = arr[fg]  # [P, 3]
    nearest = np.argmin(((pix[:, None, :] - table[None]) ** 2).sum(-1), axis=1)
    votes = np.bincount(nearest, minlength=len(names))
    ys, xs = np.nonzero(fg)
    h, w = fg.shape
    centroid = (float((xs.mean() + 0.5) / w), float((ys.mean() + 0.5) / h))
    return Analysis(names[int(votes.argmax())], centroid, frac)


def corpus_positions() -> dict[str, tuple[float, float]]:
    """The demo corpus's nominal shape centres: position name -> (x, y) as fractions of the side."""
    from data_prep import demo_corpus  # pyarrow: t2i run prints demo checks with this module, lightly

    return {str(k): (float(v[0]), float(v[1])) for k, v in demo_corpus.POSITIONS.items()}


def position_matches(position: str, centroid: tuple[float, float] | None,
                     positions: Mapping[str, tuple[float, float]] | None = None) -> bool:
    """Whether the coloured mass's centroid is nearest to the prompt's nominal position (of the
    corpus's 3x3 grid: chance is 1/9 for a centroid anywhere)."""
    if centroid is None:
        return False
    positions = positions if positions is not None else corpus_positions()
    if position not in positions:
        raise ValueError(f"unknown position {position!r}; allowed: {', '.join(positions)}")
    x, y = centroid
    nearest = min(positions, key=lambda k: (positions[k][0] - x) ** 2 + (positions[k][1] - y) ** 2)
    return nearest == position


@dataclass
class SampleVerdict:
    prompt: str
    want_colour: str
    got_colour: str | None
    want_position: str | None
    position_ok: bool | None

    @property
    def colour_ok(self) -> bool:
        return self.got_colour == self.want_colour

    def note(self) -> str:
        s = f"colour {self.got_colour or 'none'} ({'ok' if self.colour_ok else 'want ' + self.want_colour})"
        if self.want_position is not None:
            s += f", position {'ok' if self.position_ok else 'off (want ' + self.want_position + ')'}"
        return s


@dataclass
class DemoCheck:
    n: int  # samples whose prompt is a demo caption (others are ignored)
    colour_matches: int
    colour_accuracy: float
    position_accuracy: float | None  # None when no checked prompt names a position
    chance: float  # 1 / len(COLORS)
    position_n: int = 0  # checked samples whose prompt names a position
    position_correct: int = 0
    position_chance: float | None = None  # 1 / number of corpus positions
    background_std: float | None = None  # mean over checked samples of background_std (0-255)
    verdicts: list[SampleVerdict] = field(default_factory=list)

    def line(self) -> str:
        if self.n == 0:
            return "demo check: no sample has a demo-corpus prompt"
        s = (f"demo check: colour {self.colour_matches}/{self.n} = {self.colour_accuracy:.2f} "
             f"(chance {self.chance:.2f})")
        if self.position_accuracy is not None:
            s += (f", position {self.position_correct}/{self.position_n} = {self.position_accuracy:.2f}"
                  f" (chance {self.position_chance:.2f})")
        if self.background_std is not None:
            s += f", background std {self.background_std:.1f}/255"
        return s

    def metrics(self) -> dict[str, float]:
        m = {"demo_n": float(self.n), "demo_colour_accuracy": self.colour_accuracy, "demo_colour_chance": self.chance}
        if self.position_accuracy is not None:
            m["demo_position_accuracy"] = self.position_accuracy
            m["demo_position_chance"] = float(self.position_chance)
        if self.background_std is not None:
            m["demo_background_std"] = self.background_std
        return m


def figures_by_cascade(metrics: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """A sample manifest's ``<cascade>_demo_*`` figures, per cascade (CLIP-guided halves included):
    {cascade: {"demo_n": ..., "demo_colour_accuracy": ..., ...}}."""
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        cascade, sep, figure = key.partition("_demo_")
        if sep and cascade and figure:
            out.setdefault(cascade, {})["demo_" + figure] = value
    return {c: f for c, f in out.items() if "demo_colour_accuracy" in f}


def check_samples(samples: Iterable[tuple[str, Image.Image | np.ndarray]],
                  colours: Mapping[str, tuple[int, int, int]] | None = None) -> DemoCheck:
    """Score (prompt, image) pairs; pairs whose prompt is not a demo caption are skipped."""
    colours = dict(colours) if colours is not None else corpus_colours()
    positions: dict[str, tuple[float, float]] | None = None
    verdicts: list[SampleVerdict] = []
    grain: list[float] = []
    for prompt, img in samples:
        parsed = parse_demo_prompt(prompt)
        if parsed is None:
            continue
        want_colour, want_pos = parsed
        if want_colour not in colours:
            raise ValueError(f"prompt {prompt!r} has colour {want_colour!r} not in COLORS {sorted(colours)}")
        a = analyse(img, colours)
        pos_ok = None
        if want_pos:
            positions = positions if positions is not None else corpus_positions()
            pos_ok = position_matches(want_pos, a.centroid, positions)
        verdicts.append(SampleVerdict(prompt, want_colour, a.colour, want_pos, pos_ok))
        grain.append(background_std(img))
    n = len(verdicts)
    cm = sum(v.colour_ok for v in verdicts)
    with_pos = [v for v in verdicts if v.position_ok is not None]
    pm = sum(bool(v.position_ok) for v in with_pos)
    return DemoCheck(
        n=n, colour_matches=cm, colour_accuracy=cm / n if n else 0.0,
        position_accuracy=pm / len(with_pos) if with_pos else None,
        chance=1.0 / len(colours), position_n=len(with_pos), position_correct=pm,
        position_chance=1.0 / len(positions) if positions else None,
        background_std=float(np.mean(grain)) if grain else None, verdicts=verdicts,
    )


def all_demo_prompts(prompts: Sequence[str]) -> bool:
    """True when every prompt is a demo caption (the sample stage then runs the check)."""
    return bool(prompts) and all(is_demo_prompt(p) for p in prompts)
