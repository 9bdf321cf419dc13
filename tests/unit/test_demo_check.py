"""Demo check: on the corpus's own ground-truth images it must score ~1.0; on noise, ~chance."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from data_prep import demo_corpus
from data_prep.demo_corpus import COLORS, POSITIONS, CaptionAttrs, all_attrs, caption_of, render
from stages.sampling.demo_check import (DemoCheck, analyse, check_samples, corpus_colours, is_demo_prompt,
                               parse_demo_prompt, position_matches)


def _jpeg_roundtrip(img: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)  # what the corpus serves
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _balanced_attrs(n_per_colour: int, seed: int = 0) -> list[CaptionAttrs]:
    """n captions per colour, varied shape/position/size/background."""
    rng = np.random.default_rng(seed)
    attrs = all_attrs()
    out = []
    for c in COLORS:
        mine = [a for a in attrs if a.color == c]
        out += [mine[i] for i in rng.choice(len(mine), size=n_per_colour, replace=False)]
    return out


def test_ground_truth_images_score_perfectly():
    rng = np.random.default_rng(1)
    attrs = _balanced_attrs(12)  # 96 images: every colour, all positions, shapes, sizes, backgrounds
    assert {a.position for a in attrs} == set(POSITIONS)
    assert {a.background for a in attrs} == set(demo_corpus.BACKGROUNDS)
    samples = [(caption_of(a), _jpeg_roundtrip(render(a, 64, rng))) for a in attrs]
    chk = check_samples(samples)
    assert isinstance(chk, DemoCheck)
    assert chk.n == len(attrs)
    assert chk.colour_matches == chk.n and chk.colour_accuracy == 1.0
    assert chk.position_n == chk.n and chk.position_accuracy == 1.0
    assert chk.chance == pytest.approx(1 / len(COLORS))
    line = chk.line()
    assert "1.00" in line and f"chance {1 / len(COLORS):.2f}" in line


def test_ground_truth_at_a_large_size_is_downscaled_and_still_perfect():
    a = CaptionAttrs(color="pink", shape="cross", position="bottom right", size="small", background="gray")
    chk = check_samples([(caption_of(a), render(a, 512))])
    assert chk.colour_accuracy == 1.0 and chk.position_accuracy == 1.0


def test_noise_scores_near_chance():
    rng = np.random.default_rng(2)
    attrs = _balanced_attrs(10, seed=3)  # balanced: any fixed guess scores exactly 1/8
    samples = [(caption_of(a), rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)) for a in attrs]
    chk = check_samples(samples)
    assert chk.n == 80
    assert abs(chk.colour_accuracy - chk.chance) < 0.1, chk.line()
    assert abs(chk.position_accuracy - 1 / len(POSITIONS)) < 0.1, chk.line()


def test_wrong_colour_and_wrong_position_are_caught():
    a = CaptionAttrs(color="red", shape="square", position="top left", size="large", background="white")
    drawn = render(CaptionAttrs(color="blue", shape="square", position="bottom right", size="large",
                                background="white"), 64)
    chk = check_samples([(caption_of(a), drawn)])
    v = chk.verdicts[0]
    assert (v.want_colour, v.got_colour, v.colour_ok, v.position_ok) == ("red", "blue", False, False)
    assert chk.colour_accuracy == 0.0 and chk.position_accuracy == 0.0
    assert "want red" in v.note()


def test_blank_image_has_no_colour():
    a = CaptionAttrs(color="green", shape="circle", position="center", size="large", background="black")
    blank = Image.new("RGB", (32, 32), (0, 0, 0))
    res = analyse(blank, corpus_colours())
    assert res.colour is None and res.centroid is None
    chk = check_samples([(caption_of(a), blank)])
    assert chk.colour_matches == 0 and chk.position_accuracy == 0.0


def test_non_demo_prompts_are_skipped():
    assert not is_demo_prompt("a photo of a dog")
    assert parse_demo_prompt("A large red circle in the center on a white background") == ("red", "center")
    a = CaptionAttrs(color="yellow", shape="diamond", position="center", size="large", background="black")
    chk = check_samples([("a photo of a dog", render(a, 32)), (caption_of(a), render(a, 32))])
    assert chk.n == 1 and chk.colour_accuracy == 1.0
    empty = check_samples([("a photo of a dog", render(a, 32))])
    assert empty.n == 0 and "no sample" in empty.line()


def test_position_matches_uses_the_corpus_grid():
    assert position_matches("top left", (0.2, 0.25))
    assert not position_matches("top left", (0.5, 0.5))
    assert position_matches("center", (0.52, 0.48))
    with pytest.raises(ValueError, match="allowed"):
        position_matches("somewhere", (0.5, 0.5))


def test_background_std_measures_grain_not_shapes():
    from stages.sampling.demo_check import background_std

    a = CaptionAttrs(color="blue", shape="square", position="top left", size="large", background="gray")
    flat = render(a, 128)
    assert background_std(flat) < 1.0  # a large corner shape reaching into the band is not grain
    rng = np.random.default_rng(4)
    noisy = [np.clip(np.asarray(flat, dtype=np.float64) + rng.normal(0, s, (128, 128, 3)), 0, 255) for s in (6, 20)]
    lo, hi = (background_std(x) for x in noisy)
    assert lo == pytest.approx(6, abs=1) and hi == pytest.approx(20, abs=2)  # gray: no clipping at 0/255
    chk = check_samples([(caption_of(a), flat), (caption_of(a), noisy[1])])
    assert chk.background_std == pytest.approx((background_std(flat) + hi) / 2)
    m = chk.metrics()
    assert m["demo_background_std"] == chk.background_std and m["demo_position_chance"] == pytest.approx(1 / 9)
    assert "background std" in chk.line()
