"""The unCLIP decoder's two text encoders (train_decoder.text_encoder): frozen CLIP token features
(clip_tokens, the default) or its own GLIDE text transformer trained jointly (glide, unCLIP §2.1):
flavors, batches, the joint step, the final config, sampling's conditioning and the spec."""
from __future__ import annotations

import pytest
import torch

from stages.nets import build_network, get_flavor
from stages.nets.flavors import count_params
from tests.support.specs import smoke_spec
from tests.support.train import loader_batch

DIMS = {"t5_dim": 24, "clip_dim": 16, "clip_token_dim": 12}


def test_every_decoder_flavor_has_both_text_encoders():
    from stages.nets.text_transformer import GlideModel
    from stages.nets.unet import UNet

    for name in ("debug", "demo", "decoder-3.5b"):
        fl = get_flavor("decoder", name)
        assert fl.variant_names() == ("clip_tokens", "glide")
    with torch.device("meta"):
        assert type(build_network("decoder", "debug", DIMS)) is UNet          # default: clip_tokens
        glide = build_network("decoder", "debug", DIMS, "glide")
    assert type(glide) is GlideModel and glide.cfg.unet.image_embed_dim == DIMS["clip_dim"]
    # the paper's decoder is GLIDE's 3.5B either way (within 10%, on the meta device)
    for variant in ("clip_tokens", "glide"):
        assert abs(count_params("decoder", "decoder-3.5b", variant=variant) / 3.5e9 - 1) < 0.10
    with pytest.raises(ValueError, match=r"decoder/debug has no variant 'bert'; variants: clip_tokens, glide"):
        get_flavor("decoder", "debug").config(DIMS, "bert")
    with pytest.raises(ValueError, match=r"base/debug has no variant 'glide'; variants: none"):
        get_flavor("base", "debug").config(DIMS, "glide")


def test_glide_decoder_reads_ids_and_the_image_embedding():
    """Both the caption (through its transformer) and the image embedding change the output; a
    dropped caption is the empty sequence, a dropped embedding the learned null."""
    torch.manual_seed(0)
    net = build_network("decoder", "debug", DIMS, "glide").eval()
    for p in net.parameters():  # zero-initialised output convs would hide every input
        p.data.add_(0.02 * torch.randn_like(p))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0.4, 0.6])
    b = loader_batch()
    kw = dict(clip_ids=b["clip_ids"], clip_id_mask=b["clip_id_mask"], image_embed=b["clip_image"])
    with torch.no_grad():
        out = net(x, t, **kw)
        other_text = net(x, t, **{**kw, "clip_ids": (b["clip_ids"] + 7) % 1000})
        other_image = net(x, t, **{**kw, "image_embed": -b["clip_image"]})
        dropped = net(x, t, **kw, drop_text=torch.tensor([True, False]), drop_image=torch.tensor([False, True]))
    assert not torch.allclose(out, other_text) and not torch.allclose(out, other_image)
    assert not torch.allclose(dropped[0], out[0]) and not torch.allclose(dropped[1], out[1])


def test_build_batch_follows_the_text_encoder():
    from stages.models import decoder

    fl, cpu = get_flavor("decoder", "debug"), torch.device("cpu")
    x0, cond = decoder.build_batch(loader_batch(), decoder.DecoderTrainConfig(flavor="debug"), fl, cpu, torch.float32)
    assert set(cond) == {"text_tokens", "text_mask", "image_embed", "drop_text", "drop_image"}
    cfg = decoder.DecoderTrainConfig(flavor="debug", text_encoder="glide", cfg_drop_text=1.0)
    x0, cond = decoder.build_batch(loader_batch(), cfg, fl, cpu, torch.float32)
    assert set(cond) == {"clip_ids", "clip_id_mask", "image_embed", "drop_text", "drop_image"}
    assert cond["clip_ids"].dtype == torch.long and cond["drop_text"].all()
    bad = loader_batch()
    del bad["clip_ids"]
    with pytest.raises(ValueError, match="train_decoder: the training batch carries no clip_ids"):
        decoder.build_batch(bad, cfg, fl, cpu, torch.float32)


def test_joint_step_trains_the_decoders_text_transformer():
    """One engine around the glide decoder: its optimizer holds the transformer, a step moves it."""
    from pipeline.executors import DistEnv
    from stages.models import decoder
    from stages.diffusion import Diffusion
    from stages.training.distributed import setup_distributed
    from stages.training.engine import build_engine, train_step

    cpu = torch.device("cpu")
    setup_distributed(DistEnv.from_env(), cpu)
    cfg = decoder.DecoderTrainConfig(flavor="debug", text_encoder="glide", steps=3, batch_size=2, lr=1e-3,
                                     warmup_steps=0, cfg_drop_text=0.0, cfg_drop_image=0.0)
    torch.manual_seed(0)
    engine, _ = build_engine(cfg, build_network("decoder", "debug", DIMS, decoder.SPEC.variant(cfg)), device=cpu)
    text0 = {n: p.detach().clone() for n, p in engine.module.text.named_parameters()}
    micro = [decoder.build_batch(loader_batch(), cfg, get_flavor("decoder", "debug"), cpu, torch.float32)]
    diffusion = Diffusion(**cfg.diffusion.model_dump())
    for _ in range(3):  # zero-initialised residual outputs pass no gradient to the context before step 3
        out = train_step(engine, diffusion, micro)
    assert out["finite"]
    assert "token_embedding.weight" in [n for n, p in engine.module.text.named_parameters()
                                        if not torch.equal(p, text0[n])]


def test_sampling_conditions_the_decoder_its_final_config_describes(tmp_path):
    """sample_cond reads the text encoder from final/config.json: a glide decoder gets token ids,
    a clip_tokens one (and a final written before the option) CLIP token features."""
    from stages.models import decoder
    from stages.training.final_weights import FinalConfig, load_final, network_config, write_final
    from stages.sampling.loading import PromptFeatures

    torch.manual_seed(0)
    net = build_network("decoder", "debug", DIMS, "glide").eval()
    folder = write_final(str(tmp_path / "run"), dict(net.state_dict()),
                         FinalConfig(role="decoder", flavor="debug", cond_dims=DIMS, image_size=16, step=2, diffusion={},
                                     network=network_config(net)))
    loaded, config = load_final(folder)
    assert type(loaded).__name__ == "GlideModel" and decoder.text_encoder_of(config) == "glide"
    b = loader_batch()
    f = PromptFeatures(clip_text=torch.randn(2, 16), clip_tokens=b["clip_tokens"], clip_mask=b["clip_mask"],
                       t5_tokens=torch.randn(2, 3, 24), t5_mask=torch.ones(2, 3, dtype=torch.bool),
                       clip_ids=b["clip_ids"], clip_id_mask=b["clip_id_mask"],
                       t5_ids=b["t5_ids"], t5_id_mask=b["t5_id_mask"])
    prev = b["clip_image"]
    cond = decoder.sample_cond(f, prev, config)
    assert cond["image_embed"] is prev and torch.equal(cond["clip_ids"], b["clip_ids"])
    with torch.no_grad():
        assert loaded(torch.randn(2, 3, 16, 16), torch.tensor([0.5, 0.5]), **cond).shape == (2, 3, 16, 16)
    old = config.model_copy(update={"network": None})
    assert "text_tokens" in decoder.sample_cond(f, prev, old)  # no network entry: clip_tokens
    unet = build_network("decoder", "debug", DIMS)
    assert "text_tokens" in decoder.sample_cond(f, prev, config.model_copy(update={"network": network_config(unet)}))


def test_spec_validates_the_text_encoder_and_keeps_old_decoders_identity():
    """A bad value names the field and the choices; the default hashes like a spec that never named
    it (an upgrade keeps finished decoders), glide starts a new attempt."""
    from pipeline.manifest import fingerprint
    from pipeline.run.spec import SpecError, parse_spec
    from stages.models import decoder

    with pytest.raises(SpecError, match=r"train_decoder\.text_encoder.*'clip_tokens' or 'glide'"):
        parse_spec(smoke_spec(train_decoder={"flavor": "debug", "text_encoder": "bert"}))
    ids = {"embed": "e1"}
    plain = fingerprint("train_decoder", decoder.DecoderTrainConfig(flavor="debug"), ids)
    named = fingerprint("train_decoder", decoder.DecoderTrainConfig(flavor="debug", text_encoder="clip_tokens"), ids)
    glide = fingerprint("train_decoder", decoder.DecoderTrainConfig(flavor="debug", text_encoder="glide"), ids)
    assert plain == named != glide


def test_smoke_run_trains_the_glide_decoder_and_samples_unclip_with_it(smoke_run):
    """The shipped smoke spec's decoder reads its own text transformer (text_encoder: glide, at
    0.1x lr): it trains from the shards' token ids, sampling and evaluation condition it on ids."""
    from safetensors.torch import load as st_load

    from pipeline import layout, store
    from pipeline.manifest import read_manifest

    _, run = smoke_run
    m = read_manifest(layout.finished_stage_dir(run, "train_decoder"))
    config = store.read_json(m["outputs"]["config"])
    assert config["network"]["class"] == "GlideModel" and config["network"]["config"]["unet"]["image_embed_dim"]
    weights = st_load(store.read_bytes(m["outputs"]["weights"]))
    init = build_network("decoder", "debug", config["cond_dims"], "glide").state_dict()
    assert not torch.equal(weights["text.token_embedding.weight"], init["text.token_embedding.weight"])
    sample = read_manifest(layout.finished_stage_dir(run, "sample"))
    assert [u for u in store.listdir(sample["outputs"]["dir"]) if "_unclip_" in u and u.endswith(".png")]
    evaluate = read_manifest(layout.finished_stage_dir(run, "evaluate"))
    import math

    assert all(math.isfinite(evaluate["metrics"][k]) for k in ("unclip_fid", "unclip_clip_score"))
