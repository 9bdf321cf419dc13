"""Flavors: registry, validation, and paper-scale parameter counts on the meta device."""
import subprocess
import sys

import pytest
import torch
from accelerate import init_empty_weights

from stages.nets import PriorTransformer, UNet, build_network, get_flavor, list_flavors
from stages.nets.flavors import PAPER_COND_DIMS, ROLES, count_params
from tests.support.specs import REPO

PAPER = {"prior": "prior-1b", "decoder": "decoder-3.5b", "base": "base64-2b",
         "sr256": "sr256-600m", "sr1024": "sr1024-400m", "glide": "glide-3.5b",
         "noised_clip": "noised-clip-86m"}
KIND = {"prior": "prior", "glide": "glide", "noised_clip": "noised_clip"}  # every other role is a plain UNet


def test_every_role_has_debug_demo_and_its_paper_flavor():
    have = {(f.role, f.name) for f in list_flavors()}
    for role in ROLES:
        assert {(role, "debug"), (role, "demo"), (role, PAPER[role])} <= have


@pytest.mark.parametrize("role", ROLES)
def test_paper_flavor_param_count_within_10_percent(role):
    f = get_flavor(role, PAPER[role])
    n = count_params(role, f.name)                    # meta device, paper cond dims
    assert abs(n - f.target_params) <= 0.10 * f.target_params, \
        f"{role}/{f.name}: {n / 1e6:.0f}M params vs target {f.target_params / 1e6:.0f}M"
    # accelerate's init_empty_weights (what per-GPU memory estimates use) agrees
    with init_empty_weights():
        net = build_network(role, f.name, PAPER_COND_DIMS)
    assert sum(p.numel() for p in net.parameters()) == n
    assert all(p.device.type == "meta" for p in net.parameters())


def test_flavor_records_sizes_and_kind():
    for f in list_flavors():
        assert f.kind == KIND.get(f.role, "unet")
        if f.kind in ("unet", "glide"):
            cfg = f.config() if f.kind == "unet" else f.config().unet
            assert cfg.image_size == f.image_size
            assert (cfg.low_res_channels > 0) == f.role.startswith("sr")
            if f.role.startswith("sr"):
                assert f.low_res_size and f.image_size % f.low_res_size == 0
            else:
                assert f.low_res_size is None
        assert (f.target_params is not None) == (f.name == PAPER[f.role])
    assert get_flavor("base", "demo").image_size == 16
    assert (get_flavor("sr256", "demo").low_res_size, get_flavor("sr256", "demo").image_size) == (16, 64)


def test_demo_flavors_stay_cpu_sized():
    for role in ROLES:
        n = count_params(role, "demo", {"t5_dim": 64, "clip_dim": 64, "clip_token_dim": 64})
        if role == "glide":  # the CLIP BPE token table (49408 rows) is a lookup, not per-step compute
            cfg = get_flavor(role, "demo").config().text
            n -= cfg.vocab_size * cfg.width
        assert 2e5 < n < 3e6, f"{role}/demo has {n} params"


def test_glide_paper_flavor_splits_like_glide():
    """GLIDE: UNet ~2.3B + text transformer ~1.2B of 24 residual blocks of width 2048."""
    with torch.device("meta"):
        net = build_network("glide", "glide-3.5b")
    text = sum(p.numel() for p in net.text.parameters())
    unet = sum(p.numel() for p in net.unet.parameters())
    assert (net.cfg.text.layers, net.cfg.text.width) == (24, 2048)
    assert abs(text - 1.2e9) <= 0.10 * 1.2e9 and abs(unet - 2.3e9) <= 0.10 * 2.3e9, (text, unet)


def test_build_network_uses_cond_dims_and_overrides():
    dims = {"t5_dim": 24, "clip_dim": 16, "clip_token_dim": 12}
    base = build_network("base", "debug", dims, gradient_checkpointing=True, dropout=0.1)
    assert isinstance(base, UNet) and base.cfg.text_dim == 24 and base.gradient_checkpointing
    dec = build_network("decoder", "debug", dims)
    assert dec.cfg.text_dim == 12 and dec.cfg.image_embed_dim == 16
    prior = build_network("prior", "debug", dims)
    assert isinstance(prior, PriorTransformer) and prior.cfg.clip_dim == 16
    assert prior(torch.zeros(2, 16), torch.rand(2), text_tokens=torch.zeros(2, 3, 12),
                 text_mask=None, text_embed=torch.zeros(2, 16)).shape == (2, 16)


def test_unknown_names_and_bad_arguments_say_what_is_allowed():
    with pytest.raises(ValueError, match="prior, decoder, base, sr256, sr1024"):
        get_flavor("upsampler", "debug")
    with pytest.raises(ValueError, match="debug, demo, base64-2b"):
        get_flavor("base", "huge")
    with pytest.raises(ValueError, match="missing \\['clip_token_dim'\\]"):
        build_network("base", "debug", {"t5_dim": 8, "clip_dim": 8})
    with pytest.raises(ValueError, match="allowed fields"):
        build_network("base", "debug", None, widht=3)


def test_model_code_imports_no_distributed_or_storage_libraries():
    """docs/design.md invariant 1, checked in a fresh interpreter (this one may have them loaded)."""
    code = ("import sys, stages.diffusion, stages.condaug, stages.nets; "
            "bad = [m for m in ('ray', 'deepspeed', 'torch.distributed.fsdp', 'fsspec', 'boto3', "
            "'botocore', 's3fs') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_model_sources_have_no_forbidden_imports():
    import re

    root = REPO / "stages"
    files = [root / "diffusion.py", root / "condaug.py", *sorted((root / "nets").glob("*.py"))]
    pat = re.compile(r"^\s*(from|import)\s+(ray|deepspeed|torch\.distributed|fsspec|boto3?|botocore|s3fs)\b", re.M)
    offenders = [f.name for f in files if pat.search(f.read_text())]
    assert not offenders, f"forbidden imports in {offenders}"
