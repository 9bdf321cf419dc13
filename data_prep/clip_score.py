"""CLIP score: the cosine of an image's CLIP embedding with its prompt's, under a run's own CLIP.

One definition for the evaluate stage's CLIP score and for sampling's CLIP reranking. Images are
preprocessed exactly as the embed stage preprocessed the training images.
"""
from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from data_prep.image_decode import preprocess_image


def clip_image_embeddings(clip: Any, images: Sequence[Any], preprocess: dict[str, Any],
                          batch_size: int = 64) -> torch.Tensor:
    """L2-normalised CLIP image embeddings of PIL images, preprocessed exactly as the embed stage
    preprocessed the training images (:func:`preprocess_image` on PNG bytes)."""
    out = []
    for i in range(0, len(images), batch_size):
        px = []
        for im in images[i:i + batch_size]:
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="PNG")
            px.append(preprocess_image(buf.getvalue(), preprocess))
        out.append(clip.encode_image(torch.from_numpy(np.stack(px))))
    return F.normalize(torch.cat(out).float(), dim=-1)


def clip_text_embeddings(clip: Any, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    out = [clip.encode_text(list(prompts[i:i + batch_size]))[0] for i in range(0, len(prompts), batch_size)]
    return F.normalize(torch.cat(out).float(), dim=-1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two [N, D] sets."""
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1)


def clip_scores(clip: Any, images: Sequence[Any], prompts: Sequence[str], preprocess: dict[str, Any]) -> torch.Tensor:
    """Per-sample CLIP score: cosine of each image with its own prompt under ``clip`` [N]."""
    if len(images) != len(prompts):
        raise ValueError(f"clip_scores: {len(images)} images but {len(prompts)} prompts")
    return cosine(clip_image_embeddings(clip, images, preprocess), clip_text_embeddings(clip, prompts))
