"""train_sr256 and train_sr1024: Imagen super-resolution, low-res image + T5 tokens -> high-res.

Trained on *real* images: the low-res input is the real high-res crop downsampled to the
flavor's ``low_res_size`` (not the previous model's samples), then corrupted by conditioning
augmentation (stages/condaug.py) whose level the network is told. Both stages are the same
code; only the role (and so the flavor table) differs.
"""
from __future__ import annotations

from pydantic import Field

from pipeline.context import StageContext, StageResult
from stages.models.model_def import ModelDef
from stages.training.stage_spec import StageSpec
from stages.training.config import CondAugSettings, TrainConfig


class SRTrainConfig(TrainConfig):
    cfg_drop_text: float = Field(0.1, description="probability of dropping the T5 conditioning (CFG)")
    condaug: CondAugSettings = Field(default_factory=CondAugSettings,
                                     description="conditioning augmentation of the low-res input")


class SR256TrainConfig(SRTrainConfig):
    """train_sr256 (64 -> 256 at paper scale; the flavor decides the sizes)."""


class SR1024TrainConfig(SRTrainConfig):
    """train_sr1024 (256 -> 1024 at paper scale; the flavor decides the sizes)."""


def build_batch(batch, cfg: SRTrainConfig, flavor, device, dtype):
    from stages.training import batches  # torch: imported when training, not when a spec is read
    from stages.condaug import CondAugConfig, ConditioningAugmentation, make_low_res  # torch: as batches

    x0 = batches.images(batch, device)
    low = make_low_res(x0, flavor.low_res_size)
    low, level = ConditioningAugmentation(CondAugConfig(**cfg.condaug.model_dump())).train(low)
    cond = {**batches.t5(batch, device, dtype), "low_res": low.to(dtype), "aug_level": level,
            "drop_text": batches.drop_mask(len(x0), cfg.cfg_drop_text, device)}
    return x0, cond


def _condaug(cfg: SRTrainConfig) -> dict:
    return cfg.condaug.model_dump(mode="json")


def _clean(cfg: SRTrainConfig) -> SRTrainConfig:
    """Sample grids condition on the clean low-res image (aug level 0, no blur) and the full text."""
    return cfg.model_copy(update={"cfg_drop_text": 0.0,
                                  "condaug": cfg.condaug.model_copy(update={"max_train_level": 0.0,
                                                                            "blur_prob": 0.0})})


def sample_cond(f, prev, config=None):
    """The text part of build_batch's kwargs; sampling adds ``low_res`` (the previous model's output
    at low_res_size) and ``aug_level`` (its fixed conditioning-augmentation level)."""
    return {"text_tokens": f.t5_tokens, "text_mask": f.t5_mask}


SPEC_SR256 = StageSpec(stage="train_sr256", role="sr256", needs_images=True, build_batch=build_batch,
                       sample_cond=sample_cond, extra_config=_condaug, clean_config=_clean)
SPEC_SR1024 = StageSpec(stage="train_sr1024", role="sr1024", needs_images=True, build_batch=build_batch,
                        sample_cond=sample_cond, extra_config=_condaug, clean_config=_clean)


def run(cfg: SRTrainConfig, ctx: StageContext) -> StageResult:
    """One entry for both stages: the config class says which (the graph gives each its own)."""
    from stages.training.trainer import train_stage  # torch: imported when training, not when a spec is read

    spec = SPEC_SR1024 if isinstance(cfg, SR1024TrainConfig) else SPEC_SR256
    return train_stage(spec, cfg, ctx)


# Both upsamplers serve every cascade (GLIDE had one upsampler; its cascade reuses Imagen's two).
SR256 = ModelDef(spec=SPEC_SR256, config=SR256TrainConfig, run=run, null_keys=("drop_text",), upsampler=True,
                 cascades={"unclip": 2, "imagen": 1, "glide": 1}, mfu_target=0.30,
                 description="Super-resolution 64->256 with conditioning augmentation.")
SR1024 = ModelDef(spec=SPEC_SR1024, config=SR1024TrainConfig, run=run, null_keys=("drop_text",), upsampler=True,
                  cascades={"unclip": 3, "imagen": 2, "glide": 2}, mfu_target=0.30,
                  description="Super-resolution 256->1024 with conditioning augmentation.")
