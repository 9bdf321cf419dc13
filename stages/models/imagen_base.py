"""train_base: the Imagen base model, T5 tokens -> image at the flavor's size (64px at paper scale)."""
from __future__ import annotations

from pydantic import Field

from pipeline.context import StageContext, StageResult
from stages.models.model_def import ModelDef
from stages.training.stage_spec import StageSpec
from stages.training.config import TrainConfig


class BaseTrainConfig(TrainConfig):
    """Imagen drops the text 10% of the time for classifier-free guidance."""

    cfg_drop_text: float = Field(0.1, description="probability of dropping the T5 conditioning (CFG)")


def build_batch(batch, cfg: TrainConfig, flavor, device, dtype):
    from stages.training import batches  # torch: imported when training, not when a spec is read

    x0 = batches.images(batch, device)
    cond = {**batches.t5(batch, device, dtype), "drop_text": batches.drop_mask(len(x0), cfg.cfg_drop_text, device)}
    return x0, cond


def sample_cond(f, prev, config=None):
    """What build_batch gives the network, from prompt features (stages/sampling/cascade.py PromptFeatures)."""
    return {"text_tokens": f.t5_tokens, "text_mask": f.t5_mask}


SPEC = StageSpec(stage="train_base", role="base", needs_images=True, build_batch=build_batch, sample_cond=sample_cond)


def run(cfg: BaseTrainConfig, ctx: StageContext) -> StageResult:
    from stages.training.trainer import train_stage  # torch: imported when training, not when a spec is read

    return train_stage(SPEC, cfg, ctx)


MODEL = ModelDef(spec=SPEC, config=BaseTrainConfig, run=run, null_keys=("drop_text",), default_guidance=3.0,
                 cascades={"imagen": 0}, clip_guidance=3.0,
                 description="Imagen base model: T5 tokens -> 64px image.")
