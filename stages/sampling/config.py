"""The ``sample`` stage's config and the cascade vocabulary, torch-free (reading a run spec must
not import the sampling code)."""
from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline import layout
from pipeline.configbase import StrictModel
from stages import models as _models

# From the model registry (stages/models/__init__.py): the roles, the cascades, each role's CFG null keys
# and default guidance.
# ROLES: the models a cascade runs (the noised CLIP only guides them: it has no per-model options).
ROLES = _models.CASCADE_ROLES
CASCADES = _models.CASCADES
NULL_KEYS = {m.role: m.null_keys for m in _models.MODELS}
SAMPLER_NAMES = {"ddpm": "ddpm", "ddim": "ddim", "dpmpp": "dpmpp_2m", "dpmpp_2m": "dpmpp_2m"}
CLI_OUT = layout.SAMPLES_CLI  # where sample_cli / sample_cascade write by default (not the stage's own dir)
DEFAULT_GUIDANCE = {m.role: m.default_guidance for m in _models.MODELS if m.role in ROLES}
stage_of = _models.stage_of
# `guidance: clip` (GLIDE §2.4) guides the text-to-64px models that see the caption directly, with
# the noised CLIP trained by train_noised_clip; its default scale per model.
CLIP_GUIDED_ROLES = tuple(m.role for m in _models.MODELS if m.clip_guidance is not None)
NOISED_CLIP = "noised_clip"
# `guidance: compare`: the CLIP-guided half of a cascade is reported as '<cascade><CLIP_GUIDED_SUFFIX>'
# (sample names, grid columns, manifest keys '<cascade>_clip_guided_demo_*'); the CFG half keeps the
# cascade's own name, so its keys are those of a plain `guidance: cfg` run.
CLIP_GUIDED_SUFFIX = "_clip_guided"
DEFAULT_CLIP_GUIDANCE = {m.role: m.clip_guidance for m in _models.MODELS if m.clip_guidance is not None}
# 'both' is the two cascades of unCLIP and Imagen (as before GLIDE), 'all' every cascade.
CASCADE_CHOICES = (*CASCADES, "both", "all")
# The models that draw the cascade's first image (Imagen's base, unCLIP's decoder, GLIDE): any of
# their names as max_stage means "stop after the 64px model" of whichever cascade runs.
FIRST_IMAGE_ROLES = tuple(r for r in ROLES if _models.model(r).draws == "image" and not _models.model(r).upsampler)
UPSAMPLER_ROLES = tuple(r for r in ROLES if _models.model(r).upsampler)
MAX_STAGES = (*FIRST_IMAGE_ROLES, *UPSAMPLER_ROLES)
_CASCADE_HELP = ", ".join(f"'{c}' ({' -> '.join(rs)})" for c, rs in CASCADES.items())


def _default_prompts() -> list[str]:
    from data_prep.demo_corpus import demo_prompts  # pyarrow, PIL: reading a spec stays light

    return demo_prompts()


class SampleConfig(StrictModel):
    """The ``sample`` stage: which prompts, which cascades, and how to sample them."""

    prompts: list[str] = Field(default_factory=_default_prompts, description=(
        "Prompts to sample (default: the demo corpus's fixed prompt list, which also turns on the demo check)."))
    cascade: Literal[CASCADE_CHOICES] = Field("both", description=(
        f"{_CASCADE_HELP}, 'both' (unclip and imagen) or 'all' (every cascade)."))
    guidance_scale: float | dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_GUIDANCE), description=(
        "Classifier-free guidance weight: one float for every model, or a dict role -> weight with roles "
        f"{', '.join(ROLES)} (missing roles use the defaults). 1.0 = no guidance."))
    guidance: Literal["cfg", "clip", "compare"] = Field("cfg", description=(
        "'cfg': classifier-free guidance only (guidance_scale). 'clip': CLIP guidance of the glide and base "
        "models with the noised CLIP of train_noised_clip (GLIDE §2.4): the gradient of its noisy-image/caption "
        "logit, times clip_guidance_scale, is added to the model's score at every step; those two models "
        "then sample without CFG (GLIDE compares the two guidances), every other model as under 'cfg'. "
        "'compare': both, on the same prompts and seeds: every cascade samples as under 'cfg', and each cascade "
        "with a CLIP-guidable model (imagen, glide) samples a second time as under 'clip', reported as cascade "
        "'<cascade>_clip_guided' (its PNGs, grid column, demo check figures <cascade>_clip_guided_demo_*) "
        "beside the CFG one, with a side-by-side table in report.html."))
    clip_guidance_scale: float | dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_CLIP_GUIDANCE),
                                                          description=(
        f"CLIP guidance scale (guidance: clip): one float for the {' and '.join(CLIP_GUIDED_ROLES)} models, or a "
        f"dict with roles {', '.join(CLIP_GUIDED_ROLES)} (missing roles use the defaults). 0 = no CLIP guidance."))
    steps: int | dict[str, int] = Field(25, description=(
        "Denoising steps: one int for every model, or role -> steps (missing roles: 25)."))
    sampler: Literal["ddim", "ddpm", "dpmpp", "dpmpp_2m"] = Field("dpmpp", description=(
        "'ddim' (deterministic), 'ddpm' (ancestral) or 'dpmpp' (DPM-Solver++(2M), good at ~20-25 steps)."))
    thresholding: Literal["dynamic", "static", "none"] = Field("dynamic", description=(
        "x0 thresholding of image models (Imagen's dynamic thresholding keeps high guidance from saturating). "
        "The prior always samples without thresholding: CLIP embeddings are not in [-1, 1]."))
    dynamic_threshold_percentile: float = Field(0.995, description="Percentile p of dynamic thresholding, in (0.5, 1].")
    sr_aug_level: float | None = Field(None, description=(
        "Fixed conditioning-augmentation level in [0, 1] for the SR models' low-res input; null = each SR "
        "model's own condaug.sample_level from training."))
    sr_start_t: float = Field(1.0, gt=0.0, le=1.0, description=(
        "Upsamplers start from the upsampled low-res image noised to this t (SDEdit) instead of pure "
        "noise at 1.0; below 1 keeps colours/layout of small or briefly trained upsamplers."))
    seed: int = Field(0, description=(
        "Seed of all sampling noise: the same seed and config give the same images. Image k of prompt i "
        "has its own seed, seed + i * images_per_prompt + k, and its noise depends on nothing else (not "
        "on its batch): sampled alone with that seed it comes out the same."))
    images_per_prompt: int = Field(1, ge=1, le=64, description="Samples per prompt per cascade.")
    rerank_keep: int | None = Field(None, ge=1, description=(
        "CLIP reranking (DALL-E): keep the K of images_per_prompt samples per prompt that the run's CLIP scores "
        "highest; the manifest records the kept and the first-drawn mean CLIP scores. null = keep all."))
    batch_size: int = Field(16, ge=1, description="Samples denoised together (bounds memory at 1024px).")
    aspect: str | None = Field(None, description=(
        "Aspect ratio of the images, width:height (16:9) or a number (1.78); null = square. One aspect "
        "carries through the cascade: the first image model draws it on its own grid "
        "(data_prep/buckets.py bucket_shape) and every upsampler scales that shape by its own factor."))
    max_stage: Literal[MAX_STAGES] | None = Field(None, description=(
        f"Stop each cascade early: {'/'.join(FIRST_IMAGE_ROLES)} = after the cascade's 64px model (any of "
        f"these names means that), {'/'.join(UPSAMPLER_ROLES)} = after that upsampler; null = run the whole "
        "cascade."))
    device: str = Field("auto", description="'auto' (cuda when available), 'cpu', 'cuda' or 'cuda:N'.")
    demo_check: bool = Field(True, description="Score samples against their prompts when all prompts are demo captions.")

    @field_validator("aspect", mode="before")
    @classmethod
    def _aspect(cls, v):
        if v is None:
            return v
        from data_prep.buckets import MAX_ASPECT, parse_ratio  # numpy: reading a spec stays light

        r = parse_ratio(v)
        if not 1 / MAX_ASPECT <= r <= MAX_ASPECT:
            raise ValueError(f"sample.aspect {v!r} is beyond {MAX_ASPECT:g}:1 (either way)")
        return str(v)

    @field_validator("prompts")
    @classmethod
    def _prompts(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("sample.prompts must name at least one prompt")
        bad = [i for i, p in enumerate(v) if not isinstance(p, str) or not p.strip()]
        if bad:
            raise ValueError(f"sample.prompts[{bad[0]}] is empty; every prompt must be non-empty text")
        return v

    @field_validator("guidance_scale", "steps")
    @classmethod
    def _per_role(cls, v, info):
        """One value for every model, or a dict role -> value: check roles and ranges alike."""
        name = info.field_name
        for k, x in (v.items() if isinstance(v, dict) else [("*", v)]):
            if k != "*" and k not in ROLES:
                raise ValueError(f"sample.{name} has unknown role {k!r}; allowed: {', '.join(ROLES)}")
            if name == "guidance_scale" and not x >= 0.0:
                raise ValueError(f"sample.guidance_scale[{k}]={x}: must be >= 0 (1.0 = no guidance, 0 = unconditional)")
            if name == "steps" and not 1 <= x <= 1000:
                raise ValueError(f"sample.steps[{k}]={x}: must be within [1, 1000]")
        return v

    @field_validator("clip_guidance_scale")
    @classmethod
    def _clip_scale(cls, v):
        for k, x in (v.items() if isinstance(v, dict) else [("*", v)]):
            if k != "*" and k not in CLIP_GUIDED_ROLES:
                raise ValueError(f"sample.clip_guidance_scale has role {k!r}; CLIP guidance applies to "
                                 f"{', '.join(CLIP_GUIDED_ROLES)}")
            if not x >= 0.0:
                raise ValueError(f"sample.clip_guidance_scale[{k}]={x}: must be >= 0 (0 = no CLIP guidance)")
        return v

    @field_validator("dynamic_threshold_percentile")
    @classmethod
    def _pct(cls, v: float) -> float:
        if not 0.5 < v <= 1.0:
            raise ValueError(f"sample.dynamic_threshold_percentile must be in (0.5, 1], got {v}")
        return v

    @field_validator("sr_aug_level")
    @classmethod
    def _aug(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 <= v <= 1.0:
            raise ValueError(f"sample.sr_aug_level must be within [0, 1] or null, got {v}")
        return v

    @model_validator(mode="after")
    def _rerank(self) -> "SampleConfig":
        if self.rerank_keep is not None and self.rerank_keep > self.images_per_prompt:
            raise ValueError(f"sample.rerank_keep ({self.rerank_keep}) must be <= images_per_prompt "
                             f"({self.images_per_prompt}): it keeps the best K of the N drawn per prompt")
        return self

    @model_validator(mode="after")
    def _compare(self) -> "SampleConfig":
        if self.guidance != "compare":
            return self
        roles = {r for c in self.cascades() for r in cascade_roles(c, self.max_stage)}
        guidable = [r for r in CLIP_GUIDED_ROLES if r in roles]
        if not guidable:
            raise ValueError(f"sample.guidance: 'compare' compares CFG with CLIP guidance of the "
                             f"{' and '.join(CLIP_GUIDED_ROLES)} models, but cascade {self.cascade!r} runs neither; "
                             "pick cascade imagen, glide, both or all, or guidance 'cfg'")
        if not self.clip_guided(guidable):
            raise ValueError(f"sample.clip_guidance_scale is 0 for {', '.join(guidable)}: guidance 'compare' would "
                             "compare CFG with no guidance at all; give a scale > 0 or use guidance 'cfg'")
        return self

    @model_validator(mode="after")
    def _device(self) -> "SampleConfig":
        d = self.device
        if d not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", d):
            raise ValueError(f"sample.device {d!r}: allowed 'auto', 'cpu', 'cuda', 'cuda:N'")
        return self

    def cascades(self) -> list[str]:
        if self.cascade == "both":  # as before GLIDE: the two cascades of unCLIP and Imagen
            return ["unclip", "imagen"]
        return list(CASCADES) if self.cascade == "all" else [self.cascade]

    def required_stages(self) -> list[str]:
        """Training stages this config samples from (for a submit-time check against the spec)."""
        roles = {r for c in self.cascades() for r in cascade_roles(c, self.max_stage)}
        if self.clip_guided(roles):
            roles.add(NOISED_CLIP)  # `guidance: clip` needs the noised CLIP trained in the same spec
        return [stage_of(r) for r in _models.ROLES if r in roles]

    def clip_guided(self, roles) -> list[str]:
        """The roles among ``roles`` that sample with CLIP guidance (under 'compare': in its CLIP half)."""
        if self.guidance == "cfg":
            return []
        return [r for r in CLIP_GUIDED_ROLES if r in roles and self.clip_guidance_for(r) > 0]

    def clip_guidance_for(self, role: str) -> float:
        g = self.clip_guidance_scale
        return float(g) if not isinstance(g, dict) else float(g.get(role, DEFAULT_CLIP_GUIDANCE[role]))

    def guidance_for(self, role: str) -> float:
        """The CFG weight of ``role``: 1 (none) where CLIP guidance replaces it (under 'compare', the
        CFG half's weight: the CLIP half samples with :meth:`variants`' 'clip' config)."""
        if self.guidance == "clip" and self.clip_guided([role]):
            return 1.0
        g = self.guidance_scale
        return float(g) if not isinstance(g, dict) else float(g.get(role, DEFAULT_GUIDANCE[role]))

    def variants(self, cascade: str) -> list[tuple[str, "SampleConfig"]]:
        """(name the samples are reported under, the config they sample with) for ``cascade``: the
        cascade itself, and under 'compare' its CLIP-guided half when it has a CLIP-guided model.
        Both halves draw from the same generators (stages/sampling/cascade.py seeds by cascade, not by name)."""
        if self.guidance != "compare":
            return [(cascade, self)]
        out = [(cascade, self.model_copy(update={"guidance": "cfg"}))]
        if self.clip_guided(cascade_roles(cascade, self.max_stage)):
            out.append((cascade + CLIP_GUIDED_SUFFIX, self.model_copy(update={"guidance": "clip"})))
        return out

    def steps_for(self, role: str) -> int:
        s = self.steps
        return int(s) if not isinstance(s, dict) else int(s.get(role, 25))


def cascade_roles(cascade: str, max_stage: str | None = None) -> tuple[str, ...]:
    """The roles a cascade runs, cut after ``max_stage`` ('base'/'decoder' mean its 64px model)."""
    if cascade not in CASCADES:
        raise ValueError(f"unknown cascade {cascade!r}; allowed: {', '.join(CASCADES)}")
    roles = CASCADES[cascade]
    if max_stage is None:
        return roles
    last = [r for r in roles if r in FIRST_IMAGE_ROLES][-1] if max_stage in FIRST_IMAGE_ROLES else max_stage
    return roles[: roles.index(last) + 1]
