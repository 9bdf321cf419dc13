"""unCLIP diffusion prior: CLIP text -> CLIP image embedding (Ramesh et al. 2022, Sec. 2.2).

A decoder-only (causal) transformer over the sequence
    [text tokens (L), CLIP text embedding, timestep embedding, noised CLIP image embedding, query]
whose output at the final (learned query) position is the predicted *clean* image embedding:
the prior is trained with x0 prediction and MSE, as in the paper. Run it through
`stages.diffusion.Diffusion(prediction="x0", thresholding="none")` — CLIP embeddings are not in
[-1, 1], so clipping/thresholding them would be wrong.

Forward contract (docs/contracts.md):
    PriorTransformer(cfg)(x, t, *, text_tokens, text_mask, text_embed, drop_text=None) -> [B, Dc]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .layers import EmbedMLP, LayerNorm32, timestep_embedding
from .unet import _drop_mask


@dataclass
class PriorConfig:
    """Architecture of the prior transformer."""

    clip_dim: int = 768             # CLIP embedding width (input x, text_embed and output)
    text_token_dim: int = 768       # width of the CLIP per-token text features
    max_text_len: int = 77          # longest token sequence accepted (CLIP context length)
    width: int = 2048
    depth: int = 20
    head_dim: int = 64
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if self.width % self.head_dim:
            raise ValueError(f"PriorConfig.width={self.width} must be a multiple of "
                             f"head_dim={self.head_dim}")
        if min(self.clip_dim, self.text_token_dim, self.max_text_len, self.depth) < 1:
            raise ValueError("PriorConfig: clip_dim, text_token_dim, max_text_len, depth must be >= 1")


class Block(nn.Module):
    """Pre-LayerNorm transformer block; attention through SDPA with a boolean mask."""

    def __init__(self, width: int, head_dim: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.heads = width // head_dim
        self.norm1 = LayerNorm32(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = LayerNorm32(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, mask):
        b, n, c = x.shape
        # One qkv matmul on [B, n, C]; each head is a view with a unit last-dim stride, which is
        # what the fused kernels need (CPU flash; CUDA memory-efficient, as the causal+padding
        # bool mask rules out CUDA flash). tests/unit/test_attention_kernels.py checks the choice.
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        # the fused kernels write the output in q's [B, n, heads, D] layout: this reshape is a view
        x = x + self.dropout(self.proj(a.transpose(1, 2).reshape(b, n, c)))
        return x + self.dropout(self.mlp(self.norm2(x)))


class PriorTransformer(nn.Module):
    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = cfg.gradient_checkpointing
        w = cfg.width
        self.text_proj = nn.Linear(cfg.text_token_dim, w)
        self.text_embed_proj = nn.Linear(cfg.clip_dim, w)
        self.x_proj = nn.Linear(cfg.clip_dim, w)
        self.time_mlp = EmbedMLP(w, w)
        self.query = nn.Parameter(torch.randn(w) * 0.02)
        # Classifier-free guidance: a dropped caption becomes this learned CLIP text embedding,
        # and its tokens are masked out (every position still attends to itself, see _mask).
        self.null_text_embed = nn.Parameter(torch.randn(cfg.clip_dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(cfg.max_text_len + 4, w) * 0.02)
        self.blocks = nn.ModuleList(Block(w, cfg.head_dim, cfg.mlp_ratio, cfg.dropout)
                                    for _ in range(cfg.depth))
        self.norm = LayerNorm32(w)
        self.out = nn.Linear(w, cfg.clip_dim)

    @staticmethod
    def _mask(key_valid: torch.Tensor) -> torch.Tensor:
        """Causal mask that also hides padding keys; the diagonal is always allowed so no row is
        fully masked (a fully-masked softmax row is NaN and NaNs leak through 0 * NaN)."""
        n = key_valid.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=key_valid.device).tril()
        eye = torch.eye(n, dtype=torch.bool, device=key_valid.device)
        return (causal[None] & key_valid[:, None, :]) | eye[None]      # [B, n, n]

    def forward(self, x, t, *, text_tokens, text_mask, text_embed, drop_text=None):
        cfg = self.cfg
        b = x.shape[0]
        if tuple(x.shape) != (b, cfg.clip_dim) or t.shape != (b,):
            raise ValueError(f"PriorTransformer: x must be [B, {cfg.clip_dim}] and t [B]; got "
                             f"x {tuple(x.shape)}, t {tuple(t.shape)}")
        if text_tokens.ndim != 3 or text_tokens.shape[0] != b or text_tokens.shape[2] != cfg.text_token_dim:
            raise ValueError(f"PriorTransformer: text_tokens must be [B={b}, L, {cfg.text_token_dim}], "
                             f"got {tuple(text_tokens.shape)}")
        if text_tokens.shape[1] > cfg.max_text_len:
            raise ValueError(f"PriorTransformer: {text_tokens.shape[1]} text tokens exceed "
                             f"PriorConfig.max_text_len={cfg.max_text_len}")
        if tuple(text_embed.shape) != (b, cfg.clip_dim):
            raise ValueError(f"PriorTransformer: text_embed must be [B={b}, {cfg.clip_dim}], "
                             f"got {tuple(text_embed.shape)}")
        drop = _drop_mask(drop_text, b, x.device, "drop_text")
        dt = self.x_proj.weight.dtype
        n_tok = text_tokens.shape[1]
        valid = (torch.ones(b, n_tok, dtype=torch.bool, device=x.device) if text_mask is None
                 else text_mask.to(device=x.device, dtype=torch.bool)) & ~drop[:, None]
        text_embed = torch.where(drop[:, None], self.null_text_embed.to(text_embed.dtype), text_embed)
        seq = torch.cat([
            self.text_proj(text_tokens.to(dt)),
            self.text_embed_proj(text_embed.to(dt))[:, None],
            self.time_mlp(timestep_embedding(t, cfg.width))[:, None],
            self.x_proj(x.to(dt))[:, None],
            self.query.to(dt).expand(b, 1, -1),
        ], dim=1)
        seq = seq + self.pos[: n_tok + 4].to(dt)
        key_valid = torch.cat([valid, torch.ones(b, 4, dtype=torch.bool, device=x.device)], 1)
        mask = self._mask(key_valid)[:, None]                          # [B, 1, n, n]
        h = seq
        for blk in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(blk, h, mask, use_reentrant=False)
            else:
                h = blk(h, mask)
        return self.out(self.norm(h[:, -1]))
