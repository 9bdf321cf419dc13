"""Sampling, part 3: what a sampling run leaves behind — the PNGs, grid.png, the demo check of
every cascade (when the prompts are demo captions) and report.html, written last; under
``guidance: compare`` the report also gets the CFG vs CLIP guidance table (:func:`guidance_table`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from pipeline import layout, store
from stages.report import page as report
from stages.sampling import demo_check
from stages.sampling.config import CLIP_GUIDED_ROLES, CLIP_GUIDED_SUFFIX, SampleConfig, cascade_roles
from stages.sampling.draw import to_uint8


@dataclass
class Sample:
    prompt: str
    index: int  # prompt index
    k: int  # which of images_per_prompt
    cascade: str  # the cascade; '<cascade>_clip_guided' for the CLIP-guided half of `guidance: compare`
    image: Image.Image
    uri: str = ""
    clip_score: float | None = None  # set by CLIP reranking (stages/sampling/rerank.py)
    seed: int | None = None  # its own noise seed (stages/sampling/cascade.image_seed)


class Samples(list):
    """The samples of a run, in order, plus figures about them (CLIP reranking's scores)."""

    def __init__(self, items=(), figures: dict[str, float] | None = None):
        super().__init__(items)
        self.figures = dict(figures or {})


def _to_pil(x: torch.Tensor) -> Image.Image:
    arr = to_uint8(x).numpy()
    return Image.fromarray(arr, "RGB")


def filename(s: Sample, images_per_prompt: int) -> str:
    k = f"_{s.k}" if images_per_prompt > 1 else ""
    return f"{s.index:03d}_{s.cascade}{k}_{report.slug(s.prompt)}.png"


@dataclass
class SampleOutputs:
    samples: list[Sample]
    grid_uri: str
    report_uri: str
    demo: dict[str, Any]  # cascade -> stages.sampling.demo_check.DemoCheck
    lines: list[str]


def write_outputs(samples: list[Sample], cfg: SampleConfig, run_uri: str, out_uri: str,
                  metrics_uris: dict[str, str] | None = None) -> SampleOutputs:
    """PNGs, grid.png, then report.html (last: its presence means the rest is there)."""
    for s in samples:
        s.uri = store.join(out_uri, filename(s, cfg.images_per_prompt))
        store.write_bytes_atomic(s.uri, report.png_bytes(s.image))
    grid_uri = store.join(out_uri, layout.GRID)
    store.write_bytes_atomic(grid_uri, report.png_bytes(report.make_grid(samples)))
    # Each image's prompt and seed: `t2i sample RUN --from-sample N` regenerates image N from here.
    store.write_json(store.join(out_uri, layout.SAMPLE_INDEX), {"images": [
        {"n": s.index * cfg.images_per_prompt + s.k, "prompt": s.prompt, "prompt_index": s.index, "k": s.k,
         "cascade": s.cascade, "seed": s.seed, "file": filename(s, cfg.images_per_prompt)} for s in samples]})

    checks: dict[str, Any] = {}
    lines: list[str] = []
    notes: dict[int, str] = {}
    if cfg.demo_check and demo_check.all_demo_prompts(cfg.prompts):
        for cascade in dict.fromkeys(s.cascade for s in samples):
            mine = [s for s in samples if s.cascade == cascade]
            chk = demo_check.check_samples([(s.prompt, s.image) for s in mine])
            checks[cascade] = chk
            lines.append(f"{cascade}: {chk.line()}")
            for s, v in zip(mine, chk.verdicts):
                notes[id(s)] = v.note()
    entries = [report.ReportEntry(s.prompt, s.cascade, filename(s, cfg.images_per_prompt), s.image,
                                  "; ".join(x for x in (f"image {s.index * cfg.images_per_prompt + s.k}, seed {s.seed}"
                                                        if s.seed is not None else "", notes.get(id(s), "")) if x))
               for s in samples]
    tables = [guidance_table(checks, cfg)] if cfg.guidance == "compare" and checks else []
    html = report.build_report(entries, run_uri=run_uri, title="t2i samples", summary_lines=lines,
                               config=cfg.model_dump(mode="json"), metrics_uris=metrics_uris, tables=tables)
    report_uri = report.write_report(store.join(out_uri, layout.REPORT), html)
    return SampleOutputs(samples, grid_uri, report_uri, checks, lines)


def guidance_table(checks: dict[str, Any], cfg: SampleConfig) -> report.Table:
    """`guidance: compare`: the demo check of each cascade's CFG half beside its CLIP-guided half
    (same prompts, same seeds: the rows of a cascade differ only in the guidance of its
    CLIP-guidable model)."""
    def fmt(chk, attr: str, correct: str, n: str) -> str:
        v = getattr(chk, attr)
        return "—" if v is None else f"{v:.2f} ({getattr(chk, correct)}/{getattr(chk, n)})"

    rows = []
    for name in checks:
        guided = checks.get(name + CLIP_GUIDED_SUFFIX)
        if name.endswith(CLIP_GUIDED_SUFFIX) or guided is None:
            continue
        roles = [r for r in CLIP_GUIDED_ROLES if r in cascade_roles(name, cfg.max_stage)]
        for label, chk, scale in (
                ("classifier-free", checks[name], ", ".join(f"{r} guidance_scale {cfg.guidance_for(r):g}" for r in roles)),
                ("CLIP (noised CLIP)", guided, ", ".join(f"{r} clip_guidance_scale {cfg.clip_guidance_for(r):g}"
                                                         for r in roles))):
            grain = "—" if chk.background_std is None else f"{chk.background_std:.1f}"
            rows.append([name, label, scale, fmt(chk, "colour_accuracy", "colour_matches", "n"),
                         fmt(chk, "position_accuracy", "position_correct", "position_n"), grain, str(chk.n)])
    some = next(iter(checks.values()))
    return report.Table(
        "Classifier-free vs CLIP guidance (same prompts, same seeds)",
        ["cascade", "guidance", "scale", f"colour (chance {some.chance:.2f})",
         "position" + (f" (chance {some.position_chance:.2f})" if some.position_chance else ""),
         "background std /255", "n"], rows,
        "Demo check of each cascade sampled twice from the same noise: once with classifier-free guidance, "
        "once with CLIP guidance of its text-to-image model (glide, Imagen's base) by the noised CLIP (that "
        "model then samples without CFG; the upsamplers sample alike in both). Manifest keys: <cascade>_demo_* and <cascade>_clip_guided_demo_*.")
