"""train_decoder: the unCLIP decoder, CLIP image embedding (+ CLIP text tokens) -> image.

unCLIP §2.1: the CLIP image embedding is dropped (swapped for a learned null) 10% of the time
and the text caption 50% of the time, so that guidance works on either conditioning.
"""
from __future__ import annotations

from pydantic import Field

from pipeline.context import StageContext, StageResult
from stages.stage_spec import StageSpec
from stages.train_config import TrainConfig


class DecoderTrainConfig(TrainConfig):
    cfg_drop_text: float = Field(0.5, description="probability of dropping the CLIP text tokens (unCLIP: 50%)")
    cfg_drop_image: float = Field(0.1, description="probability of dropping the CLIP image embedding (unCLIP: 10%)")


def build_batch(batch, cfg: TrainConfig, flavor, device, dtype):
    from stages import batches  # torch: imported when training, not when a spec is read

    x0 = batches.images(batch, device)
    b = len(x0)
    cond = {**batches.clip_tokens(batch, device, dtype),
            "image_embed": batch["clip_image"].to(device, dtype, non_blocking=True),
            "drop_text": batches.drop_mask(b, cfg.cfg_drop_text, device),
            "drop_image": batches.drop_mask(b, cfg.cfg_drop_image, device)}
    return x0, cond


def sample_cond(f, prev):
    """What build_batch gives the network; ``prev`` is the prior's sampled CLIP image embedding."""
    return {"text_tokens": f.clip_tokens, "text_mask": f.clip_mask, "image_embed": prev}


SPEC = StageSpec(stage="train_decoder", role="decoder", needs_images=True, build_batch=build_batch,
                 sample_cond=sample_cond)


def run(cfg: DecoderTrainConfig, ctx: StageContext) -> StageResult:
    from stages.train import run_stage

    return run_stage(SPEC, cfg, ctx)
