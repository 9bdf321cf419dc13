"""Networks at debug size: shapes, gradient flow, conditioning semantics, checkpointing, numerics,
and a real learning check (a tiny UNet overfits a handful of images)."""
import pytest
import torch

from stages.diffusion import Diffusion
from stages.nets import PriorConfig, PriorTransformer, UNetConfig, build_network, get_flavor


pytestmark = pytest.mark.usefixtures("single_thread_torch")

COND = {"t5_dim": 24, "clip_dim": 16, "clip_token_dim": 12}
ROLES = ("prior", "decoder", "base", "sr256", "sr1024")


def make_inputs(role, b=4, seed=0):
    """A batch for the role's debug flavor; rows have different real text lengths."""
    g = torch.Generator().manual_seed(seed)
    f = get_flavor(role, "debug")
    lengths = torch.tensor([5, 3, 1, 4][:b])
    mask = torch.arange(5)[None] < lengths[:, None]
    if f.kind == "prior":
        x = torch.randn(b, COND["clip_dim"], generator=g)
        kw = dict(text_tokens=torch.randn(b, 5, COND["clip_token_dim"], generator=g), text_mask=mask,
                  text_embed=torch.randn(b, COND["clip_dim"], generator=g))
    else:
        x = torch.randn(b, 3, f.image_size, f.image_size, generator=g)
        tdim = COND["clip_token_dim"] if role == "decoder" else COND["t5_dim"]
        kw = dict(text_tokens=torch.randn(b, 5, tdim, generator=g), text_mask=mask)
        if role == "decoder":
            kw["image_embed"] = torch.randn(b, COND["clip_dim"], generator=g)
        if f.low_res_size:
            kw["low_res"] = torch.randn(b, 3, f.low_res_size, f.low_res_size, generator=g)
            kw["aug_level"] = torch.rand(b, generator=g)
    return x, torch.rand(b, generator=g), kw


def perturb_(net, seed=0, scale=0.05):
    """Zero-initialised output layers make a fresh net output 0 and give every upstream weight a
    zero gradient; a small perturbation makes conditioning effects and gradients observable."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return net


def drop_flags(role, b):
    flags = {"drop_text": torch.tensor([True, False] * (b // 2))}
    if role == "decoder":
        flags["drop_image"] = torch.tensor([False, True] * (b // 2))
    return flags


@pytest.mark.parametrize("role", ROLES)
def test_shapes_and_every_parameter_gets_a_gradient(role):
    torch.manual_seed(0)
    net = perturb_(build_network(role, "debug", COND))
    x, t, kw = make_inputs(role)
    out = net(x, t, **kw, **drop_flags(role, 4))
    assert out.shape == x.shape and out.dtype == x.dtype
    out.pow(2).mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"
    assert any("null" in n for n, _ in net.named_parameters())


@pytest.mark.parametrize("role", ROLES)
def test_null_conditioning_changes_outputs_and_is_per_example(role):
    net = perturb_(build_network(role, "debug", COND)).eval()
    x, t, kw = make_inputs(role)
    with torch.no_grad():
        cond = net(x, t, **kw)
        drop = torch.tensor([True, False, True, False])
        keys = ("drop_text",) + (("drop_image",) if role == "decoder" else ())
        mixed = net(x, t, **kw, **{k: drop for k in keys})
    assert not torch.allclose(mixed[drop], cond[drop], atol=1e-5)      # dropped rows change
    torch.testing.assert_close(mixed[~drop], cond[~drop])              # kept rows untouched


@pytest.mark.parametrize("role", ROLES)
def test_padded_text_tokens_are_ignored(role):
    net = perturb_(build_network(role, "debug", COND)).eval()
    x, t, kw = make_inputs(role)
    tok = kw["text_tokens"].clone()
    tok[~kw["text_mask"]] = 100.0                    # garbage in padding
    with torch.no_grad():
        ref = net(x, t, **kw)
        padded = net(x, t, **{**kw, "text_tokens": tok})
        tok2 = kw["text_tokens"].clone()
        tok2[:, 0] += 1.0                             # a real token changes
        changed = net(x, t, **{**kw, "text_tokens": tok2})
    torch.testing.assert_close(padded, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(changed, ref, atol=1e-5)


def test_sr_unet_uses_low_res_and_aug_level_and_accepts_both_sizes():
    net = perturb_(build_network("sr256", "debug", COND)).eval()
    x, t, kw = make_inputs("sr256")
    with torch.no_grad():
        ref = net(x, t, **kw)
        assert not torch.allclose(net(x, t, **{**kw, "low_res": kw["low_res"] + 0.5}), ref)
        assert not torch.allclose(net(x, t, **{**kw, "aug_level": kw["aug_level"] + 0.3}), ref)
        up = torch.nn.functional.interpolate(kw["low_res"], size=x.shape[-2:], mode="bilinear",
                                             align_corners=False)
        torch.testing.assert_close(net(x, t, **{**kw, "low_res": up}), ref)
    with pytest.raises(ValueError, match="low_res is required"):
        net(x, t, **{k: v for k, v in kw.items() if k != "low_res"})


@pytest.mark.parametrize("role", ["base", "prior"])
def test_gradient_checkpointing_gives_the_same_gradients(role):
    x, t, kw = make_inputs(role)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        net = perturb_(build_network(role, "debug", COND, gradient_checkpointing=ckpt))
        assert net.gradient_checkpointing is ckpt
        net(x, t, **kw, drop_text=torch.tensor([True, False, False, True])).pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5, msg=n)


def test_channels_last_and_bf16():
    net = perturb_(build_network("decoder", "debug", COND)).eval()
    x, t, kw = make_inputs("decoder")
    with torch.no_grad():
        ref = net(x, t, **kw)
        cl = net.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t, **kw)
        torch.testing.assert_close(cl, ref, atol=1e-5, rtol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            amp = net(x, t, **kw)
        net16 = net.to(torch.bfloat16)                # pure-bf16 weights (DeepSpeed bf16 mode)
        pure = net16(x.bfloat16(), t, **{k: (v.bfloat16() if v.is_floating_point() else v)
                                           for k, v in kw.items()})
    for out in (amp, pure):
        assert torch.isfinite(out.float()).all()
        rel = (out.float() - ref).norm() / ref.norm()
        assert rel < 0.1, f"bf16 output deviates by {rel:.3f}"


@pytest.mark.parametrize("role", ["prior", "decoder", "sr1024"])
def test_guided_sampling_runs_end_to_end(role):
    """Real networks through Diffusion.sample with guidance: the prior (x0, no thresholding, no
    drop_image argument), the decoder (two null flags) and an SR model (low_res + aug_level)."""
    net = perturb_(build_network(role, "debug", COND)).eval()
    x, _, kw = make_inputs(role, b=2)
    diff = (Diffusion("cosine", "x0", thresholding="none") if role == "prior"
            else Diffusion("cosine", "v", thresholding="dynamic"))
    out = diff.sample(net, x.shape, kw, sampler="dpmpp_2m", steps=3, guidance_scale=4.0,
                      generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.isfinite(out).all()
    if role != "prior":
        assert out.abs().max() <= 1.0 + 1e-5


def test_bad_inputs_name_the_argument():
    net = build_network("decoder", "debug", COND)
    x, t, kw = make_inputs("decoder")
    with pytest.raises(ValueError, match="text_tokens"):
        net(x, t, **{**kw, "text_tokens": torch.zeros(4, 5, 99)})
    with pytest.raises(ValueError, match="image_embed is required"):
        net(x, t, **{k: v for k, v in kw.items() if k != "image_embed"})
    with pytest.raises(ValueError, match="drop_text"):
        net(x, t, **kw, drop_text=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="t must be"):
        net(x, t[:2], **kw)
    # fully unconditional call: allowed when every sample drops its conditioning
    out = net(x, t, drop_text=True, drop_image=True)
    assert out.shape == x.shape
    prior = PriorTransformer(PriorConfig(clip_dim=16, text_token_dim=12, width=32, depth=1,
                                         head_dim=16, max_text_len=4))
    px, pt, pkw = make_inputs("prior")
    with pytest.raises(ValueError, match="max_text_len"):
        prior(px, pt, **pkw)
    with pytest.raises(ValueError, match="num_res_blocks"):
        UNetConfig(channel_mults=(1, 2), num_res_blocks=(1, 1, 1))
    with pytest.raises(ValueError, match="image_size"):
        UNetConfig(image_size=30, channel_mults=(1, 2, 2), num_res_blocks=1)


def _toy_images(size=16):
    """Four images with distinct colours and shapes."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    cols = torch.tensor([[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1.0]])
    masks = [xx < size // 2, yy < size // 2,
             (xx - size / 2) ** 2 + (yy - size / 2) ** 2 < (size / 3) ** 2, xx > yy]
    out = torch.full((4, 3, size, size), -1.0)
    for i, m in enumerate(masks):
        out[i] = torch.where(m[None], cols[i][:, None, None], out[i])
    return out


def test_tiny_unet_overfits_a_handful_of_images():
    torch.manual_seed(0)
    x = _toy_images()
    net = build_network("base", "debug", COND, text_dim=None)
    diff = Diffusion("cosine", "eps")
    g = torch.Generator().manual_seed(1)
    # fixed evaluation set: the same (t, noise) pairs before and after training
    xe = x.repeat(8, 1, 1, 1)
    te, ne = torch.rand(32, generator=g) * 0.9 + 0.05, torch.randn(xe.shape, generator=g)

    def eval_loss():
        net.eval()
        with torch.no_grad():
            loss, _ = diff.training_loss(net, xe, {}, t=te, noise=ne)
        net.train()
        return loss.item()

    before = eval_loss()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(80):
        loss, _ = diff.training_loss(net, x.repeat(4, 1, 1, 1), {})
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < before / 5, f"eval loss {before:.3f} -> {after:.3f}: the UNet did not learn"


def test_coord_channels_give_the_unet_absolute_position():
    """CoordConv: far from the borders a plain UNet cannot tell two places of a constant image
    apart (its only position signal is the zero padding); with coord_channels it can."""
    import torch

    from stages.nets.unet import UNet, UNetConfig

    kw = dict(image_size=64, base_channels=8, channel_mults=(1, 2), num_res_blocks=(1, 1), attn_resolutions=(),
              head_dim=8, context_dim=16)
    outs = {}
    for coord in (False, True):
        torch.manual_seed(0)
        net = UNet(UNetConfig(**kw, coord_channels=coord)).eval()
        for p in net.parameters():  # guided-diffusion zero-inits the output: perturb to see the map
            p.data.add_(0.05 * torch.randn_like(p))
        with torch.no_grad():
            outs[coord] = net(torch.zeros(1, 3, 64, 64), torch.tensor([0.5]))[0, 0]
        assert outs[coord].shape == (64, 64)
    assert torch.allclose(outs[False][28, 28], outs[False][36, 36], atol=1e-6), "plain: translation invariant inside"
    assert not torch.allclose(outs[True][28, 28], outs[True][36, 36], atol=1e-4), "coord channels: position known"
