"""A toy model defined outside the package, joined to the registry the way a team's own model is:
this module declares ``MODEL = ModelDef(...)`` and ``T2I_MODELS=toy_model`` names it
(stages/models/__init__.py). It is the template of "adding a model" (docs/design.md).

It trains the Imagen base UNet family (``network="base"``) under its own name, on T5 tokens with
its own CFG dropout and guidance, and forms a one-model cascade ``toy`` at the base's size. Torch
is imported only when it trains or samples, as in the shipped model modules.
"""
from __future__ import annotations

from pydantic import Field

from stages.models.model_def import ModelDef
from stages.training.config import TrainConfig
from stages.training.stage_spec import StageSpec


class ToyTrainConfig(TrainConfig):
    cfg_drop_text: float = Field(0.1, description="probability of dropping the text conditioning (CFG)")


def build_batch(batch, cfg: ToyTrainConfig, flavor, device, dtype):
    from stages.training import batches  # torch: only when it trains

    x0 = batches.images(batch, device)
    cond = {**batches.t5(batch, device, dtype), "drop_text": batches.drop_mask(len(x0), cfg.cfg_drop_text, device)}
    return x0, cond


def sample_cond(f, prev, config=None):
    """What build_batch gives the network, from prompt features."""
    return {"text_tokens": f.t5_tokens, "text_mask": f.t5_mask}


SPEC = StageSpec(stage="train_toy", role="toy", network="base", needs_images=True, build_batch=build_batch,
                 sample_cond=sample_cond)


def run(cfg: ToyTrainConfig, ctx):
    from stages.training.trainer import train_stage  # torch: only when it trains

    return train_stage(SPEC, cfg, ctx)


MODEL = ModelDef(spec=SPEC, config=ToyTrainConfig, run=run, null_keys=("drop_text",), default_guidance=2.0,
                 cascades={"toy": 0}, description="A toy text-to-image model on the Imagen base UNet (tests).")
