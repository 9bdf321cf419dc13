"""GLIDE's text transformer and the GLIDE base model built around the shared UNet (Nichol et al.
2021, §2.2 and App. A).

The caption's token ids go through a bidirectional transformer trained jointly with the UNet.
Its output serves twice:

* the *final token* (a learned slot appended after the caption, GLIDE's last position) is
  projected to the time-embedding width and added to the timestep embedding: the class
  embedding ``y`` of ``eps(x_t, t | y)``;
* the last layer's tokens (caption + final slot) are projected into the context of every
  attention layer of the UNet (the UNet's own per-attention ``ctx_kv`` projections).

Classifier-free guidance drops the caption to the *empty sequence* (GLIDE: 20% of training
captions): a dropped row keeps only the final slot, so the null conditioning is what the
transformer makes of no text at all, not a separate learned vector.

Padding: keys past a caption's length are masked (GLIDE attended to its padding tokens too);
masking makes the output independent of how far a batch is padded, so a batch can be padded to
its longest caption instead of a fixed 128 tokens, and train and sample see identical features.

Forward contract:
    TextTransformer(cfg)(ids [B, L] long, mask [B, L] bool) -> (tokens [B, L+1, W], mask [B, L+1],
                                                               final [B, W])
    GlideModel(cfg)(x, t, *, clip_ids=None, clip_id_mask=None, t5_ids=None, t5_id_mask=None,
                    drop_text=None, image_embed=None, drop_image=None) -> Tensor like x
``image_embed``/``drop_image`` are the unCLIP decoder's (a GlideModel whose UNet has
``image_embed_dim``: DALL-E 2's decoder is a modified GLIDE, Ramesh et al. 2022 §2.1).
``GlideConfig.tokenizer`` says which ids the model reads (the embed stage writes both).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .layers import LayerNorm32
from .prior_transformer import Block
from .unet import UNet, UNetConfig, _drop_mask

TOKENIZERS = ("clip", "t5")


@dataclass
class TextTransformerConfig:
    vocab_size: int = 49408          # CLIP BPE (T5 SentencePiece: 32128 rows; any vocab >= it works)
    text_ctx: int = 128              # caption tokens kept (the final slot comes on top)
    width: int = 2048
    layers: int = 24
    head_dim: int = 64
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if self.width % self.head_dim:
            raise ValueError(f"TextTransformerConfig.width={self.width} must be a multiple of "
                             f"head_dim={self.head_dim}")
        if min(self.vocab_size, self.text_ctx, self.layers) < 1:
            raise ValueError("TextTransformerConfig: vocab_size, text_ctx and layers must be >= 1")


class TextTransformer(nn.Module):
    """Token ids -> per-token features (after a final LayerNorm) and the final-slot embedding."""

    def __init__(self, cfg: TextTransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = cfg.gradient_checkpointing
        w = cfg.width
        self.token_embedding = nn.Embedding(cfg.vocab_size, w)
        self.pos = nn.Parameter(torch.randn(cfg.text_ctx + 1, w) * 0.01)  # last row: the final slot's
        self.final_slot = nn.Parameter(torch.randn(w) * 0.02)
        # N(0, 1), nn.Embedding's default and GLIDE's (CLIP's 0.02 is for a text tower pre-trained
        # on its own): trained jointly with a UNet from scratch, unit-scale token features tell
        # the captions apart from the first step. Measured on the demo decoder (1000 x 64, text at
        # 0.1x lr): loss at step 900 0.029 with 0.02, 0.019 with 1; position 0.10 with 0.02, 0.90 with 1.
        nn.init.normal_(self.token_embedding.weight, std=1.0)
        self.blocks = nn.ModuleList(Block(w, cfg.head_dim, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.layers))
        self.ln_final = LayerNorm32(w)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None):
        cfg = self.cfg
        if ids.ndim != 2 or ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"TextTransformer: ids must be an integer tensor [B, L], got {ids.dtype} "
                             f"{tuple(ids.shape)}")
        b, n = ids.shape
        mask = (torch.ones(b, n, dtype=torch.bool, device=ids.device) if mask is None
                else mask.to(device=ids.device, dtype=torch.bool))
        if tuple(mask.shape) != (b, n):
            raise ValueError(f"TextTransformer: mask must be [B={b}, L={n}], got {tuple(mask.shape)}")
        if n > cfg.text_ctx:  # the caller chose the context: cut like the encoders cut their captions
            ids, mask, n = ids[:, :cfg.text_ctx], mask[:, :cfg.text_ctx], cfg.text_ctx
        dt = self.token_embedding.weight.dtype
        # Padded positions may hold any id (or -1): they are masked, never looked up as they are.
        tok = self.token_embedding(torch.where(mask, ids.long(), torch.zeros_like(ids, dtype=torch.long)))
        seq = torch.cat([tok + self.pos[:n].to(dt), (self.final_slot + self.pos[-1]).to(dt).expand(b, 1, -1)], 1)
        valid = torch.cat([mask, torch.ones(b, 1, dtype=torch.bool, device=ids.device)], 1)   # [B, n+1]
        attn_mask = valid[:, None, None, :]   # keys only: every row sees at least the final slot
        h = seq
        for blk in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(blk, h, attn_mask, use_reentrant=False)
            else:
                h = blk(h, attn_mask)
        h = self.ln_final(h)
        return h, valid, h[:, -1]


@dataclass
class GlideConfig:
    """The GLIDE base model: a text transformer + a UNet whose text width is the transformer's."""

    text: TextTransformerConfig = field(default_factory=TextTransformerConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    tokenizer: str = "clip"          # which of the embed stage's token ids it reads: 'clip' | 't5'
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if isinstance(self.text, dict):   # rebuilt from final/config.json
            self.text = TextTransformerConfig(**self.text)
        if isinstance(self.unet, dict):
            self.unet = UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.unet.items()})
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"GlideConfig.tokenizer must be one of {', '.join(TOKENIZERS)}, got {self.tokenizer!r}")
        if self.unet.text_dim != self.text.width:
            raise ValueError(f"GlideConfig: unet.text_dim ({self.unet.text_dim}) must equal the text "
                             f"transformer's width ({self.text.width})")
        if self.gradient_checkpointing:
            self.text.gradient_checkpointing = self.unet.gradient_checkpointing = True


class GlideModel(nn.Module):
    def __init__(self, cfg: GlideConfig):
        super().__init__()
        self.cfg = cfg
        self.text = TextTransformer(cfg.text)
        self.unet = UNet(cfg.unet)
        emb_dim = cfg.unet.base_channels * cfg.unet.time_embed_mult
        # GLIDE's transformer_proj: the final token becomes the class embedding y.
        self.final_proj = nn.Linear(cfg.text.width, emb_dim)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor | None, drop_text=None):
        """(tokens, token mask, class embedding); dropped rows are encoded as the empty sequence."""
        b = ids.shape[0]
        drop = _drop_mask(drop_text, b, ids.device, "drop_text")
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.to(torch.bool)
        tokens, valid, final = self.text(ids, mask & ~drop[:, None])
        return tokens, valid, self.final_proj(final)

    def forward(self, x, t, *, clip_ids=None, clip_id_mask=None, t5_ids=None, t5_id_mask=None, drop_text=None,
                image_embed=None, drop_image=None):
        ids, mask = (clip_ids, clip_id_mask) if self.cfg.tokenizer == "clip" else (t5_ids, t5_id_mask)
        if ids is None:
            raise ValueError(f"GlideModel: {self.cfg.tokenizer}_ids is required (GlideConfig.tokenizer="
                             f"{self.cfg.tokenizer!r})")
        tokens, valid, y = self.encode_text(ids, mask, drop_text)
        # The unCLIP decoder (text_encoder: glide) is this model with UNetConfig.image_embed_dim set:
        # the UNet adds the CLIP image embedding to the timestep embedding and as 4 context tokens.
        return self.unet(x, t, text_tokens=tokens, text_mask=valid, class_embed=y,
                         image_embed=image_embed, drop_image=drop_image)
