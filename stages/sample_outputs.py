"""Sampling, part 3: what a sampling run leaves behind — the PNGs, grid.png, the demo check of
every cascade (when the prompts are demo captions) and report.html, written last."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from pipeline import store
from stages import report
from stages.sample_config import SampleConfig


@dataclass
class Sample:
    prompt: str
    index: int  # prompt index
    k: int  # which of images_per_prompt
    cascade: str
    image: Image.Image
    uri: str = ""
    clip_score: float | None = None  # set by CLIP reranking (stages/rerank.py)


class Samples(list):
    """The samples of a run, in order, plus figures about them (CLIP reranking's scores)."""

    def __init__(self, items=(), figures: dict[str, float] | None = None):
        super().__init__(items)
        self.figures = dict(figures or {})


def _to_pil(x: torch.Tensor) -> Image.Image:
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr, "RGB")


def filename(s: Sample, images_per_prompt: int) -> str:
    k = f"_{s.k}" if images_per_prompt > 1 else ""
    return f"{s.index:03d}_{s.cascade}{k}_{report.slug(s.prompt)}.png"


@dataclass
class SampleOutputs:
    samples: list[Sample]
    grid_uri: str
    report_uri: str
    demo: dict[str, Any]  # cascade -> stages.demo_check.DemoCheck
    lines: list[str]


def write_outputs(samples: list[Sample], cfg: SampleConfig, run_uri: str, out_uri: str,
                  metrics_uris: dict[str, str] | None = None) -> SampleOutputs:
    """PNGs, grid.png, then report.html (last: its presence means the rest is there)."""
    from stages import demo_check

    for s in samples:
        s.uri = store.join(out_uri, filename(s, cfg.images_per_prompt))
        store.write_bytes_atomic(s.uri, report.png_bytes(s.image))
    grid_uri = store.join(out_uri, "grid.png")
    store.write_bytes_atomic(grid_uri, report.png_bytes(report.make_grid(samples)))

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
                                  notes.get(id(s), "")) for s in samples]
    html = report.build_report(entries, run_uri=run_uri, title="t2i samples", summary_lines=lines,
                               config=cfg.model_dump(mode="json"), metrics_uris=metrics_uris)
    report_uri = report.write_report(store.join(out_uri, "report.html"), html)
    return SampleOutputs(samples, grid_uri, report_uri, checks, lines)


