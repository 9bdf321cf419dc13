"""Pieces every batch builder uses: pixels to [-1, 1], CFG dropout masks, token features.

A batch builder turns one loader micro-batch (see ``stages/training/loader.collate``) into
``(x0, cond)``: the diffusion target and the network's keyword arguments.
"""
from __future__ import annotations

import torch


def images(batch: dict, device: torch.device) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 in [-1, 1] on ``device`` (the diffusion math stays fp32)."""
    return batch["image"].to(device, non_blocking=True).float().div_(127.5).sub_(1.0)


def drop_mask(batch_size: int, p: float, device: torch.device) -> torch.Tensor:
    """Classifier-free guidance dropout: True where this example's conditioning is swapped for null."""
    return torch.rand(batch_size, device=device) < p


def t5(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    return {"text_tokens": batch["t5_tokens"].to(device, dtype, non_blocking=True),
            "text_mask": batch["t5_mask"].to(device, non_blocking=True)}


def clip_tokens(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    return {"text_tokens": batch["clip_tokens"].to(device, dtype, non_blocking=True),
            "text_mask": batch["clip_mask"].to(device, non_blocking=True)}
