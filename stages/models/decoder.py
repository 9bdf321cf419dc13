"""train_decoder: the unCLIP decoder, CLIP image embedding (+ the caption) -> image.

unCLIP §2.1: the CLIP image embedding is dropped (swapped for a learned null) 10% of the time
and the text caption 50% of the time, so that guidance works on either conditioning.

Two text encoders (``text_encoder``; both add the image embedding to the timestep embedding and
project it into 4 extra context tokens):

* ``clip_tokens`` (default): the frozen CLIP token features the embed stage precomputed. No
  text transformer to train or hold in memory; the UNet is widened instead (decoder-3.5b: 768
  channels). It is the default because it is what every decoder trained before the option
  existed is, so an upgrade keeps finished decoders valid (pipeline/manifest.py hashes only
  non-default values), and because it costs no text-transformer step per batch.
* ``glide``: the paper's decoder, a modified GLIDE: its own text transformer on the caption's
  token ids (the embed stage writes them), trained jointly with the UNet
  (stages/nets/text_transformer.GlideModel). CLIP's token features are trained only through its
  pooled EOT embedding, so they carry little of the layout a caption names ("in the top left");
  a transformer trained on the denoising loss learns what the decoder needs. The demo uses it.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.context import StageContext, StageResult
from stages.models.glide import ids_cond, token_cond
from stages.models.model_def import ModelDef
from stages.training.config import TrainConfig
from stages.training.stage_spec import StageSpec

TEXT_ENCODERS = ("clip_tokens", "glide")


class DecoderTrainConfig(TrainConfig):
    cfg_drop_text: float = Field(0.5, description="probability of dropping the caption (unCLIP: 50%)")
    cfg_drop_image: float = Field(0.1, description="probability of dropping the CLIP image embedding (unCLIP: 10%)")
    text_encoder: Literal["clip_tokens", "glide"] = Field("clip_tokens", description=(
        "how the decoder reads the caption: 'clip_tokens' = the embed stage's frozen CLIP token features; "
        "'glide' = its own GLIDE text transformer on the caption's token ids, trained jointly (unCLIP §2.1)"))


def build_batch(batch, cfg: DecoderTrainConfig, flavor, device, dtype):
    from stages.training import batches  # torch: imported when training, not when a spec is read

    x0 = batches.images(batch, device)
    b = len(x0)
    if cfg.text_encoder == "glide":
        text = token_cond(batch, flavor.config(variant="glide"), flavor.name, "train_decoder", device)
    else:
        text = batches.clip_tokens(batch, device, dtype)
    cond = {**text,
            "image_embed": batch["clip_image"].to(device, dtype, non_blocking=True),
            "drop_text": batches.drop_mask(b, cfg.cfg_drop_text, device),
            "drop_image": batches.drop_mask(b, cfg.cfg_drop_image, device)}
    return x0, cond


def text_encoder_of(config) -> str:
    """Which text encoder a trained decoder reads, from its final/config.json (a FinalConfig, or
    None; a decoder final written before the option existed is a clip_tokens one)."""
    network = (config.network if config is not None else None) or {}
    return "glide" if network.get("class") == "GlideModel" else "clip_tokens"


def sample_cond(f, prev, config=None):
    """What build_batch gives the network; ``prev`` is the prior's sampled CLIP image embedding."""
    if text_encoder_of(config) == "glide":
        return {**ids_cond(f), "image_embed": prev}
    return {"text_tokens": f.clip_tokens, "text_mask": f.clip_mask, "image_embed": prev}


SPEC = StageSpec(stage="train_decoder", role="decoder", needs_images=True, build_batch=build_batch,
                 sample_cond=sample_cond, variant=lambda cfg: cfg.text_encoder)


def run(cfg: DecoderTrainConfig, ctx: StageContext) -> StageResult:
    from stages.training.trainer import train_stage  # torch: imported when training, not when a spec is read

    return train_stage(SPEC, cfg, ctx)


MODEL = ModelDef(spec=SPEC, config=DecoderTrainConfig, run=run, null_keys=("drop_text", "drop_image"),
                 default_guidance=3.0, cascades={"unclip": 1},
                 description="unCLIP decoder: CLIP image embedding (+ text) -> 64px image.")
