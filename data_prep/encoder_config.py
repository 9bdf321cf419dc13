"""Which CLIP and T5 encoders a run uses: the configs alone, torch-free, so reading a run spec
stays fast (data_prep/encoders.py loads the models)."""
from __future__ import annotations

import os
from typing import Sequence

from pydantic import Field, field_validator, model_validator

from pipeline.configbase import StrictModel

TINY_PREFIX = "tiny:"
# Validating a model name or tag imports open_clip (seconds); pydantic also builds the default
# config whenever defaults are compared, so the default pair, known good, is not looked up.
DEFAULT_CLIP = ("ViT-L-14", "openai")


def _looks_like_path(s: str) -> bool:
    return s.startswith((".", "/", "~")) or os.path.isdir(os.path.expanduser(s))


class ClipConfig(StrictModel):
    """Which CLIP to use for image/text embeddings and per-token text features."""

    model: str = Field(DEFAULT_CLIP[0], description=(
        "open_clip architecture name (e.g. 'ViT-L-14'), a local directory containing "
        "open_clip_config.json + weights, or 'tiny:DIR' for the tiny test/demo encoders built into DIR."))
    pretrained: str | None = Field(DEFAULT_CLIP[1], description=(
        "open_clip pretrained tag (e.g. 'openai', 'laion2b_s32b_b82k') or a local checkpoint file; "
        "null for random weights. Ignored when `model` is a directory or 'tiny:'."))

    @field_validator("model")
    @classmethod
    def _check_model(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("clip.model must be an open_clip architecture name, a local directory, or 'tiny:DIR'")
        if v.startswith(TINY_PREFIX) and not v[len(TINY_PREFIX):].strip():
            raise ValueError("clip.model 'tiny:' needs a directory, e.g. 'tiny:./runs/_encoders'")
        if not v.startswith(TINY_PREFIX) and not _looks_like_path(v) and not v.startswith("hf-hub:") \
                and v != DEFAULT_CLIP[0]:  # the default is known good; checking it would import open_clip
            import open_clip  # open_clip: loaded only when a CLIP is built or read

            if v.replace("/", "-") not in open_clip.list_models():
                raise ValueError(f"clip.model {v!r} is not an open_clip architecture (e.g. 'ViT-L-14', 'ViT-B-32'), "
                                 "not an existing directory and not 'tiny:DIR'")
        return v

    @model_validator(mode="after")
    def _check_tag(self) -> "ClipConfig":
        m, p = self.model, self.pretrained
        if p and not m.startswith(TINY_PREFIX) and not _looks_like_path(m) and not _looks_like_path(p) \
                and not m.startswith("hf-hub:") and (m, p) != DEFAULT_CLIP:
            import open_clip  # open_clip: loaded only when a CLIP is built or read

            tags = open_clip.list_pretrained_tags_by_model(m.replace("/", "-"))
            if p not in tags:
                raise ValueError(f"clip.pretrained {p!r} is not a known tag for {m!r} (known: {tags}); "
                                 "give a tag, a local checkpoint path, or null for random weights")
        return self


class T5Config(StrictModel):
    """Which T5 encoder gives the per-token text conditioning (Imagen)."""

    model: str = Field("google/t5-v1_1-xxl", description=(
        "Hugging Face model name (needs a network or a warm cache), a local directory saved with "
        "save_pretrained (T5 weights + tokenizer), or 'tiny:DIR' for the tiny test/demo encoder."))
    max_length: int = Field(128, ge=1, le=512, description="Captions are truncated to this many tokens (incl. EOS).")

    @field_validator("model")
    @classmethod
    def _check_model(cls, v: str) -> str:
        v = v.strip()
        if not v or (v.startswith(TINY_PREFIX) and not v[len(TINY_PREFIX):].strip()):
            raise ValueError("t5.model must be a hub name, a local directory, or 'tiny:DIR'")
        return v


def caption_counts(captions: Sequence[str | None], clip=None,
                   t5=None) -> dict[str, int]:
    """What happens to a batch of captions, counted: null (the list had none) apart from empty
    (the list had "" or only spaces), and, per encoder given, how many its context cuts."""
    out = {"n_null_caption": sum(c is None for c in captions),
           "n_empty_caption": sum(c is not None and not c.strip() for c in captions)}
    text = [c for c in captions if c is not None and c.strip()]
    if clip is not None:
        out["n_truncated_clip"] = clip.count_truncated(text)
    if t5 is not None:
        out["n_truncated_t5"] = t5.count_truncated(text)
    return out
