"""The registry of trained models: the one place that says what each model role is.

Each line names a role's graph stage, the module holding its config class, its ``StageSpec``
(training: what data it needs and how a batch becomes network kwargs) and its ``sample_cond``
(sampling: how prompt features and the previous model's output become the same kwargs, side by
side with the batch builder so the two cannot drift), its null-conditioning keys for
classifier-free guidance, its default guidance scale and where it sits in the cascades. The stage
graph, the spec's cross-stage checks, sampling, the report and the benchmarks read this table.

Adding a model = its module (config class, ``build_batch``, ``sample_cond``, ``SPEC``) + one line
in ``MODELS`` (docs/design.md, "Adding a model"). Importing this file imports no torch.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelDef:
    role: str                        # network role in stages/nets/flavors.py
    stage: str                       # stage name in the graph and the run spec
    module: str                      # the model's module
    config_class: str                # its TrainConfig subclass, in ``module``
    spec_attr: str                   # its StageSpec, in ``module``
    needs_images: bool               # False: trains on embeddings only (its loader opens no tars)
    null_keys: tuple[str, ...]       # drop flags set for the unconditional branch of CFG
    default_guidance: float          # CFG scale when the sample config names none (1.0 = off)
    upsampler: bool                  # takes the previous model's output as ``low_res``
    description: str

    def load(self):
        return importlib.import_module(self.module)

    @property
    def stage_spec(self):
        return getattr(self.load(), self.spec_attr)

    @property
    def config(self) -> type:
        return getattr(self.load(), self.config_class)


MODELS: tuple[ModelDef, ...] = (
    ModelDef("prior", "train_prior", "stages.models.prior", "PriorTrainConfig", "SPEC", False, ("drop_text",), 2.0, False,
             "unCLIP diffusion prior: CLIP text -> CLIP image embedding."),
    ModelDef("decoder", "train_decoder", "stages.models.decoder", "DecoderTrainConfig", "SPEC", True,
             ("drop_text", "drop_image"), 3.0, False, "unCLIP decoder: CLIP image embedding (+ text) -> 64px image."),
    ModelDef("base", "train_base", "stages.models.imagen_base", "BaseTrainConfig", "SPEC", True, ("drop_text",), 3.0, False,
             "Imagen base model: T5 tokens -> 64px image."),
    ModelDef("sr256", "train_sr256", "stages.models.superres", "SR256TrainConfig", "SPEC_SR256", True, ("drop_text",), 1.0,
             True, "Super-resolution 64->256 with conditioning augmentation."),
    ModelDef("sr1024", "train_sr1024", "stages.models.superres", "SR1024TrainConfig", "SPEC_SR1024", True, ("drop_text",),
             1.0, True, "Super-resolution 256->1024 with conditioning augmentation."),
    ModelDef("glide", "train_glide", "stages.models.glide", "GlideTrainConfig", "SPEC", True, ("drop_text",), 3.0, False,
             "GLIDE base model: caption token ids -> its own text transformer, trained jointly -> 64px image."),
    # Not a denoiser and in no cascade: sampling loads it for `guidance: clip` (stages/sampling/clip_guidance.py).
    ModelDef("noised_clip", "train_noised_clip", "stages.models.noised_clip", "NoisedClipTrainConfig", "SPEC", True, (), 1.0,
             False, "GLIDE's noised CLIP: noisy image x_t + t -> CLIP embedding, for CLIP guidance."),
)

# Which models a cascade runs, in order; an upsampler's input is the model before it.
CASCADES: dict[str, tuple[str, ...]] = {
    "unclip": ("prior", "decoder", "sr256", "sr1024"),
    "imagen": ("base", "sr256", "sr1024"),
    "glide": ("glide", "sr256", "sr1024"),  # GLIDE had one upsampler; the cascade reuses Imagen's two
}

ROLES: tuple[str, ...] = tuple(m.role for m in MODELS)
# The models a cascade can run (denoisers); the others (the noised CLIP) only help sampling.
CASCADE_ROLES: tuple[str, ...] = tuple(r for r in ROLES if any(r in rs for rs in CASCADES.values()))
TRAIN_STAGES: tuple[str, ...] = tuple(m.stage for m in MODELS)


def model(role: str) -> ModelDef:
    for m in MODELS:
        if m.role == role:
            return m
    raise KeyError(f"unknown model role {role!r}; roles: {', '.join(ROLES)}")


def by_stage(stage: str) -> ModelDef:
    for m in MODELS:
        if m.stage == stage:
            return m
    raise KeyError(f"unknown training stage {stage!r}; stages: {', '.join(TRAIN_STAGES)}")


def stage_of(role: str) -> str:
    return model(role).stage


def chained_pairs() -> list[tuple[str, str]]:
    """(lower, upper) model pairs whose sizes must chain: each upsampler after the one before it."""
    pairs = []
    for roles in CASCADES.values():
        pairs += [(lo, hi) for lo, hi in zip(roles, roles[1:]) if model(hi).upsampler]
    return sorted(set(pairs), key=pairs.index)
