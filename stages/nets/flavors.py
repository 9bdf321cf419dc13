"""Named network sizes ("flavors") for every role of the cascade.

Roles and what each network is conditioned on:
  prior   CLIP tokens + CLIP text embedding -> CLIP image embedding (PriorTransformer, x0-pred)
  decoder unCLIP decoder: CLIP image embedding (+ CLIP tokens as text) -> base-size image
  base    Imagen base: T5 tokens -> base-size image
  sr256   Imagen SR: T5 tokens + low-res image -> 4x image ("64 -> 256" at paper scale)
  sr1024  Imagen SR: T5 tokens + low-res image -> 4x image ("256 -> 1024"); no self-attention
  glide   GLIDE base: token ids -> its own text transformer (trained jointly) -> base-size image
  noised_clip  GLIDE's noised CLIP image tower: noisy image x_t + t -> CLIP embedding (CLIP guidance)

Every role has `debug` (unit tests: tiny, seconds), `demo` (CPU demo: trains a visible
colour/shape model in about a minute on 2 cores, at a small resolution: base/decoder 32px,
sr256 32->64, sr1024 64->128) and one paper-scale flavor whose parameter count (with the
paper's conditioning widths: T5-XXL 4096, CLIP ViT-L/14 768 / 768) is checked on the meta
device to be within 10% of the paper's number.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.nn as nn

from .clip_image_tower import NoisedClip, NoisedClipConfig
from .prior_transformer import PriorConfig, PriorTransformer
from .text_transformer import GlideConfig, GlideModel, TextTransformerConfig
from .unet import UNet, UNetConfig

ROLES = ("prior", "decoder", "base", "sr256", "sr1024", "glide", "noised_clip")
PAPER_COND_DIMS = {"t5_dim": 4096, "clip_dim": 768, "clip_token_dim": 768}
_COND_KEYS = tuple(PAPER_COND_DIMS)


@dataclass(frozen=True)
class Flavor:
    role: str
    name: str
    kind: str                       # 'unet' | 'prior' | 'glide' | 'noised_clip'
    image_size: int | None          # output resolution (None for the prior)
    low_res_size: int | None        # SR conditioning resolution, else None
    target_params: int | None       # paper parameter count (checked within 10%), else None
    make_config: Callable[[dict], UNetConfig | PriorConfig | GlideConfig | NoisedClipConfig]   # cond_dims -> network config
    # Other networks of the same role and size a stage config can choose (the decoder's
    # ``text_encoder``): variant name -> make_config. ``make_config`` is ``default_variant``'s.
    variants: Mapping[str, Callable[[dict], object]] = field(default_factory=dict)
    default_variant: str | None = None

    def variant_names(self) -> tuple[str, ...]:
        return ((self.default_variant,) if self.default_variant else ()) + tuple(self.variants)

    def config(self, cond_dims: dict | None = None, variant: str | None = None, **overrides):
        if variant is None or variant == self.default_variant:
            make = self.make_config
        elif variant in self.variants:
            make = self.variants[variant]
        else:
            allowed = ", ".join(self.variant_names()) or "none (this flavor has one network)"
            raise ValueError(f"flavor {self.role}/{self.name} has no variant {variant!r}; variants: {allowed}")
        cfg = make(_check_cond_dims(cond_dims))
        try:
            return dataclasses.replace(cfg, **overrides)
        except TypeError as e:
            allowed = ", ".join(f.name for f in dataclasses.fields(cfg))
            raise ValueError(f"flavor {self.role}/{self.name}: bad override ({e}); "
                             f"allowed fields: {allowed}") from None


def _check_cond_dims(cond_dims: dict | None) -> dict:
    dims = dict(PAPER_COND_DIMS if cond_dims is None else cond_dims)
    missing = [k for k in _COND_KEYS if k not in dims]
    extra = [k for k in dims if k not in _COND_KEYS]
    if missing or extra:
        raise ValueError(f"cond_dims must have exactly the keys {list(_COND_KEYS)}; "
                         f"missing {missing}, unknown {extra}")
    for k in _COND_KEYS:
        if not isinstance(dims[k], int) or dims[k] < 1:
            raise ValueError(f"cond_dims[{k!r}] must be a positive int, got {dims[k]!r}")
    return dims


# ----------------------------------------------------------------------------- per role
def _prior(width, depth, head_dim=64):
    return lambda d: PriorConfig(clip_dim=d["clip_dim"], text_token_dim=d["clip_token_dim"],
                                 width=width, depth=depth, head_dim=head_dim)


def _decoder(size, ch, mults, blocks, attn, head_dim=64, ctx=512, coord=False):
    return lambda d: UNetConfig(image_size=size, base_channels=ch, channel_mults=mults,
                                num_res_blocks=blocks, attn_resolutions=attn, head_dim=head_dim,
                                context_dim=ctx, text_dim=d["clip_token_dim"],
                                image_embed_dim=d["clip_dim"], coord_channels=coord)


def _decoder_glide(size, ch, mults, blocks, attn, *, width, layers, head_dim=64, ctx=512, text_ctx=128,
                   text_head_dim=64, coord=False, tokenizer="clip", vocab=49408):
    """The decoder as in unCLIP §2.1 (a modified GLIDE): its own text transformer on CLIP BPE ids,
    trained jointly, plus the CLIP image embedding in the timestep embedding and 4 context tokens."""
    glide = _glide(size, ch, mults, blocks, attn, width=width, layers=layers, head_dim=head_dim, ctx=ctx,
                   text_ctx=text_ctx, text_head_dim=text_head_dim, coord=coord, tokenizer=tokenizer, vocab=vocab)

    def make(d):
        cfg = glide(d)
        return dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, image_embed_dim=d["clip_dim"]))
    return make


def _base(size, ch, mults, blocks, attn, head_dim=64, ctx=512, coord=False):
    return lambda d: UNetConfig(image_size=size, base_channels=ch, channel_mults=mults,
                                num_res_blocks=blocks, attn_resolutions=attn, head_dim=head_dim,
                                context_dim=ctx, text_dim=d["t5_dim"], coord_channels=coord)


def _sr(size, ch, mults, blocks, attn, cross, head_dim=64, ctx=512):
    return lambda d: UNetConfig(image_size=size, base_channels=ch, channel_mults=mults,
                                num_res_blocks=blocks, attn_resolutions=attn,
                                cross_attn_resolutions=cross, head_dim=head_dim, context_dim=ctx,
                                text_dim=d["t5_dim"], low_res_channels=3)


def _glide(size, ch, mults, blocks, attn, *, width, layers, head_dim=64, ctx=512, text_ctx=128,
           vocab=49408, text_head_dim=64, coord=False, tokenizer="clip"):
    # The token ids carry no embed-stage width: cond_dims are not used. The UNet's text width is
    # the transformer's; its tokens are projected to `ctx` once, then per attention layer.
    return lambda d: GlideConfig(
        tokenizer=tokenizer,
        text=TextTransformerConfig(vocab_size=vocab, text_ctx=text_ctx, width=width, layers=layers,
                                   head_dim=text_head_dim),
        unet=UNetConfig(image_size=size, base_channels=ch, channel_mults=mults, num_res_blocks=blocks,
                        attn_resolutions=attn, head_dim=head_dim, context_dim=ctx, text_dim=width,
                        coord_channels=coord))


def _noised_clip(size, ch, mults, blocks):
    # The head's width is CLIP's joint embedding (the embed stage's clip_dim): it is contrasted with
    # the frozen CLIP text embeddings.
    return lambda d: NoisedClipConfig(image_size=size, embed_dim=d["clip_dim"], base_channels=ch,
                                      channel_mults=mults, num_res_blocks=blocks)


_FLAVORS: dict[tuple[str, str], Flavor] = {}


def _add(role, name, kind, image_size, low_res_size, target, make, **variants):
    default = "clip_tokens" if variants else None   # the decoder's: see DECODER_TEXT_ENCODERS
    _FLAVORS[(role, name)] = Flavor(role, name, kind, image_size, low_res_size, target, make, variants, default)


# prior: unCLIP's prior is a 1B-parameter decoder-only transformer.
_add("prior", "debug", "prior", None, None, None, _prior(width=32, depth=2, head_dim=16))
_add("prior", "demo", "prior", None, None, None, _prior(width=128, depth=4, head_dim=32))
_add("prior", "prior-1b", "prior", None, None, 1_000_000_000, _prior(width=2048, depth=19))

# decoder: unCLIP's 3.5B GLIDE-style 64px decoder (GLIDE's 1.2B text transformer is replaced by
# precomputed CLIP tokens, so the UNet itself is widened to 768 channels to keep the 3.5B size).
# Each decoder flavor has both text encoders (DecoderTrainConfig.text_encoder): ``clip_tokens``
# (the default: frozen CLIP token features from the embed stage) and ``glide`` (unCLIP's own:
# a GLIDE text transformer trained jointly, sized like the glide flavor of the same name).
_add("decoder", "debug", "unet", 16, None, None,
     _decoder(16, 16, (1, 2), (1, 1), (8,), head_dim=16, ctx=32),
     glide=_decoder_glide(16, 16, (1, 2), (1, 1), (8,), width=32, layers=2, head_dim=16, ctx=32, text_ctx=32,
                          text_head_dim=16))
# Demo: 16px (16 -> 64 channels over 16/8/4px, attention at 8 and 4), ~3x the samples per
# CPU-second of the same net at 32px. Measured on the demo base (docs/experiments/demo-recipe.md "What the demo measures"):
# at 32px, 1800 steps learned colour (0.98) but not position (0.10; 0.04 with min_snr_floor at
# 1200 steps); at 16px, 1300 x 64 with min_snr_floor 1 learned both (colour 0.65 at 16px,
# position 0.85): the 4px bottleneck sees the 3x3 layout whole. CoordConv input channels: the
# captions name places ("in the top left"), which a net otherwise sees only through its padding.
_add("decoder", "demo", "unet", 16, None, None,
     _decoder(16, 16, (1, 2, 4), (1, 1, 2), (8, 4), head_dim=32, ctx=64, coord=True),
     # glide variant: reads the embed stage's SentencePiece ids through a 1024-row table. The demo's
     # tokenizer has 115 ids; a 49408-row CLIP BPE table cost 20% of a CPU step (379 against 311
     # ms at batch 64: AdamW, EMA and clipping over 3.2M rows no caption uses). A tokenizer with
     # more ids (a real T5's 32128) is refused at the first batch: train a paper flavor.
     glide=_decoder_glide(16, 16, (1, 2, 4), (1, 1, 2), (8, 4), width=64, layers=2, head_dim=32, ctx=64,
                          text_ctx=64, text_head_dim=32, coord=True, tokenizer="t5", vocab=1024))
# Paper size both ways: clip_tokens widens the UNet to 768 channels to keep the 3.5B (it has no
# text transformer); glide is GLIDE's 3.5B (the glide-3.5b UNet and 1.2B transformer, + the
# image-embedding projections).
_add("decoder", "decoder-3.5b", "unet", 64, None, 3_500_000_000,
     _decoder(64, 768, (1, 2, 3, 4), (3, 3, 3, 3), (32, 16, 8), ctx=1024),
     glide=_decoder_glide(64, 576, (1, 2, 3, 4), (3, 3, 3, 3), (32, 16, 8), width=2048, layers=24, ctx=2048))

# base: Imagen's 2B 64px base model (paper: 512 channels, mults 1-2-3-4, 3 blocks, attention at
# 32/16/8; our blocks are slimmer than Imagen's, so 576 channels reach 2B).
_add("base", "debug", "unet", 16, None, None,
     _base(16, 16, (1, 2), (1, 1), (8,), head_dim=16, ctx=32))
_add("base", "demo", "unet", 16, None, None,
     _base(16, 16, (1, 2, 4), (1, 1, 2), (8, 4), head_dim=32, ctx=64, coord=True))  # as the decoder's demo
_add("base", "base64-2b", "unet", 64, None, 2_000_000_000,
     _base(64, 576, (1, 2, 3, 4), (3, 3, 3, 3), (32, 16, 8), ctx=1024))

# sr256: Imagen's 600M Efficient U-Net 64->256 (more blocks at low resolution, attention at the
# lowest level only).
# Debug SR sizes chain like the real cascade (base 16 -> sr256 16->32 -> sr1024 32->64), so a
# whole pipeline at debug size validates and samples end to end.
_add("sr256", "debug", "unet", 32, 16, None,
     _sr(32, 8, (1, 2), (1, 1), (), (16,), head_dim=16, ctx=32))
_add("sr256", "demo", "unet", 64, 16, None,  # 4x, as the paper's 64 -> 256
     _sr(64, 16, (1, 2, 4), (1, 1, 2), (), (16,), head_dim=32, ctx=64))
_add("sr256", "sr256-600m", "unet", 256, 64, 600_000_000,
     _sr(256, 128, (1, 2, 4, 8), (2, 4, 8, 8), (32,), (32,), ctx=1024))

# sr1024: Imagen's 400M 256->1024 model: no self-attention (too costly at this size), text
# cross-attention at the lowest resolution only.
_add("sr1024", "debug", "unet", 64, 32, None,
     _sr(64, 8, (1, 2), (1, 1), (), (32,), head_dim=16, ctx=32))
_add("sr1024", "demo", "unet", 128, 64, None,
     _sr(128, 8, (1, 2, 4, 8), (1, 1, 1, 2), (), (16,), head_dim=32, ctx=64))
_add("sr1024", "sr1024-400m", "unet", 1024, 256, 400_000_000,
     _sr(1024, 128, (1, 2, 4, 8), (2, 4, 6, 5), (), (128,), ctx=1024))

# glide: GLIDE's 3.5B 64px base model = a 2.3B UNet (paper: 512 channels, mults 1-2-3-4, 3 blocks,
# attention at 32/16/8, 64-channel heads) + a 1.2B text transformer (24 residual blocks of width
# 2048). As for the base, our blocks are slimmer, so 576 channels: UNet 2.08B + transformer 1.31B
# (1.21B in its blocks, 0.10B token table) = 3.40B. Every flavor reads CLIP BPE ids (vocab 49408;
# GLIDE's own BPE had 50257). Debug sizes chain into the debug SR models like the base's (16px).
_add("glide", "debug", "glide", 16, None, None,
     _glide(16, 16, (1, 2), (1, 1), (8,), width=32, layers=2, head_dim=16, ctx=32, text_ctx=32, text_head_dim=16))
_add("glide", "demo", "glide", 16, None, None,  # as the base's demo flavor
     _glide(16, 16, (1, 2, 4), (1, 1, 2), (8, 4), width=64, layers=2, head_dim=32, ctx=64, text_ctx=64,
            text_head_dim=32, coord=True))
_add("glide", "glide-3.5b", "glide", 64, None, 3_500_000_000,
     _glide(64, 576, (1, 2, 3, 4), (3, 3, 3, 3), (32, 16, 8), width=2048, layers=24, ctx=2048))

# noised_clip: GLIDE's noised CLIP (§2.4) at the base model's resolution, for CLIP guidance of the
# 64px base models. GLIDE's was a ViT whose size the paper does not give; the paper flavor is sized
# like CLIP ViT-B/16's image tower (86M), as a conv tower (stages/nets/clip_image_tower.py says why).
# debug/demo at the base flavors' 16px, so they guide the debug/demo glide and base models.
_add("noised_clip", "debug", "noised_clip", 16, None, None, _noised_clip(16, 8, (1, 2), 1))
_add("noised_clip", "demo", "noised_clip", 16, None, None, _noised_clip(16, 32, (1, 2, 4), 1))
_add("noised_clip", "noised-clip-86m", "noised_clip", 64, None, 86_000_000,
     _noised_clip(64, 224, (1, 2, 4, 4), 2))  # 82.9M

# ----------------------------------------------------------------------------- API
def list_flavors() -> list[Flavor]:
    return list(_FLAVORS.values())


def get_flavor(role: str, name: str) -> Flavor:
    if role not in ROLES:
        raise ValueError(f"unknown network role {role!r}; allowed: {', '.join(ROLES)}")
    flavor = _FLAVORS.get((role, name))
    if flavor is None:
        names = [n for (r, n) in _FLAVORS if r == role]
        raise ValueError(f"unknown flavor {name!r} for role {role!r}; allowed: {', '.join(names)}")
    return flavor


_NETWORKS = ((GlideConfig, GlideModel), (PriorConfig, PriorTransformer), (NoisedClipConfig, NoisedClip),
             (UNetConfig, UNet))


def network_for(cfg) -> nn.Module:
    """The network a config describes (its class follows the config's type, so a flavor variant
    may be another kind of network than the flavor's default)."""
    for cfg_cls, net_cls in _NETWORKS:
        if isinstance(cfg, cfg_cls):
            return net_cls(cfg)
    raise TypeError(f"no network for config {type(cfg).__name__}")


def build_network(role: str, name: str, cond_dims: dict | None = None, variant: str | None = None,
                  **overrides) -> nn.Module:
    """Build the network of a flavor (``variant``: one of its variants, e.g. the decoder's text
    encoder; None = the default). `overrides` replace fields of its network config (e.g.
    gradient_checkpointing=True, dropout=0.1). Honours the current default device, so
    `with torch.device("meta"): build_network(...)` allocates nothing."""
    return network_for(get_flavor(role, name).config(cond_dims, variant, **overrides))


def count_params(role: str, name: str, cond_dims: dict | None = None, variant: str | None = None) -> int:
    """Parameter count, built on the meta device (no memory, works for multi-billion models).
    cond_dims defaults to the paper's (T5-XXL 4096, CLIP ViT-L/14 768/768)."""
    with torch.device("meta"):
        net = build_network(role, name, cond_dims, variant)
    return sum(p.numel() for p in net.parameters())
