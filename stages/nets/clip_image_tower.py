"""GLIDE's noised CLIP image tower (Nichol et al. 2021, §2.4): an image encoder that sees a noisy
image x_t and its t, trained contrastively against the frozen CLIP text embeddings, so that its
similarity to a caption has a useful gradient at every noise level (CLIP guidance).

A convolutional tower (the shared ``ResBlock``s, told t through their adaptive GroupNorm), a
global average pool and a linear head into CLIP's joint embedding width (``embed_dim`` =
the embed stage's ``clip_dim``). GLIDE's noised CLIP was a ViT; a conv tower is what trains in
minutes on a CPU at the demo's 16px and reuses the UNet's time conditioning, and a ViT is a
config away (the guidance only needs ``image_embed``). The text side is not here: the text
embeddings are the frozen CLIP's, precomputed by the embed stage (``clip_text``).

Forward contract:
    NoisedClip(cfg)(x [B, 3, H, W], t [B], *, clip_text [B', D]) -> logits [B, B'] (scaled cosines)
    NoisedClip(cfg).image_embed(x, t) -> unit-norm [B, D]
    NoisedClip(cfg).similarity(x, t, clip_text [B, D]) -> cosine [B] (row i with caption i)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .layers import Downsample, EmbedMLP, ResBlock, group_norm, timestep_embedding


@dataclass
class NoisedClipConfig:
    image_size: int = 64
    embed_dim: int = 768              # CLIP's joint embedding width (ViT-L/14: 768)
    base_channels: int = 128
    channel_mults: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2           # per level; a strided conv halves the size between levels
    time_embed_mult: int = 4
    logit_scale_init: float = math.log(1 / 0.07)   # CLIP's initial temperature
    gradient_checkpointing: bool = False

    def __post_init__(self):
        self.channel_mults = tuple(self.channel_mults)
        if min(self.image_size, self.embed_dim, self.base_channels, self.num_res_blocks) < 1 or not self.channel_mults:
            raise ValueError("NoisedClipConfig: image_size, embed_dim, base_channels, num_res_blocks must be >= 1 "
                             "and channel_mults non-empty")
        if self.image_size % 2 ** (len(self.channel_mults) - 1):
            raise ValueError(f"NoisedClipConfig.image_size={self.image_size} must be divisible by "
                             f"2^(levels-1)={2 ** (len(self.channel_mults) - 1)}")


class NoisedClip(nn.Module):
    def __init__(self, cfg: NoisedClipConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.base_channels
        emb_dim = ch * cfg.time_embed_mult
        self.time_embed = EmbedMLP(ch, emb_dim)
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        blocks: list[nn.Module] = []
        for level, mult in enumerate(cfg.channel_mults):
            out = cfg.base_channels * mult
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(ch, out, emb_dim))
                ch = out
            if level < len(cfg.channel_mults) - 1:
                blocks.append(Downsample(ch, ch))
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = group_norm(ch)
        self.proj = nn.Linear(ch, cfg.embed_dim)
        # CLIP's learnable temperature (log of the logit scale), clamped at 100 in use as CLIP does.
        # Shape [1], not a 0-d scalar: DeepSpeed's parameter broadcast views every parameter as bytes.
        self.logit_scale = nn.Parameter(torch.full((1,), float(cfg.logit_scale_init)))

    def image_embed(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Unit-norm embedding of the noisy image x_t at time t (float [B] in [0, 1])."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"NoisedClip: x must be [B, 3, H, W], got {tuple(x.shape)}")
        dt = self.conv_in.weight.dtype
        emb = self.time_embed(timestep_embedding(t.reshape(-1).expand(x.shape[0]), self.cfg.base_channels))
        h = self.conv_in(x.to(dt))
        for blk in self.blocks:
            if self.cfg.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(blk, h, emb, use_reentrant=False)
            else:
                h = blk(h, emb)
        h = F.silu(self.norm_out(h)).mean(dim=(2, 3))
        return F.normalize(self.proj(h).float(), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.float().clamp(max=math.log(100.0)).exp()

    def forward(self, x: torch.Tensor, t: torch.Tensor, *, clip_text: torch.Tensor) -> torch.Tensor:
        """CLIP logits: scaled cosines of every image with every caption embedding, [B, B']."""
        if clip_text.ndim != 2 or clip_text.shape[1] != self.cfg.embed_dim:
            raise ValueError(f"NoisedClip: clip_text must be [B, {self.cfg.embed_dim}], got {tuple(clip_text.shape)}")
        img = self.image_embed(x, t)
        return self.scale() * img @ F.normalize(clip_text.float(), dim=-1).T

    def similarity(self, x: torch.Tensor, t: torch.Tensor, clip_text: torch.Tensor) -> torch.Tensor:
        """Cosine of each noisy image with its own caption embedding, [B] (what CLIP guidance ascends)."""
        return (self.image_embed(x, t) * F.normalize(clip_text.float(), dim=-1)).sum(-1)
