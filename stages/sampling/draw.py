"""One model's draw in a cascade, with torch alone: the seeds, the SR input and the call into the
diffusion sampler. Shared by the ``sample`` stage (stages/sampling/cascade.py) and the diffusers
pipeline a cascade export ships (stages/export/pipeline_t2i.py), which is why it imports nothing
but torch and the torch-only modules beside it: the export copies this file as it is, so the two
can never draw differently (stages/export/diffusers_code.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from stages.condaug import CondAugConfig, ConditioningAugmentation, make_low_res

# What a model of a cascade draws: a CLIP image embedding (the prior), a first image from text, or
# a larger image from the previous one (an upsampler). stages/models/__init__.py's ``draws`` and
# ``upsampler`` say which; a cascade export records it per model.
KINDS = ("embedding", "image", "upsampler")


def image_seed(seed: int, index: int, k: int, images_per_prompt: int) -> int:
    """The seed of image ``k`` of prompt ``index``: consecutive seeds from ``sample.seed`` (diffusers'
    convention), so image 17 of a grid is regenerated alone with ``--seed <seed + 17>``."""
    return seed + index * images_per_prompt + k


def image_generators(seeds: list[int], cascade_index: int, stage_index: int,
                     device: torch.device) -> list[torch.Generator]:
    """One generator per image and per (cascade, stage): an image's noise depends on its own seed
    only, not on its batch; a stage's noise not on how many draws earlier stages made (max_stage
    does not change earlier outputs); nor on the guidance (`guidance: compare`'s halves match)."""
    return [torch.Generator(device=device).manual_seed(
        (s * 1_000_003 + cascade_index * 10_007 + stage_index * 101) % (2 ** 63)) for s in seeds]


def hw(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """A side (square) or ``(h, w)`` (an aspect's shape) as ``(h, w)``."""
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def low_res_input(prev: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Previous stage's output at the SR model's conditioning size (as training's make_low_res)."""
    shape = hw(size)
    if tuple(prev.shape[-2:]) == shape:
        return prev
    if prev.shape[-2] >= shape[0] and prev.shape[-1] >= shape[1]:
        return make_low_res(prev, shape)
    return F.interpolate(prev, size=shape, mode="bicubic", align_corners=False).clamp(-1, 1)


def draw(net, diffusion, cond: dict, prev: torch.Tensor | None, *, kind: str, size: int | tuple[int, int],
         low_res_size: int | tuple[int, int] | None, condaug: dict | None, sampler: str, steps: int, guidance_scale: float,
         thresholding: str, sr_start_t: float, sr_aug_level: float,
         generator: "torch.Generator | list[torch.Generator]", device: torch.device) -> torch.Tensor:
    """One batch through one model: ``cond`` its keyword arguments (text, image embedding);
    ``size`` the embedding width (``kind`` embedding), or the image side or ``(h, w)`` (an aspect's
    shape; ``low_res_size`` likewise). An upsampler starts from
    the upsampled previous image at ``sr_start_t`` < 1 (SDEdit) and reads the previous image at
    ``low_res_size``, noised to ``sr_aug_level`` (Imagen's conditioning augmentation). Returns the
    output on the CPU: unit-norm embeddings, or images in [-1, 1]."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)} (got {kind!r})")
    b = next(v for v in cond.values() if isinstance(v, torch.Tensor)).shape[0] if prev is None else prev.shape[0]
    cond = dict(cond)
    start = {}
    if kind == "embedding":
        shape: tuple[int, ...] = (b, size)
        thresholding = "none"  # thresholding bounds pixels, not embeddings
    else:
        shape = (b, 3, *hw(size))
    if kind == "upsampler":
        prev = prev.to(device)
        if sr_start_t < 1.0:
            start = dict(t_start=sr_start_t, x_start=low_res_input(prev, hw(size)))
        low = low_res_input(prev, hw(low_res_size))
        aug = ConditioningAugmentation(CondAugConfig(**(condaug or {})))
        low, level = aug.sample(low, sr_aug_level, generator=generator)
        cond.update(low_res=low, aug_level=level)
    out = diffusion.sample(net, shape, cond, sampler=sampler, steps=steps, guidance_scale=guidance_scale,
                           thresholding=thresholding, generator=generator, device=device, **start)
    if kind == "embedding":
        # The decoder was trained on L2-normalised CLIP image embeddings; the prior's x0 is close
        # to but not exactly on the sphere.
        return F.normalize(out.float(), dim=-1).cpu()
    return out.float().clamp(-1, 1).cpu()


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """An image in [-1, 1], [C, H, W] -> [H, W, C] uint8, rounded as the sample stage's PNGs are."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)
