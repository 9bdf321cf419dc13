"""CLIP reranking (DALL·E): draw N samples per prompt, keep the K the run's CLIP scores highest.

The score is the cosine of the sample's CLIP image embedding (preprocessed exactly as the embed
stage preprocessed training images) with its prompt's CLIP text embedding. The figures say what
reranking bought: the mean score of the kept samples beside that of the first K drawn.
"""
from __future__ import annotations

from typing import Any

from data_prep.clip_score import clip_scores  # the evaluate stage's CLIP score, the one definition


def rerank(samples: list, keep: int, clip: Any, preprocess: dict[str, Any]) -> tuple[list, dict[str, float]]:
    """(kept samples, figures per cascade): ``<cascade>_rerank_clip_score_kept`` / ``_first``."""
    scores = clip_scores(clip, [s.image for s in samples], [s.prompt for s in samples], preprocess).tolist()
    for s, v in zip(samples, scores):
        s.clip_score = float(v)
    kept, figures = [], {}
    for cascade in dict.fromkeys(s.cascade for s in samples):
        mine = [s for s in samples if s.cascade == cascade]
        first, best = [], []
        for index in dict.fromkeys(s.index for s in mine):
            drawn = sorted((s for s in mine if s.index == index), key=lambda s: s.k)
            first += drawn[:keep]
            best += sorted(drawn, key=lambda s: -s.clip_score)[:keep]
        figures[f"{cascade}_rerank_clip_score_first"] = sum(s.clip_score for s in first) / len(first)
        figures[f"{cascade}_rerank_clip_score_kept"] = sum(s.clip_score for s in best) / len(best)
        kept += sorted(best, key=lambda s: (s.index, s.k))
    return kept, figures
