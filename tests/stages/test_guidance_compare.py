"""``sample.guidance: compare`` (issue 17 item 5): each cascade with a CLIP-guidable model (imagen's
base, glide) is sampled twice from the same prompts and noise — classifier-free guidance and CLIP
guidance by the noised CLIP — and both halves reach the PNGs, the grid, the manifest's demo-check
keys and a side-by-side table in report.html.

The run (the ``trained_run`` fixture, tests/stages/conftest.py, also tests/stages/test_sample.py's)
holds random debug-flavor weights written by the training loop's own ``write_final`` (perturbed
away from the zero-initialised output layers, so conditioning and guidance reach the images) and
tiny encoders built offline.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from data_prep.demo_corpus import demo_prompts
from pipeline import store
from pipeline.context import StageContext

pytestmark = pytest.mark.usefixtures("single_thread_torch")

PROMPTS = demo_prompts()[:2]


@pytest.fixture(scope="module")
def run_uri(trained_run):
    """The shared trained run: base, glide, sr256, sr1024 and the noised CLIP are what this needs."""
    return trained_run


@pytest.fixture(scope="module")
def encoders(run_uri):
    from stages.sampling.loading import PromptEncoders

    return PromptEncoders.load(store.join(run_uri, "embed"))


def _by_name(samples) -> dict[str, list[np.ndarray]]:
    out: dict[str, list[np.ndarray]] = {}
    for s in samples:
        out.setdefault(s.cascade, []).append(np.asarray(s.image))
    return out


@pytest.mark.parametrize("cascade", ["imagen", "glide"])
def test_compare_samples_both_guidances_from_the_same_noise(run_uri, encoders, cascade):
    """The CFG half is a plain `guidance: cfg` run bit for bit, the CLIP half a plain `guidance: clip`
    run bit for bit (same prompts, same generators); the two halves differ."""
    from stages.sampling.config import SampleConfig
    from stages.sampling.cascade import sample_images

    kw = dict(prompts=PROMPTS, cascade=cascade, steps=2, sampler="ddim", seed=5, clip_guidance_scale=50.0)
    both = sample_images(SampleConfig(guidance="compare", **kw), run_uri, encoders=encoders)
    got = _by_name(both)
    c = cascade
    assert list(got) == [c, c + "_clip_guided"]
    assert [s.prompt for s in both if s.cascade == c + "_clip_guided"] == PROMPTS
    cfg_run = _by_name(sample_images(SampleConfig(guidance="cfg", **kw), run_uri, encoders=encoders))
    clip_run = _by_name(sample_images(SampleConfig(guidance="clip", **kw), run_uri, encoders=encoders))
    assert all(np.array_equal(a, b) for a, b in zip(got[c], cfg_run[c], strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(got[c + "_clip_guided"], clip_run[c], strict=True))
    assert not np.array_equal(got[c][0], got[c + "_clip_guided"][0])  # only the guidance differs


def test_compare_without_a_clip_guidable_cascade_is_sampled_once(run_uri, encoders):
    """max_stage keeps the 64px model: compare still applies; a cascade with no CLIP-guidable model
    (unclip) gets no second half (and 'compare' on unclip alone is refused, below)."""
    from stages.sampling.config import SampleConfig

    cfg = SampleConfig(prompts=PROMPTS, cascade="both", guidance="compare")
    assert [n for c in cfg.cascades() for n, _ in cfg.variants(c)] == ["unclip", "imagen", "imagen_clip_guided"]
    halves = dict(cfg.variants("imagen"))
    assert halves["imagen"].guidance_for("base") == cfg.guidance_for("base") != 1.0  # the CFG half keeps CFG
    assert halves["imagen_clip_guided"].guidance_for("base") == 1.0  # CLIP guidance replaces it
    assert halves["imagen_clip_guided"].guidance_for("sr256") == cfg.guidance_for("sr256")  # upsamplers alike
    assert "train_noised_clip" in cfg.required_stages()


def test_config_validation_names_the_field():
    from stages.sampling.config import SampleConfig

    for kw, msg in [({"cascade": "unclip", "guidance": "compare"}, r"sample.guidance: 'compare'.*cascade 'unclip'"),
                    ({"cascade": "glide", "guidance": "compare", "clip_guidance_scale": 0.0},
                     r"sample.clip_guidance_scale is 0 for glide"),
                    ({"guidance": "classifier"}, "guidance")]:
        with pytest.raises(ValidationError, match=msg):
            SampleConfig(**kw)
    # 0 for one model only: the other is still compared
    SampleConfig(cascade="all", guidance="compare", clip_guidance_scale={"base": 0.0})


def test_stage_manifest_and_report_show_both(run_uri, tmp_path):
    from stages.sampling.config import SampleConfig
    from stages.sampling.cascade import run

    out = store.normalize(str(tmp_path / "sample"))
    lines: list[str] = []
    res = run(SampleConfig(prompts=PROMPTS, cascade="glide", guidance="compare", steps=2, clip_guidance_scale=20.0),
              StageContext(run_uri=run_uri, out_uri=out, progress=lines.append))
    assert res.counts == {"images": 4, "prompts": 2}
    for name in ("glide", "glide_clip_guided"):  # the CFG half keeps plain `guidance: cfg`'s keys
        assert res.metrics[f"{name}_demo_n"] == 2 and 0 <= res.metrics[f"{name}_demo_colour_accuracy"] <= 1
        assert f"{name}_demo_background_std" in res.metrics
        assert any(s.startswith(f"{name}: demo check") for s in lines)
    import re

    pngs = sorted(u.rsplit("/", 1)[-1] for u in store.listdir(out) if re.match(r"\d{3}_", u.rsplit("/", 1)[-1]))
    assert len(pngs) == 4 and sum(p[4:].startswith("glide_clip_guided_") for p in pngs) == 2
    grid = Image.open(io.BytesIO(store.read_bytes(res.outputs["grid"])))
    assert grid.width >= 260 + 2 * 64  # the caption column + two image columns: CFG and CLIP-guided
    doc = store.read_bytes(res.outputs["report"]).decode()
    assert "Classifier-free vs CLIP guidance (same prompts, same seeds)" in doc
    table = doc[doc.index("Classifier-free vs CLIP guidance"):]
    table = table[: table.index("</table>")]
    assert "glide guidance_scale 3" in table and "glide clip_guidance_scale 20" in table
    colour = f"{res.metrics['glide_clip_guided_demo_colour_accuracy']:.2f}"
    assert table.count("<tr>") == 3 and colour in table  # header + one row per guidance
    assert "<th>glide</th>" in doc and "<th>glide_clip_guided</th>" in doc  # samples side by side
