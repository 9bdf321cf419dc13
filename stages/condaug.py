"""Conditioning augmentation for the super-resolution models.

SR models are trained on *real* low-res images but at sampling time receive the previous
stage's *generated* ones. Corrupting the low-res conditioning during training closes that gap
(Ho et al. 2021, "Cascaded Diffusion Models"; Imagen Sec. 2.5; unCLIP Sec. 2.1):
  * Gaussian noise: the low-res image is noised by the forward diffusion process at an
    augmentation level `aug_level` in [0, 1] (sampled per example in training, fixed at
    sampling), and the level is given to the network (`aug_level` float [B]) so it knows how
    much to trust the conditioning. Level 0 is exactly the identity.
  * Gaussian blur (optional; unCLIP's first upsampler): a random blur, sigma ~ U[range].

Low-res input convention: `make_low_res` keeps the image at low resolution by default
(`upsample=False`); the UNet bilinearly resizes `low_res` to x's size itself, so both forms are
accepted, but the low-res form is 16x smaller to ship through a batch.

Pure PyTorch (docs/design.md, invariant 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .diffusion import Generators, Schedule, _bc, randn
from .process_args import check_condaug


@dataclass
class CondAugConfig:
    """Conditioning augmentation settings (defaults follow Imagen)."""

    schedule: str = "cosine"          # noise schedule that maps aug_level -> (alpha, sigma)
    max_train_level: float = 0.5      # training levels ~ U[0, max_train_level]
    sample_level: float = 0.1         # fixed level at sampling (Imagen sweeps 0.1-0.3 and picks)
    blur_prob: float = 0.0            # probability of blurring a training example (unCLIP: 0.5)
    blur_sigma: tuple[float, float] = (0.4, 0.6)    # unCLIP's range for the first upsampler

    def __post_init__(self):
        check_condaug(self.schedule, self.max_train_level, self.sample_level, self.blur_prob, self.blur_sigma)


def make_low_res(x: torch.Tensor, low_res_size: int | tuple[int, int], *, upsample: bool = False) -> torch.Tensor:
    """High-res batch [B, C, H, W] -> low-res conditioning: antialiased bicubic downsample to
    ``low_res_size`` (a side: square; or ``(h, w)``: an aspect bucket's low-res shape),
    optionally upsampled back to H x W. Values are clamped to [-1, 1] (bicubic overshoots)."""
    if x.ndim != 4:
        raise ValueError(f"make_low_res expects [B, C, H, W], got {tuple(x.shape)}")
    hw = (low_res_size, low_res_size) if isinstance(low_res_size, int) else tuple(int(v) for v in low_res_size)
    if min(hw) < 1 or hw[0] > x.shape[-2] or hw[1] > x.shape[-1]:
        raise ValueError(f"low_res_size={low_res_size} must be within [1, {tuple(x.shape[-2:])}]")
    lr = F.interpolate(x.float(), size=hw, mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)
    if upsample:
        lr = F.interpolate(lr, size=x.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)
    return lr.to(x.dtype)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-example separable Gaussian blur of [B, C, H, W] with sigma [B] (reflect padding)."""
    b, c, h, w = x.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    offs = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    k = torch.exp(-0.5 * (offs[None] / sigma.float()[:, None].clamp(min=1e-3)) ** 2)
    k = k / k.sum(dim=1, keepdim=True)                                     # [B, K]
    # Depthwise conv over B*C channels, one kernel per example.
    kern = k.repeat_interleave(c, dim=0)                                   # [B*C, K]
    y = x.float().reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kern[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kern[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w).to(x.dtype)


class ConditioningAugmentation:
    """`train(low_res)` -> (augmented, aug_level); `sample(low_res)` -> same at the fixed level."""

    def __init__(self, cfg: CondAugConfig | None = None):
        self.cfg = cfg or CondAugConfig()
        self.schedule = Schedule(self.cfg.schedule)

    def apply(self, low_res: torch.Tensor, level: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        """Noise low_res with the forward process at `level` (float [B]); level 0 is exact identity
        (the clamped schedule would otherwise leave alpha = 1 - 2e-9)."""
        alpha, sigma = self.schedule.alpha_sigma(level)
        noise = randn(low_res.shape, generator, device=low_res.device, dtype=low_res.dtype)
        noisy = _bc(alpha, low_res) * low_res + _bc(sigma, low_res) * noise
        return torch.where(_bc(level, low_res) > 0, noisy, low_res)

    def train(self, low_res: torch.Tensor, generator: torch.Generator | None = None):
        b, dev = low_res.shape[0], low_res.device
        if self.cfg.blur_prob > 0:
            lo, hi = self.cfg.blur_sigma
            sig = lo + (hi - lo) * torch.rand(b, device=dev, generator=generator)
            do = torch.rand(b, device=dev, generator=generator) < self.cfg.blur_prob
            low_res = torch.where(do.reshape(-1, 1, 1, 1), gaussian_blur(low_res, sig), low_res)
        level = self.cfg.max_train_level * torch.rand(b, device=dev, generator=generator)
        return self.apply(low_res, level, generator), level

    def sample(self, low_res: torch.Tensor, level: float | None = None, generator: Generators = None):
        lvl = self.cfg.sample_level if level is None else level
        if not 0.0 <= lvl <= 1.0:
            raise ValueError(f"aug level must be in [0, 1], got {lvl}")
        level_t = torch.full((low_res.shape[0],), float(lvl), device=low_res.device)
        return self.apply(low_res, level_t, generator), level_t
