"""One UNet for the unCLIP decoder, the Imagen base model and the SR models.

Architecture follows Imagen's Efficient U-Net (Saharia et al. 2022, App. B): per-level block
counts (more blocks at low resolution, where compute is cheap), skip connections scaled by
1/sqrt(2), self-attention only at low resolutions, text conditioning by masked cross-attention
plus a pooled (masked-mean) text vector added to the time embedding. unCLIP's decoder adds the
CLIP image embedding both to the time embedding and as extra context tokens (Ramesh et al. 2022,
Sec. 2.1). SR models concatenate the (upsampled) low-res image to the input and add the
conditioning-augmentation level to the time embedding.

Forward contract (docs/contracts.md):
    UNet(cfg)(x, t, *, text_tokens=None, text_mask=None, image_embed=None, low_res=None,
              aug_level=None, drop_text=None, drop_image=None, class_embed=None) -> Tensor like x
`class_embed` [B, time-embedding width] is added to the time embedding as it is: GLIDE's
projected final text token (stages/nets/text_transformer.py), the class embedding y.
`low_res` may be given at low resolution (what `stages.condaug.make_low_res` returns by default)
or already at x's size; it is bilinearly resized to x's size here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .layers import (AttentionBlock, Downsample, EmbedMLP, LayerNorm32, ResBlock, Upsample,
                     group_norm, timestep_embedding, zero_)


@dataclass
class UNetConfig:
    """Architecture of a UNet. Conditioning inputs are enabled by setting their dims."""

    image_size: int = 64                   # training resolution (used to place attention levels)
    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    channel_mults: tuple[int, ...] = (1, 2, 3, 4)
    num_res_blocks: tuple[int, ...] = (2, 2, 2, 2)    # per level, top (full res) first
    attn_resolutions: tuple[int, ...] = (32, 16, 8)   # self-attention at these feature sizes
    cross_attn_resolutions: tuple[int, ...] | None = None  # None: same as attn_resolutions
    head_dim: int = 64
    time_embed_mult: int = 4               # time-embedding width = base_channels * this
    context_dim: int = 512                 # width of the text/image context tokens
    text_dim: int | None = None            # text token width (T5 4096 / CLIP tokens 768); None: no text
    image_embed_dim: int | None = None     # CLIP image embedding width (unCLIP decoder); None: off
    num_image_tokens: int = 4              # unCLIP: the image embedding becomes 4 context tokens
    low_res_channels: int = 0              # SR: channels of the low-res conditioning image (3)
    # CoordConv (Liu et al. 2018): x/y coordinate maps as 2 extra input channels, so "top left" in
    # the text can be tied to a place. Convolutions and position-free attention otherwise see
    # position only through the zero padding at the borders.
    coord_channels: bool = False
    dropout: float = 0.0
    skip_scale: float = 1 / math.sqrt(2)   # Efficient U-Net scaled skip connections
    gradient_checkpointing: bool = False   # torch.utils.checkpoint per block (non-reentrant)
    # Run the convolutions on NHWC activations. Only the input is converted: cuDNN/oneDNN pick
    # channels_last when the input is, so it propagates through the net, while the weights stay
    # contiguous (DeepSpeed flattens parameters and cannot take channels_last ones).
    channels_last: bool = False

    def __post_init__(self):
        n = len(self.channel_mults)
        if isinstance(self.num_res_blocks, int):
            self.num_res_blocks = (self.num_res_blocks,) * n
        self.channel_mults = tuple(self.channel_mults)
        self.num_res_blocks = tuple(self.num_res_blocks)
        self.attn_resolutions = tuple(self.attn_resolutions)
        if self.cross_attn_resolutions is not None:
            self.cross_attn_resolutions = tuple(self.cross_attn_resolutions)
        if len(self.num_res_blocks) != n or min(self.num_res_blocks) < 1:
            raise ValueError(f"UNetConfig.num_res_blocks must be an int >= 1 or one int >= 1 per "
                             f"level ({n} levels), got {self.num_res_blocks}")
        if self.image_size % 2 ** (n - 1):
            raise ValueError(f"UNetConfig.image_size={self.image_size} must be divisible by "
                             f"2**(levels-1)={2 ** (n - 1)}")
        if self.base_channels < 1 or self.head_dim < 1:
            raise ValueError("UNetConfig.base_channels and head_dim must be >= 1")


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = cfg.gradient_checkpointing
        ch0 = cfg.base_channels
        emb_dim = ch0 * cfg.time_embed_mult
        ctx_dim = cfg.context_dim
        self.time_mlp = EmbedMLP(ch0, emb_dim)
        self.has_context = bool(cfg.text_dim or cfg.image_embed_dim)

        if cfg.text_dim:
            self.text_proj = nn.Linear(cfg.text_dim, ctx_dim)
            self.text_norm = LayerNorm32(ctx_dim)
            self.text_pool = nn.Sequential(LayerNorm32(ctx_dim), nn.Linear(ctx_dim, emb_dim))
            # What the time embedding gets instead of the pooled text when text is dropped; the
            # text tokens themselves are masked out, leaving each attention's learned null token.
            self.null_text_pooled = nn.Parameter(torch.randn(emb_dim) * 0.02)
        if cfg.image_embed_dim:
            self.null_image_embed = nn.Parameter(torch.randn(cfg.image_embed_dim) * 0.02)
            self.image_to_emb = nn.Linear(cfg.image_embed_dim, emb_dim)
            self.image_to_tokens = nn.Linear(cfg.image_embed_dim, cfg.num_image_tokens * ctx_dim)
            self.image_norm = LayerNorm32(ctx_dim)
        if cfg.low_res_channels:
            self.aug_mlp = EmbedMLP(ch0, emb_dim)

        chans = [ch0 * m for m in cfg.channel_mults]
        cross = cfg.attn_resolutions if cfg.cross_attn_resolutions is None else cfg.cross_attn_resolutions
        res = [cfg.image_size // 2 ** i for i in range(len(chans))]

        def attn(level_ch, r):
            use_self, use_cross = r in cfg.attn_resolutions, self.has_context and r in cross
            if not (use_self or use_cross):
                return []
            return [AttentionBlock(level_ch, cfg.head_dim, ctx_dim if use_cross else None, use_self)]

        self.conv_in = nn.Conv2d(cfg.in_channels + cfg.low_res_channels + (2 if cfg.coord_channels else 0),
                                 chans[0], 3, padding=1)
        # Down path: (Downsample) + N x (ResBlock [+ attention]); one skip per level.
        self.down = nn.ModuleList()
        for i, ch in enumerate(chans):
            blocks = [Downsample(chans[i - 1], ch)] if i > 0 else []
            for _ in range(cfg.num_res_blocks[i]):
                blocks += [ResBlock(ch, ch, emb_dim, cfg.dropout)] + attn(ch, res[i])
            self.down.append(nn.ModuleList(blocks))
        mid_ch = chans[-1]
        self.mid = nn.ModuleList([ResBlock(mid_ch, mid_ch, emb_dim, cfg.dropout)]
                                 + attn(mid_ch, res[-1])
                                 + [ResBlock(mid_ch, mid_ch, emb_dim, cfg.dropout)])
        # Up path mirrors it: the first block of a level takes [h, skip * skip_scale].
        self.up = nn.ModuleList()
        for i in reversed(range(len(chans))):
            ch = chans[i]
            blocks = []
            for j in range(cfg.num_res_blocks[i]):
                blocks += [ResBlock(2 * ch if j == 0 else ch, ch, emb_dim, cfg.dropout)] + attn(ch, res[i])
            if i > 0:
                blocks.append(Upsample(ch, chans[i - 1]))
            self.up.append(nn.ModuleList(blocks))
        self.out_norm = group_norm(chans[0])
        self.conv_out = zero_(nn.Conv2d(chans[0], cfg.out_channels, 3, padding=1))

    # ---------------------------------------------------------------- conditioning
    def _embed_conditioning(self, t, batch, device, text_tokens, text_mask, image_embed,
                            aug_level, drop_text, drop_image):
        cfg = self.cfg
        emb = self.time_mlp(timestep_embedding(t, cfg.base_channels))
        ctx_parts, mask_parts = [], []
        if cfg.text_dim:
            drop = _drop_mask(drop_text, batch, device, "drop_text")
            if text_tokens is None:
                if not bool(drop.all()):
                    raise ValueError("UNet: text_tokens is required (or drop_text=True for every "
                                     "sample) because UNetConfig.text_dim is set")
            else:
                if text_tokens.shape[0] != batch or text_tokens.shape[-1] != cfg.text_dim:
                    raise ValueError(f"UNet: text_tokens must be [B={batch}, L, {cfg.text_dim}], "
                                     f"got {tuple(text_tokens.shape)}")
                mask = (torch.ones(text_tokens.shape[:2], dtype=torch.bool, device=device)
                        if text_mask is None else text_mask.to(device=device, dtype=torch.bool))
                mask = mask & ~drop[:, None]          # dropped rows: no text tokens at all
                tok = self.text_norm(self.text_proj(text_tokens.to(self.text_proj.weight.dtype)))
                w = mask.to(tok.dtype)[..., None]
                pooled = (tok * w).sum(1) / w.sum(1).clamp(min=1.0)   # masked mean
                pooled = self.text_pool(pooled)
                ctx_parts.append(tok), mask_parts.append(mask)
            null = self.null_text_pooled.to(emb.dtype).expand(batch, -1)
            emb = emb + (null if text_tokens is None else torch.where(drop[:, None], null, pooled.to(emb.dtype)))
        if cfg.image_embed_dim:
            drop = _drop_mask(drop_image, batch, device, "drop_image")
            null = self.null_image_embed.expand(batch, -1)
            if image_embed is None:
                if not bool(drop.all()):
                    raise ValueError("UNet: image_embed is required (or drop_image=True for every "
                                     "sample) because UNetConfig.image_embed_dim is set")
                img = null
            else:
                if tuple(image_embed.shape) != (batch, cfg.image_embed_dim):
                    raise ValueError(f"UNet: image_embed must be [B={batch}, {cfg.image_embed_dim}], "
                                     f"got {tuple(image_embed.shape)}")
                img = torch.where(drop[:, None], null.to(image_embed.dtype), image_embed)
            img = img.to(self.image_to_emb.weight.dtype)
            emb = emb + self.image_to_emb(img).to(emb.dtype)
            toks = self.image_norm(self.image_to_tokens(img).reshape(batch, cfg.num_image_tokens, -1))
            ctx_parts.append(toks)
            mask_parts.append(torch.ones(batch, cfg.num_image_tokens, dtype=torch.bool, device=device))
        if cfg.low_res_channels:
            lvl = torch.zeros(batch, device=device) if aug_level is None else aug_level
            emb = emb + self.aug_mlp(timestep_embedding(lvl, cfg.base_channels)).to(emb.dtype)
        ctx = torch.cat([c.to(ctx_parts[0].dtype) for c in ctx_parts], 1) if ctx_parts else None
        ctx_mask = torch.cat(mask_parts, 1) if mask_parts else None
        return emb, ctx, ctx_mask

    # ---------------------------------------------------------------- forward
    def _block(self, block, h, emb, ctx, ctx_mask):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, ctx, ctx_mask, use_reentrant=False)
        return block(h, emb, ctx, ctx_mask)

    def forward(self, x, t, *, text_tokens=None, text_mask=None, image_embed=None, low_res=None,
                aug_level=None, drop_text=None, drop_image=None, class_embed=None):
        cfg = self.cfg
        b = x.shape[0]
        if t.shape != (b,):
            raise ValueError(f"UNet: t must be float [B={b}] in [0, 1], got shape {tuple(t.shape)}")
        emb, ctx, ctx_mask = self._embed_conditioning(t, b, x.device, text_tokens, text_mask,
                                                      image_embed, aug_level, drop_text, drop_image)
        if class_embed is not None:
            if tuple(class_embed.shape) != tuple(emb.shape):
                raise ValueError(f"UNet: class_embed must be [B={b}, {emb.shape[-1]}], got {tuple(class_embed.shape)}")
            emb = emb + class_embed.to(emb.dtype)
        if cfg.low_res_channels:
            if low_res is None:
                raise ValueError("UNet: low_res is required for a super-resolution UNet "
                                 "(UNetConfig.low_res_channels > 0)")
            if low_res.shape[-2:] != x.shape[-2:]:
                low_res = F.interpolate(low_res.float(), size=x.shape[-2:], mode="bilinear",
                                        align_corners=False)
            x = torch.cat([x, low_res.to(x.dtype)], dim=1)
        elif low_res is not None:
            raise ValueError("UNet: low_res given but this UNet has low_res_channels=0")
        if cfg.coord_channels:
            h_, w_ = x.shape[-2:]
            ys = torch.linspace(-1.0, 1.0, h_, device=x.device, dtype=x.dtype).view(1, 1, h_, 1).expand(b, 1, h_, w_)
            xs = torch.linspace(-1.0, 1.0, w_, device=x.device, dtype=x.dtype).view(1, 1, 1, w_).expand(b, 1, h_, w_)
            x = torch.cat([x, xs, ys], dim=1)
        x = x.to(self.conv_in.weight.dtype)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        h = self.conv_in(x)
        skips = []
        for level in self.down:
            for block in level:
                h = self._block(block, h, emb, ctx, ctx_mask)
            skips.append(h)
        for block in self.mid:
            h = self._block(block, h, emb, ctx, ctx_mask)
        for level in self.up:
            h = torch.cat([h, skips.pop() * cfg.skip_scale], dim=1)
            for block in level:
                h = self._block(block, h, emb, ctx, ctx_mask)
        return self.conv_out(F.silu(self.out_norm(h)))


def _drop_mask(drop, batch, device, name):
    """Normalise a drop_* argument (None / bool / bool tensor [B]) to a bool tensor [B]."""
    if drop is None:
        return torch.zeros(batch, dtype=torch.bool, device=device)
    if isinstance(drop, bool):
        return torch.full((batch,), drop, dtype=torch.bool, device=device)
    drop = torch.as_tensor(drop, device=device).to(torch.bool)
    if drop.shape != (batch,):
        raise ValueError(f"{name} must be bool [B={batch}], got shape {tuple(drop.shape)}")
    return drop
