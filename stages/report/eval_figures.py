"""How evaluation figures are read back and named for people: the evaluate manifest's figures with
what each means (``t2i status``, ``t2i eval``, report.html), and a training attempt's
per-checkpoint rows (``eval.jsonl``, written by stages/evaluate/follow.py).

Its own module, below stages.evaluate and stages.sampling.cascade, because report.html is written by the
sample stage and the evaluate stage imports sampling: report.html reading these from
stages.evaluate would make an import circle (tests/unit/test_import_rules.py).
"""
from __future__ import annotations

import json
from typing import Any

from pipeline import layout, store

EVAL_LOG = layout.EVAL_LOG  # <training attempt>/eval.jsonl: one row per evaluated checkpoint

# What each figure means, for `t2i status`, report.html and `t2i eval` (docs/evaluation.md).
_MEANING = (
    ("_fid", "FID vs held-out images (lower is better; {features} features)"),
    ("_clip_score_suite", "CLIP score on the prompt suite"),
    ("_clip_score", "CLIP score of samples vs their captions (higher is better)"),
    ("_val_loss", "held-out diffusion loss at 8 fixed t (lower is better)"),
    ("prior_cosine_similarity", "prior's image embedding vs the true one (higher is better)"),
    ("prior_text_baseline", "caption's text embedding vs the true image embedding (the prior should beat it)"),
    ("heldout_clip_score", "CLIP score of the real held-out images (the ceiling)"),
    ("_demo_", "demo check on demo captions"),
    ("evaluate_seconds", "time the evaluation took"),
)


def evaluation_rows(manifest: dict[str, Any]) -> list[tuple[str, float, str]]:
    """(figure, value, what it means) for every figure of an evaluate manifest, in a stable order:
    for ``t2i status`` and report.html."""
    feats = (manifest.get("outputs") or {}).get("fid_features", "?")
    rows = []
    for name, value in sorted((manifest.get("metrics") or {}).items()):
        meaning = next((m for key, m in _MEANING if key in name), "")
        if "_clip_score_" in name and not name.endswith("_suite"):
            meaning = f"CLIP score on the suite's {name.split('_clip_score_', 1)[1]} prompts"
        if CLIP_GUIDED in name:
            meaning += " (CLIP-guided: same captions and seeds as the CFG figure without _clip_guided)"
        rows.append((name, float(value), meaning.format(features=feats)))
    return rows


CLIP_GUIDED = "_clip_guided_"  # `guidance: compare`: <cascade>_clip_guided_<figure> beside <cascade>_<figure>


def guidance_pairs(metrics: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(<cascade>_<figure>, CFG value, CLIP-guided value) for every figure an evaluation made under
    ``sampling.guidance: compare`` (same captions, same seeds), in a stable order."""
    out = []
    for name in sorted(metrics):
        if CLIP_GUIDED not in name:
            continue
        cascade, figure = name.split(CLIP_GUIDED, 1)
        plain = f"{cascade}_{figure}"
        if plain in metrics and not figure.endswith(("_n", "_chance")):  # counts and chance levels are equal
            out.append((plain, float(metrics[plain]), float(metrics[name])))
    return out


def read_rows(attempt: str) -> list[dict[str, Any]]:
    """The rows of a training attempt's eval.jsonl (for curves in report.html and ``t2i status``)."""
    uri = store.join(attempt, EVAL_LOG)
    if not store.exists(uri):
        return []
    return [json.loads(x) for x in store.read_bytes(uri).decode().splitlines() if x.strip()]
