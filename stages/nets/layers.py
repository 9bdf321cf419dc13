"""Building blocks shared by the UNet and the prior transformer.

Numerics: training runs in bf16 (DeepSpeed bf16 or autocast). Three places lose precision badly
in bf16 and are therefore computed in fp32 here regardless of the module dtype:
  * the sinusoidal timestep embedding (bf16 has 8 mantissa bits: t*1000 would be quantised to
    steps of 4 near t=1, so neighbouring timesteps would collide),
  * GroupNorm / LayerNorm statistics (mean/var over thousands of values): on CUDA the native
    kernels accumulate bf16/fp16 inputs in fp32 themselves (acc_type), so there the
    low-precision tensor goes in as it is; elsewhere (and for mixed dtypes) we upcast,
  * the attention softmax: `scaled_dot_product_attention`'s fused kernels (flash / mem-efficient)
    accumulate logits and the softmax in fp32 internally, so we only keep the *inputs* in the
    compute dtype and never materialise bf16 logits ourselves.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t (float [B] in [0, 1]) -> fp32 [B, dim].

    t is scaled by 1000 so the frequencies match the discrete-time (T=1000) embeddings of
    DDPM / guided-diffusion, whose hyper-parameters we copy.
    """
    t = t.float() * scale
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _native_low_precision(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """True where the fused CUDA norm kernel can take ``x`` as it is and still keep fp32 statistics.

    Skipping the explicit upcast matters in bf16 training (DeepSpeed's bf16 weights): ``x.float()``
    would write a 2x-size copy of every normalised activation, and autograd would keep that fp32
    copy alive until backward: twice the activation memory of each norm input, plus the traffic.
    Under autocast (fp32 weights: a dtype mismatch here) the norms run in fp32 as before.
    """
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and (weight is None or weight.dtype == x.dtype)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics are computed in fp32, output in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _native_low_precision(x, self.weight):
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm with fp32 statistics (see module docstring), output in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _native_low_precision(x, self.weight):
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def group_norm(ch: int) -> GroupNorm32:
    """32 groups where the width allows it (the guided-diffusion default), fewer for tiny nets."""
    groups = min(32, ch)
    while ch % groups:
        groups -= 1
    return GroupNorm32(groups, ch)


def zero_(module: nn.Module) -> nn.Module:
    """Zero-initialise the last layer of a residual branch so every block starts as identity
    (guided-diffusion's `zero_module`): deep UNets then train stably from step 0."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class EmbedMLP(nn.Module):
    """fp32 sinusoidal features -> Linear/SiLU/Linear in the module's own dtype."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(feats.to(self.fc1.weight.dtype))))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv x2 with the time embedding applied as scale-shift after the second
    norm (the "adaptive GroupNorm" of Dhariwal & Nichol, used by Imagen's Efficient U-Net)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb, ctx=None, ctx_mask=None):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb)).to(h.dtype)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Strided 3x3 conv (halves H and W, may change width)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1)

    def forward(self, x, emb=None, ctx=None, ctx_mask=None):
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv (no checkerboard artefacts of transposed convs)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)

    def forward(self, x, emb=None, ctx=None, ctx_mask=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class AttentionBlock(nn.Module):
    """Multi-head attention over a feature map, GLIDE-style.

    Keys/values = [spatial positions (if `self_attn`)] + [one learned null token (if `ctx_dim`)]
    + [context tokens, masked by `ctx_mask`]. Putting self- and cross-attention into one softmax
    is GLIDE's design (cheaper than two blocks); the always-valid null token keeps the softmax
    well defined when every context token is masked (dropped text) and there is no
    self-attention (Imagen's SR1024 UNet has cross-attention only).

    Layout (what keeps `scaled_dot_product_attention` on its fused kernels: CPU flash, CUDA
    flash / memory-efficient / cuDNN all need each head's q, k, v with a unit last-dim stride):
    the normalised map is turned into tokens [B, HW, C] once, and the projections are Linears on
    tokens, so every head is a *view* of a projection output ([B, L, heads, D] -> [B, heads, L, D],
    D innermost). The old layout (1x1 convs on [B, C, H, W], then transposed into heads) gave q a
    last-dim stride of HW, which sent CPU SDPA to the unfused math kernel and would cost CUDA its
    flash kernel. Self-attention uses one fused qkv projection (same parameters as separate
    q and kv: 3*C*C + 3*C); with context, k/v of the positions, the null token and the context
    are concatenated once ([B, S, 2C]), then split into heads as views.
    """

    def __init__(self, ch: int, head_dim: int, ctx_dim: int | None = None, self_attn: bool = True):
        super().__init__()
        if not self_attn and not ctx_dim:
            raise ValueError("AttentionBlock needs self_attn=True or a ctx_dim")
        self.heads = max(1, ch // head_dim)
        self.self_attn = self_attn
        self.norm = group_norm(ch)
        # Self-attention: q, k, v of the positions in one matmul; cross-only: q alone.
        self.qkv = nn.Linear(ch, 3 * ch) if self_attn else None
        self.q = None if self_attn else nn.Linear(ch, ch)
        if ctx_dim:
            self.ctx_kv = nn.Linear(ctx_dim, 2 * ch)
            self.null_kv = nn.Parameter(torch.randn(2 * ch) * 0.02)
        else:
            self.ctx_kv = None
        self.proj = zero_(nn.Linear(ch, ch))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Weights saved by the earlier layout (1x1 convs `q` [C, C, 1, 1], `kv` [2C, C, 1, 1],
        # `proj` [C, C, 1, 1]) are the same matrices: reshape them, and join q and kv into qkv
        # (q rows first, as split in forward), so trained weights still load after the upgrade.
        def take(name):
            return state_dict.pop(prefix + name)
        if self.self_attn and prefix + "kv.weight" in state_dict and prefix + "qkv.weight" not in state_dict:
            state_dict[prefix + "qkv.weight"] = torch.cat([take("q.weight"), take("kv.weight")]).flatten(1)
            state_dict[prefix + "qkv.bias"] = torch.cat([take("q.bias"), take("kv.bias")])
        for name in ("q.weight", "proj.weight"):
            w = state_dict.get(prefix + name)
            if w is not None and w.ndim == 4:
                state_dict[prefix + name] = w.flatten(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x, emb=None, ctx=None, ctx_mask=None):
        b, c, hgt, wid = x.shape
        n, heads = hgt * wid, self.heads
        # Tokens [B, HW, C]: one copy of the normalised map for NCHW input, none for channels_last
        # (its flatten+transpose is already contiguous). The Linear would make this copy anyway:
        # a [B, N, C] view with channel stride N cannot be flattened to [B*N, C] without one.
        tok = self.norm(x).flatten(2).transpose(1, 2).contiguous()
        if self.qkv is not None:
            qkv = self.qkv(tok)                                       # [B, N, 3C]
            q, kvs = qkv[..., :c], [qkv[..., c:]]
        else:
            q, kvs = self.q(tok), []
        mask = None
        if self.ctx_kv is not None:
            kvs.append(self.null_kv.to(q.dtype).expand(b, 1, 2 * c))
            if ctx is not None:
                kvs.append(self.ctx_kv(ctx).to(q.dtype))
                # Only pass a mask when some key can be masked: no mask keeps the CUDA flash
                # kernel eligible (and avoids a host sync that `mask.all()` would cost). A bool
                # [B, 1, 1, S] mask is accepted by CPU flash and CUDA memory-efficient attention.
                if ctx_mask is not None:
                    keep = torch.ones(b, (n if self.self_attn else 0) + 1, dtype=torch.bool, device=x.device)
                    mask = torch.cat([keep, ctx_mask.to(torch.bool)], 1)[:, None, None, :]
        kv = kvs[0] if len(kvs) == 1 else torch.cat(kvs, 1)          # [B, S, 2C]
        d = c // heads
        q = q.view(b, n, heads, d).transpose(1, 2)                    # [B, heads, N, D] views
        k, v = kv.view(b, kv.shape[1], 2, heads, d).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        # [B, heads, N, D] -> tokens [B, N, C]: a view, as the fused kernels write q's layout,
        # project, and view the result as [B, C, H, W] (channels_last strides): the residual
        # add writes the output in x's layout without another copy.
        out = self.proj(out.transpose(1, 2).reshape(b, n, c))
        return x + out.transpose(1, 2).view(b, c, hgt, wid)
