"""train_prior: the unCLIP diffusion prior, CLIP text (tokens + embedding) -> CLIP image embedding.

The diffusion runs on the embedding vector itself ([B, Dc]), predicting x0 (unCLIP §2.2), with
no thresholding at sampling (embeddings are not in [-1, 1]). It needs no pixels: its loader
reads only the embedding shards.
"""
from __future__ import annotations

from pydantic import Field, field_validator

from pipeline.context import StageContext, StageResult
from stages.models.model_def import ModelDef
from stages.training.stage_spec import StageSpec
from stages.training.config import DiffusionSettings, TrainConfig


def _prior_diffusion() -> DiffusionSettings:
    return DiffusionSettings(prediction="x0", thresholding="none", min_snr_gamma=None)


class PriorTrainConfig(TrainConfig):
    cfg_drop_text: float = Field(0.1, description="probability of dropping the text conditioning (CFG)")
    diffusion: DiffusionSettings = Field(default_factory=_prior_diffusion,
                                         description="diffusion process (x0 prediction, no thresholding)")

    @field_validator("diffusion")
    @classmethod
    def _no_threshold(cls, v: DiffusionSettings) -> DiffusionSettings:
        if v.thresholding != "none":
            raise ValueError("diffusion.thresholding must be 'none' for the prior (CLIP embeddings are not in [-1, 1])")
        return v


def build_batch(batch, cfg: TrainConfig, flavor, device, dtype):
    from stages.training import batches  # torch: imported when training, not when a spec is read

    x0 = batch["clip_image"].to(device, non_blocking=True).float()
    cond = {**batches.clip_tokens(batch, device, dtype),
            "text_embed": batch["clip_text"].to(device, dtype, non_blocking=True),
            "drop_text": batches.drop_mask(len(x0), cfg.cfg_drop_text, device)}
    return x0, cond


def sample_cond(f, prev, config=None):
    """What build_batch gives the network, from prompt features (stages/sampling/cascade.py PromptFeatures)."""
    return {"text_tokens": f.clip_tokens, "text_mask": f.clip_mask, "text_embed": f.clip_text}


SPEC = StageSpec(stage="train_prior", role="prior", needs_images=False, build_batch=build_batch,
                 sample_cond=sample_cond)


def run(cfg: PriorTrainConfig, ctx: StageContext) -> StageResult:
    from stages.training.trainer import train_stage  # torch: imported when training, not when a spec is read

    return train_stage(SPEC, cfg, ctx)


MODEL = ModelDef(spec=SPEC, config=PriorTrainConfig, run=run, null_keys=("drop_text",), default_guidance=2.0,
                 cascades={"unclip": 0}, draws="embedding", mfu_target=0.45,
                 description="unCLIP diffusion prior: CLIP text -> CLIP image embedding.")
