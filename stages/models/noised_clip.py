"""train_noised_clip: GLIDE's noised CLIP (Nichol et al. 2021, §2.4), the image tower that CLIP
guidance (stages/sampling/clip_guidance.py, ``sample.guidance: clip``) differentiates.

The tower sees x_t = alpha_t x0 + sigma_t eps and t (t ~ U[0, train_t_max], the diffusion
schedule of the models it will guide) and is trained with CLIP's symmetric contrastive loss and
a learnable logit scale against the *frozen* CLIP text embeddings the embed stage precomputed
(``clip_text`` in every batch): the text side is the CLIP the rest of the pipeline uses, only
the image side learns to see through noise. It runs in the one training loop (DeepSpeed engine,
checkpoints, EMA, validation on the held-out split at fixed t and noise) through
``StageSpec.loss``; it is not a denoiser, so it draws no sample grid and sits in no cascade.

Captions repeat in small corpora (the demo's has a few hundred distinct ones): rows whose text
embeddings are identical are all positives of each other (soft targets), not negatives.
"""
from __future__ import annotations

from pydantic import Field, field_validator

from pipeline.context import StageContext, StageResult
from stages.models.model_def import ModelDef
from stages.training.stage_spec import StageSpec
from stages.training.config import TrainConfig


class NoisedClipTrainConfig(TrainConfig):
    """Contrastive: each caption's negatives are the micro-batch's other images, so bigger batches
    teach more per step (a batch of 1 has no negatives: its loss is 0). No sample grid to draw."""

    batch_size: int = Field(16, description="micro-batch size per worker: the contrastive negatives (1: none)")

    @field_validator("sample_every")
    @classmethod
    def _no_grid(cls, v: int) -> int:
        if v:
            raise ValueError("must be 0: the noised CLIP is an image encoder, it has no samples to draw "
                             "(its figure is val_loss, the contrastive loss on held-out images)")
        return v


def build_batch(batch, cfg: TrainConfig, flavor, device, dtype):
    from stages.training import batches  # torch: imported when training, not when a spec is read

    x0 = batches.images(batch, device)
    # fp32 targets: a dot product with the image embedding, not a network input
    return x0, {"clip_text": batch["clip_text"].to(device, non_blocking=True).float()}


def contrastive_loss(diffusion, model, x0, cond, *, t=None, noise=None):
    """CLIP's symmetric cross-entropy between the noisy images and their captions -> (loss, stats)."""
    import torch
    import torch.nn.functional as F

    from stages.diffusion import _bc  # torch: imported when training, not when a spec is read

    b = x0.shape[0]
    if t is None:
        t = torch.rand(b, device=x0.device) * diffusion.train_t_max
    if noise is None:
        noise = torch.randn_like(x0)
    alpha, sigma = diffusion.schedule.alpha_sigma(t)
    x_t = _bc(alpha, x0) * x0 + _bc(sigma, x0) * noise
    text = cond["clip_text"]
    logits = model(x_t, t.float(), clip_text=text).float()          # [B, B]
    with torch.no_grad():  # identical captions are each other's positives
        unit = F.normalize(text.float(), dim=-1)
        same = (unit @ unit.T > 1 - 1e-4).float()
        target = same / same.sum(1, keepdim=True)
    loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target.T / target.T.sum(1, keepdim=True)))
    with torch.no_grad():
        top1 = (same.gather(1, logits.argmax(1, keepdim=True)).mean())
        stats = {"loss": loss.detach(), "top1": top1}
    return loss, stats


SPEC = StageSpec(stage="train_noised_clip", role="noised_clip", needs_images=True, build_batch=build_batch,
                 loss=contrastive_loss, samples=False,
                 clean_config=lambda cfg: cfg)   # no dropout of any kind to switch off


def run(cfg: NoisedClipTrainConfig, ctx: StageContext) -> StageResult:
    from stages.training.trainer import train_stage  # torch: imported when training, not when a spec is read

    return train_stage(SPEC, cfg, ctx)


# Not a denoiser and in no cascade: sampling loads it for `guidance: clip` (stages/sampling/clip_guidance.py).
MODEL = ModelDef(spec=SPEC, config=NoisedClipTrainConfig, run=run,
                 description="GLIDE's noised CLIP: noisy image x_t + t -> CLIP embedding, for CLIP guidance.")
