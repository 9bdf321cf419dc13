"""Every attention call site takes the fused SDPA kernel, and FLOPs count the same on every kernel.

Why on the CPU: the fused kernels' layout rules (each head's q/k/v with a unit last-dim stride,
a bool mask broadcastable to [B, heads, L, S]) are what CUDA flash / memory-efficient need too,
and a layout regression showed up here first: the UNet's old 1x1-conv projections gave q a
last-dim stride of H*W and sent SDPA to the unfused math kernel. So we ask torch's own selector
(``torch._fused_sdp_choice``) about the exact tensors each call site passes, and check with the
profiler that the fused CPU kernel (forward and backward) is what runs. The GPU test
(tests/gpu) runs the CUDA kernels themselves.

Paper flavors are billions of parameters: they are built and run on the meta device (shapes and
strides only, nothing computed), and the selector is asked about CPU tensors with the recorded
shapes, strides and dtypes (``torch.empty_strided``, uninitialised). That meta and CPU give the
same strides is checked on the demo flavors, which also run for real.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from stages.training.flops import ATTENTION_FLOP_FORMULAS, attention_forward_flops, count_flops
from stages.nets import build_network, get_flavor
from stages.nets.flavors import PAPER_COND_DIMS
from stages.nets.layers import AttentionBlock
from stages.nets.prior_transformer import Block, PriorTransformer

FLASH = int(SDPBackend.FLASH_ATTENTION)        # on CPU: aten._scaled_dot_product_flash_attention_for_cpu
CPU_FUSED = "aten::_scaled_dot_product_flash_attention_for_cpu"
MATH = "aten::_scaled_dot_product_attention_math"
SMALL_DIMS = {"t5_dim": 64, "clip_dim": 64, "clip_token_dim": 64}     # what the demo bench uses
PAPER = {"prior": "prior-1b", "decoder": "decoder-3.5b", "base": "base64-2b",
         "sr256": "sr256-600m", "sr1024": "sr1024-400m"}
ROLES = tuple(PAPER)
# Small tensors: intra-op threads only add overhead on the shared CI box (single_thread_torch, tests/support/env.py).
pytestmark = pytest.mark.usefixtures("single_thread_torch")


class _SdpaSpy:
    """Records what each scaled_dot_product_attention call receives and torch's kernel choice
    for it (asked on CPU tensors of the same shapes/strides/dtypes when the call is on meta)."""

    def __init__(self, monkeypatch):
        self.calls: list[dict] = []
        real = F.scaled_dot_product_attention

        def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
            cpu = [None if t is None else torch.empty_strided(t.shape, t.stride(), dtype=t.dtype)
                   for t in (q, k, v, attn_mask)]
            choice = torch._fused_sdp_choice(*cpu[:3], attn_mask=cpu[3], dropout_p=dropout_p,
                                             is_causal=is_causal)
            self.calls.append({"choice": choice, "q": tuple(q.shape), "k": tuple(k.shape),
                               "strides": tuple(None if t is None else t.stride() for t in (q, k, v, attn_mask)),
                               "mask": None if attn_mask is None else (attn_mask.dtype, tuple(attn_mask.shape))})
            return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

        # The nets call F.scaled_dot_product_attention through the module attribute.
        monkeypatch.setattr(F, "scaled_dot_product_attention", spy)


def _inputs(role, flavor, dims, batch, device, text_len, padded, dtype=torch.float32):
    """Forward kwargs of a network at its flavor's shapes (random values: layouts don't care)."""
    f = get_flavor(role, flavor)
    g = dict(device=device)
    lengths = torch.tensor([max(1, text_len // 4), text_len] * batch, **g)[:batch]
    mask = (torch.arange(text_len, **g)[None] < lengths[:, None]) if padded else None
    if role == "prior":
        return dict(x=torch.randn(batch, dims["clip_dim"], **g), t=torch.rand(batch, **g),
                    text_tokens=torch.randn(batch, text_len, dims["clip_token_dim"], **g),
                    text_mask=mask, text_embed=torch.randn(batch, dims["clip_dim"], **g))
    kw = dict(x=torch.randn(batch, 3, f.image_size, f.image_size, **g), t=torch.rand(batch, **g),
              text_mask=mask)
    text_dim = dims["clip_token_dim"] if role == "decoder" else dims["t5_dim"]
    kw["text_tokens"] = torch.randn(batch, text_len, text_dim, **g)
    if role == "decoder":
        kw["image_embed"] = torch.randn(batch, dims["clip_dim"], **g)
    if f.low_res_size:
        kw["low_res"] = torch.randn(batch, 3, f.low_res_size, f.low_res_size, **g)
    return kw


def _forward(net, kw):
    kw = dict(kw)
    return net(kw.pop("x"), kw.pop("t"), **kw)


def _n_attention_sites(net) -> int:
    return sum(isinstance(m, (AttentionBlock, Block)) for m in net.modules())


# ----------------------------------------------------------------------------- kernel choice
@pytest.mark.parametrize("role", ROLES)
def test_demo_flavor_runs_fused_attention_forward_and_backward(role, monkeypatch):
    """Real CPU training step of the demo network: every SDPA call is the fused kernel (torch's
    selector and the profiler agree), forward and backward, with and without a text mask."""
    torch.manual_seed(0)
    net = build_network(role, "demo", SMALL_DIMS)
    n = _n_attention_sites(net)
    for padded in (True, False):
        kw = _inputs(role, "demo", SMALL_DIMS, 2, "cpu", 77 if role in ("prior", "decoder") else 32, padded)
        spy = _SdpaSpy(monkeypatch)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            _forward(net, kw).float().square().mean().backward()
        names = [e.name for e in prof.events()]
        assert n > 0 and len(spy.calls) == n
        assert [c["choice"] for c in spy.calls] == [FLASH] * n, spy.calls
        assert names.count(CPU_FUSED) == n and names.count(CPU_FUSED + "_backward") == n
        assert MATH not in names
        # text-conditioned cross-attention gets a bool key mask (the UNet always builds one),
        # the prior a bool [B, 1, n, n] causal+padding mask
        assert all(c["mask"] is not None and c["mask"][0] == torch.bool for c in spy.calls)


@pytest.mark.parametrize("role", ROLES)
def test_paper_flavor_call_sites_choose_fused_kernel(role, monkeypatch):
    """The paper networks, built and run on the meta device at batch 2 (T5 128 / CLIP 77 text
    tokens, with and without a padding mask): the kernel torch picks for each call site's
    tensors is the fused one, in fp32 and in bf16 (the GPU training dtype)."""
    text_len = 77 if role in ("prior", "decoder") else 128
    with torch.device("meta"):
        net = build_network(role, PAPER[role], PAPER_COND_DIMS)
    n = _n_attention_sites(net)
    for dtype in (torch.float32, torch.bfloat16):
        net = net.to(dtype)
        for padded in (True, False):
            kw = _inputs(role, PAPER[role], PAPER_COND_DIMS, 2, "meta", text_len, padded)
            spy = _SdpaSpy(monkeypatch)
            with torch.no_grad():
                _forward(net, kw)
            assert n > 0 and len(spy.calls) == n
            bad = [c for c in spy.calls if c["choice"] != FLASH]
            assert not bad, (f"{role}/{PAPER[role]} {dtype} padded={padded}: {len(bad)} of {n} "
                             f"calls not fused, e.g. {bad[0]}")


def test_meta_device_gives_the_strides_the_cpu_gives(monkeypatch):
    """What the paper-flavor test relies on: the same network on meta and on CPU hands SDPA
    tensors of identical shapes and strides."""
    seen = {}
    for device in ("cpu", "meta"):
        with torch.device(device):
            torch.manual_seed(0)
            net = build_network("decoder", "demo", SMALL_DIMS)
            kw = _inputs("decoder", "demo", SMALL_DIMS, 2, device, 77, True)
        spy = _SdpaSpy(monkeypatch)
        with torch.no_grad():
            _forward(net, kw)
        seen[device] = [(c["q"], c["k"], c["strides"], c["mask"]) for c in spy.calls]
    assert seen["cpu"] == seen["meta"] and seen["cpu"]


# Block configurations at the paper flavors' widths (see stages/nets/flavors.py): self-attention
# at 8x8 with 2304 channels (base64-2b), self+cross at 32x32 with 1536 (decoder-3.5b),
# cross-only at 16x16 with 1024 (a cut-down sr1024-400m level: same heads and head dim).
@pytest.mark.parametrize("ch,hw,ctx_dim,self_attn,ctx_len", [
    (2304, 8, None, True, 0), (1536, 16, 1024, True, 77), (1024, 16, 1024, False, 128),
])
@pytest.mark.parametrize("channels_last", [False, True])
def test_attention_block_layouts(ch, hw, ctx_dim, self_attn, ctx_len, channels_last, monkeypatch):
    """The block directly, on CPU: no context, context with a padding mask and context without
    a mask; NCHW and channels_last input. Each head is a view with a unit last-dim stride and
    the kernel is the fused one."""
    torch.manual_seed(0)
    blk = AttentionBlock(ch, 64, ctx_dim, self_attn)
    x = torch.randn(1, ch, hw, hw)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    variants = [{}] if ctx_dim is None else [
        {"ctx": torch.randn(1, ctx_len, ctx_dim), "ctx_mask": torch.arange(ctx_len)[None] < 9},
        {"ctx": torch.randn(1, ctx_len, ctx_dim)}, {}]
    spy = _SdpaSpy(monkeypatch)
    with torch.no_grad():
        for kw in variants:
            assert blk(x, **kw).shape == x.shape
    assert [c["choice"] for c in spy.calls] == [FLASH] * len(variants)
    assert all(s[-1] == 1 for c in spy.calls for s in c["strides"][:3])
    assert spy.calls[0]["q"] == (1, ch // 64, hw * hw, 64)


def test_attention_block_matches_the_math_kernel():
    """The fused kernel and the math kernel give the same block output (masked cross-attention,
    one sample with every text token masked: the null token keeps its softmax defined)."""
    torch.manual_seed(0)
    blk = AttentionBlock(64, 16, ctx_dim=32)
    torch.nn.init.normal_(blk.proj.weight)          # zero-initialised: would hide the attention
    x, ctx = torch.randn(2, 64, 8, 8), torch.randn(2, 7, 32)
    mask = torch.tensor([[True] * 3 + [False] * 4, [False] * 7])
    outs = []
    for backend in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION):
        with sdpa_kernel(backend), torch.no_grad():
            outs.append(blk(x, ctx=ctx, ctx_mask=mask))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ctx_dim,self_attn", [(None, True), (32, True), (32, False)])
def test_weights_of_the_conv_layout_still_load(ctx_dim, self_attn):
    """A state dict of the earlier 1x1-conv layout (q [C,C,1,1], kv [2C,C,1,1], proj [C,C,1,1])
    loads into the block and gives the same outputs as the block it was taken from."""
    torch.manual_seed(0)
    a = AttentionBlock(64, 16, ctx_dim, self_attn)
    torch.nn.init.normal_(a.proj.weight)
    sd = {k: v.clone() for k, v in a.state_dict().items()}
    if self_attn:
        w, bias = sd.pop("qkv.weight"), sd.pop("qkv.bias")
        sd.update({"q.weight": w[:64, :, None, None], "q.bias": bias[:64],
                   "kv.weight": w[64:, :, None, None], "kv.bias": bias[64:]})
    else:
        sd["q.weight"] = sd["q.weight"][:, :, None, None]
    sd["proj.weight"] = sd["proj.weight"][:, :, None, None]
    b = AttentionBlock(64, 16, ctx_dim, self_attn)
    b.load_state_dict(sd)
    x = torch.randn(2, 64, 8, 8)
    kw = {} if ctx_dim is None else {"ctx": torch.randn(2, 5, 32), "ctx_mask": torch.arange(5).expand(2, 5) < 3}
    with torch.no_grad():
        torch.testing.assert_close(b(x, **kw), a(x, **kw))


# ----------------------------------------------------------------------------- FLOPs
def _fwd_bwd(module, *args, **kw):
    def step():
        out = module(*args, **kw)
        out.float().square().mean().backward()
    return step


@pytest.mark.parametrize("kind", ["self", "self+masked-cross", "cross-only", "prior-block"])
def test_attention_flops_equal_on_math_and_fused_kernels(kind):
    """Forward + backward of an attention block counts the same FLOPs on the math kernel and the
    fused one; torch's counter alone would miss the fused CPU kernel's attention matmuls."""
    torch.manual_seed(0)
    x = torch.randn(2, 64, 8, 8, requires_grad=True)
    ctx, mask = torch.randn(2, 9, 32), torch.arange(9)[None] < torch.tensor([[3], [9]])
    if kind == "prior-block":
        blk, x = Block(128, 32, 4.0, 0.0), torch.randn(2, 12, 128, requires_grad=True)
        args = (x, PriorTransformer._mask(torch.arange(12)[None] < torch.tensor([[5], [12]]))[:, None])
        kw = {}
    else:
        blk = AttentionBlock(64, 32, None if kind == "self" else 32, kind != "cross-only")
        args, kw = (x,), ({} if kind == "self" else {"ctx": ctx, "ctx_mask": mask})
    step = _fwd_bwd(blk, *args, **kw)
    with sdpa_kernel(SDPBackend.MATH):
        math = count_flops(step)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        fused = count_flops(step)
        plain = FlopCounterMode(display=False)
        with plain:
            step()
    assert math == fused
    assert plain.get_total_flops() < fused        # the fused CPU kernel needs our formula


def test_demo_network_flops_equal_on_math_and_fused_kernels():
    torch.manual_seed(0)
    net = build_network("base", "demo", SMALL_DIMS)
    kw = _inputs("base", "demo", SMALL_DIMS, 1, "cpu", 32, True)
    step = lambda: _forward(net, kw).square().mean().backward()  # noqa: E731
    with sdpa_kernel(SDPBackend.MATH):
        math = count_flops(step)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        assert count_flops(step) == math


def test_cuda_kernel_flops_equal_math_kernel_flops():
    """The CUDA kernels (flash, memory-efficient, cuDNN) have meta implementations: called
    directly on meta tensors under the counter they count what the math kernel counts on the
    CPU at the same shapes, forward and backward (torch's own backward formulas would add the
    recomputed scores)."""
    aten = torch.ops.aten
    b, h, lq, s, d = 2, 4, 64, 70, 32
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for n in (lq, s, s))
    bias = torch.zeros(b, 1, lq, s)

    def count(fn):
        c = FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOP_FORMULAS)
        with c:
            fn()
        return c.get_total_flops()

    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        math_fwd = count(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias))
        math_bwd = count(lambda: out.sum().backward())
    assert math_fwd == attention_forward_flops(q.shape, k.shape, v.shape) and math_bwd == 2 * math_fwd

    m = dict(device="meta", dtype=torch.bfloat16)
    mq, mk, mv, mo = (torch.empty(b, h, n, d, **m) for n in (lq, s, s, lq))
    mb, lse = torch.empty(b, 1, lq, s, **m), torch.empty(b, h, lq, device="meta")
    seed = torch.empty((), device="meta", dtype=torch.int64)
    kernels = {
        "_scaled_dot_product_flash_attention": (
            lambda: aten._scaled_dot_product_flash_attention(mq, mk, mv),
            lambda: aten._scaled_dot_product_flash_attention_backward(
                mo, mq, mk, mv, mo, lse, seed, seed, lq, s, 0.0, False, seed, seed)),
        "_scaled_dot_product_efficient_attention": (
            lambda: aten._scaled_dot_product_efficient_attention(mq, mk, mv, mb, True),
            lambda: aten._scaled_dot_product_efficient_attention_backward(
                mo, mq, mk, mv, mb, mo, lse, seed, seed, 0.0, [True, True, True, False])),
        "_scaled_dot_product_cudnn_attention": (
            lambda: aten._scaled_dot_product_cudnn_attention(mq, mk, mv, mb, True),
            lambda: aten._scaled_dot_product_cudnn_attention_backward(
                mo, mq, mk, mv, mo, lse, seed, seed, mb, seed, seed, lq, s, 0.0, False)),
        "_scaled_dot_product_flash_attention_for_cpu": (
            lambda: aten._scaled_dot_product_flash_attention_for_cpu(mq, mk, mv),
            lambda: aten._scaled_dot_product_flash_attention_for_cpu_backward(
                mo, mq, mk, mv, mo, lse, 0.0, False)),
    }
    for name, (fwd, bwd) in kernels.items():
        assert getattr(aten, name) in ATTENTION_FLOP_FORMULAS, name
        assert (count(fwd), count(bwd)) == (math_fwd, math_bwd), name
