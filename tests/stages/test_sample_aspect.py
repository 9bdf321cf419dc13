"""Sampling at an aspect ratio (issue 28, part 4): ``sample.aspect`` / ``t2i sample --aspect 16:9``
carries one aspect through every model of a cascade — the first image model draws it on its own
grid, each upsampler that shape scaled by its factor, its low-res input exactly what the model
before it drew — and the grid and report show the images as they are. Read off the shared
``trained_run`` (random debug-flavor weights)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from pipeline import store
from stages.report.page import make_grid
from stages.sampling.cascade import sample_images
from stages.sampling.config import SampleConfig
from tests.support.cli import t2i

PROMPT = "a wide picture of a red circle in the center"
STEPS = {"prior": 2, "decoder": 2, "base": 2, "glide": 2, "sr256": 1, "sr1024": 1}


def _shape(img: Image.Image) -> tuple[int, int]:
    return img.height, img.width


@pytest.mark.parametrize("cascade, first", [("imagen", "base"), ("unclip", "decoder"), ("glide", "glide")])
def test_one_aspect_through_every_stage(trained_run, single_thread_torch, cascade, first):
    shapes = []
    for stop in (first, "sr256", None):
        cfg = SampleConfig(prompts=[PROMPT], cascade=cascade, aspect="16:9", steps=STEPS, max_stage=stop)
        (s,) = sample_images(cfg, trained_run)
        shapes.append(_shape(s.image))
    (h0, w0), (h1, w1), (h2, w2) = shapes
    assert abs(math.log(w0 / h0) - math.log(16 / 9)) < 0.1  # 16:9 on the 16px model's grid (12 x 22)
    assert (h1, w1) == (2 * h0, 2 * w0) and (h2, w2) == (2 * h1, 2 * w1)  # debug upsamplers: 2x each
    tall = sample_images(SampleConfig(prompts=[PROMPT], cascade=cascade, aspect="9:16", steps=STEPS), trained_run)
    assert _shape(tall[0].image) == (w2, h2)


def test_square_is_the_default_and_unchanged(trained_run, single_thread_torch):
    base = dict(prompts=[PROMPT], cascade="imagen", steps=STEPS)
    (a,) = sample_images(SampleConfig(**base), trained_run)
    (b,) = sample_images(SampleConfig(**base, aspect="1:1"), trained_run)
    assert _shape(a.image) == (64, 64) and np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_the_grid_shows_a_wide_image_wide():
    class S:  # what make_grid reads of a sample
        def __init__(self, cascade, image):
            self.prompt, self.cascade, self.k, self.image = PROMPT, cascade, 0, image
    wide, square = Image.new("RGB", (176, 96), (255, 0, 0)), Image.new("RGB", (96, 96), (0, 0, 255))
    grid = np.asarray(make_grid([S("imagen", wide), S("unclip", square)], tile=176, label_width=10))
    red = np.all(grid == (255, 0, 0), axis=-1)
    ys, xs = np.nonzero(red)
    assert xs.max() - xs.min() + 1 == 176 and ys.max() - ys.min() + 1 == 96  # not stretched to a square
    blue = np.all(grid == (0, 0, 255), axis=-1)
    assert blue.sum() == 176 * 176


@pytest.mark.parametrize("bad, says", [("16/9", "W:H"), ("20:1", "beyond 8:1")])
def test_a_bad_aspect_is_refused_with_the_field(bad, says):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=says):
        SampleConfig(prompts=[PROMPT], aspect=bad)


def test_cli_samples_at_an_aspect(smoke_run, tmp_path):
    """On the session's smoke run (the CLI reads the run's saved spec)."""
    cwd, run = smoke_run
    r = t2i("sample", run, "--prompt", PROMPT, "--cascade", "imagen", "--aspect", "16:9",
            "--steps", "2", "--out", tmp_path / "out", cwd=cwd)
    assert r.code == 0, r.output
    (png,) = [u for u in store.glob(store.join(store.normalize(str(tmp_path / "out")), "*.png")) if "grid" not in u]
    img = Image.open(store.local_path(png))
    assert img.width > img.height and abs(math.log(img.width / img.height) - math.log(16 / 9)) < 0.1
    r = t2i("sample", run, cwd=cwd)  # neither prompts nor an image to draw again: says what to give
    assert r.code != 0 and "--prompt" in r.output and "--from-sample" in r.output and "not both" not in r.output
