"""train_glide: the GLIDE base model, caption token ids -> its own text transformer -> image at the
flavor's size (64px at paper scale). Nichol et al. 2021, §2.2-2.3.

Unlike the Imagen base (frozen T5 features) the text encoder is trained: the network the one
loop hands to DeepSpeed is ``GlideModel`` (stages/nets/text_transformer.py), text transformer and
UNet in one module, so one optimizer, one ZeRO partitioning, one EMA and one checkpoint cover
both. The batch carries token ids, not features: the embed stage writes the ids of both its
tokenizers (CLIP BPE and T5 SentencePiece, the models its spec names) into the embedding shards,
and the flavor's ``tokenizer`` says which ones the model reads.

Classifier-free guidance: 20% of captions are replaced by the empty sequence (GLIDE §2.3).
"""
from __future__ import annotations

from pydantic import Field

from pipeline.context import StageContext, StageResult
from stages.models.model_def import ModelDef
from stages.training.stage_spec import StageSpec
from stages.training.config import TrainConfig


class GlideTrainConfig(TrainConfig):
    """GLIDE drops 20% of the captions to the empty sequence for classifier-free guidance."""

    cfg_drop_text: float = Field(0.2, description="probability of replacing the caption by the empty sequence (CFG)")


def _ids(batch, tokenizer: str, stage: str):
    """(ids [B, L], mask [B, L]) of one tokenizer from a loader batch (stages/training/loader.collate)."""
    if f"{tokenizer}_ids" not in batch:
        raise ValueError(f"{stage}: the training batch carries no {tokenizer}_ids. The loader passes them "
                         "only when every embedding shard stores them: shards written before the embed stage "
                         "stored token ids need a re-run of the embed stage (t2i rerun RUN --from embed)")
    return batch[f"{tokenizer}_ids"], batch[f"{tokenizer}_id_mask"]


def token_cond(batch, net, flavor_name: str, stage: str, device) -> dict:
    """The token-id kwargs of a network with its own text transformer (``net``: its GlideConfig),
    from a loader batch: ``{<tokenizer>_ids, <tokenizer>_id_mask}`` on ``device``. Shared by
    train_glide and the decoder's ``text_encoder: glide``."""
    ids, mask = _ids(batch, net.tokenizer, stage)
    # Checked on the loader's CPU tensor (no device sync): on a GPU an out-of-range id would be a
    # device-side assert, not a message.
    top = int(ids.max()) if ids.numel() and ids.device.type == "cpu" else -1
    if top >= net.text.vocab_size:
        raise ValueError(f"{stage}: token id {top} is outside flavor {flavor_name}'s vocabulary "
                         f"({net.text.vocab_size} rows for the {net.tokenizer} tokenizer); pick a flavor whose "
                         "vocab_size covers the embed stage's tokenizer")
    return {f"{net.tokenizer}_ids": ids.to(device, non_blocking=True).long(),
            f"{net.tokenizer}_id_mask": mask.to(device, non_blocking=True).bool()}


def ids_cond(f) -> dict:
    """The token-id kwargs at sampling, from prompt features (stages/sampling/loading.PromptFeatures):
    the ids of both tokenizers; the network reads the one its config names."""
    return {"clip_ids": f.clip_ids, "clip_id_mask": f.clip_id_mask, "t5_ids": f.t5_ids, "t5_id_mask": f.t5_id_mask}


def build_batch(batch, cfg: TrainConfig, flavor, device, dtype):
    from stages.training import batches  # torch: imported when training, not when a spec is read

    x0 = batches.images(batch, device)
    cond = {**token_cond(batch, flavor.config(), flavor.name, "train_glide", device),
            "drop_text": batches.drop_mask(len(x0), cfg.cfg_drop_text, device)}
    return x0, cond


def sample_cond(f, prev, config=None):
    """What build_batch gives the network, from prompt features."""
    return ids_cond(f)


SPEC = StageSpec(stage="train_glide", role="glide", needs_images=True, build_batch=build_batch,
                 sample_cond=sample_cond)


def run(cfg: GlideTrainConfig, ctx: StageContext) -> StageResult:
    from stages.training.trainer import train_stage  # torch: imported when training, not when a spec is read

    return train_stage(SPEC, cfg, ctx)


MODEL = ModelDef(spec=SPEC, config=GlideTrainConfig, run=run, null_keys=("drop_text",), default_guidance=3.0,
                 cascades={"glide": 0}, clip_guidance=3.0,
                 description="GLIDE base model: caption token ids -> its own text transformer, trained jointly -> 64px image.")
