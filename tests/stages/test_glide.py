"""GLIDE: the text transformer (shapes, masks, null conditioning), the GLIDE model around the UNet,
the joint training step, token ids in the embedding shards, the glide cascade and its spec."""
from __future__ import annotations

import pytest
import torch

from stages.nets import build_network
from stages.nets.text_transformer import TextTransformer, TextTransformerConfig
from tests.support.specs import smoke_spec
from tests.support.train import loader_batch

DIMS = {"t5_dim": 24, "clip_dim": 16, "clip_token_dim": 12}


def _tt(**kw) -> TextTransformer:
    torch.manual_seed(0)
    return TextTransformer(TextTransformerConfig(**{"vocab_size": 50, "text_ctx": 8, "width": 32, "layers": 2,
                                                     "head_dim": 16, **kw})).eval()


def test_text_transformer_shapes_and_final_slot():
    tt = _tt()
    ids = torch.randint(0, 50, (3, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    tokens, valid, final = tt(ids, mask)
    assert tokens.shape == (3, 6, 32) and final.shape == (3, 32)
    assert torch.equal(valid, torch.cat([mask, torch.ones(3, 1, dtype=torch.bool)], 1))  # the final slot is always valid
    assert torch.equal(final, tokens[:, -1])
    # longer than the context: cut to text_ctx caption tokens (+ the final slot)
    assert tt(torch.randint(0, 50, (1, 20)))[0].shape == (1, 9, 32)
    with pytest.raises(ValueError, match="integer"):
        tt(torch.zeros(1, 3))


def test_padding_never_changes_the_caption_features():
    """Masked keys: a caption's features are the same whatever the batch is padded to or holds there."""
    tt = _tt()
    ids = torch.tensor([[5, 6, 7]])
    short = tt(ids, torch.ones(1, 3, dtype=torch.bool))
    padded_ids = torch.tensor([[5, 6, 7, 42, 13]])
    long = tt(padded_ids, torch.tensor([[1, 1, 1, 0, 0]], dtype=torch.bool))
    assert torch.allclose(short[2], long[2], atol=1e-5)
    assert torch.allclose(short[0][:, :3], long[0][:, :3], atol=1e-5)
    # ...but the tokens themselves matter
    other = tt(torch.tensor([[5, 6, 8]]), None)
    assert not torch.allclose(short[2], other[2], atol=1e-4)


def test_null_conditioning_is_the_empty_sequence():
    """CFG drop (GLIDE: 20% of captions -> empty sequence): a dropped row equals an explicitly empty one,
    whatever its ids were, and differs from the conditional row."""
    torch.manual_seed(0)
    net = build_network("glide", "debug", DIMS).eval()
    ids = torch.randint(0, 100, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    tok_d, valid_d, y_d = net.encode_text(ids, mask, drop_text=torch.tensor([True, False]))
    tok_e, valid_e, y_e = net.encode_text(torch.randint(0, 100, (1, 6)), torch.zeros(1, 6, dtype=torch.bool))
    assert torch.allclose(y_d[0], y_e[0], atol=1e-5) and torch.equal(valid_d[0], valid_e[0])
    assert valid_d[0].sum() == 1 and valid_d[1].sum() == 7
    _, _, y_c = net.encode_text(ids, mask)
    assert torch.allclose(y_c[1], y_d[1], atol=1e-5) and not torch.allclose(y_c[0], y_d[0], atol=1e-4)
    # the whole network: guided sampling's unconditional branch is the same call with drop_text=True
    x, t = torch.randn(2, 3, 16, 16), torch.full((2,), 0.5)
    out_drop = net(x, t, clip_ids=ids, clip_id_mask=mask, drop_text=True)
    out_empty = net(x, t, clip_ids=ids, clip_id_mask=torch.zeros_like(mask))
    assert out_drop.shape == x.shape and torch.allclose(out_drop, out_empty, atol=1e-5)


def test_glide_model_reads_the_ids_its_tokenizer_names():
    net = build_network("glide", "debug", DIMS).eval()
    x, t = torch.randn(1, 3, 16, 16), torch.rand(1)
    with pytest.raises(ValueError, match="clip_ids is required"):
        net(x, t, t5_ids=torch.zeros(1, 3, dtype=torch.long))
    # the final token reaches the time embedding: changing only the class embedding changes the output
    ids = torch.randint(0, 100, (1, 4))
    tokens, valid, y = net.encode_text(ids, None)
    with torch.no_grad():  # zero-initialised residual branches ignore the embedding at step 0: randomise them
        for p in net.unet.parameters():
            p.normal_(0.0, 0.1)
    a = net.unet(x, t, text_tokens=tokens, text_mask=valid, class_embed=y)
    b = net.unet(x, t, text_tokens=tokens, text_mask=valid, class_embed=y + 1.0)
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="class_embed must be"):
        net.unet(x, t, text_tokens=tokens, text_mask=valid, class_embed=y[:, :3])


# ----------------------------------------------------------------------------- training
def test_build_batch_passes_ids_and_drops_captions():
    from stages.models import glide
    from stages.nets import get_flavor

    flavor, cpu = get_flavor("glide", "debug"), torch.device("cpu")
    cfg = glide.GlideTrainConfig(flavor="debug", cfg_drop_text=1.0)
    x0, cond = glide.build_batch(loader_batch(), cfg, flavor, cpu, torch.float32)
    assert x0.shape == (2, 3, 16, 16) and x0.min() >= -1 and x0.max() <= 1
    assert cond["clip_ids"].dtype == torch.long and cond["drop_text"].all()  # never cast to the compute dtype
    assert set(cond) == {"clip_ids", "clip_id_mask", "drop_text"}
    bad = loader_batch()
    bad["clip_ids"][0, 0] = 10 ** 6
    with pytest.raises(ValueError, match="outside flavor debug's vocabulary"):
        glide.build_batch(bad, cfg, flavor, cpu, torch.float32)
    del bad["clip_ids"]
    with pytest.raises(ValueError, match="re-run of the embed stage"):
        glide.build_batch(bad, cfg, flavor, cpu, torch.float32)
    with pytest.raises(ValueError, match="cfg_drop_text must be within"):
        glide.GlideTrainConfig(cfg_drop_text=1.5)


def test_joint_step_updates_the_text_transformer():
    """One DeepSpeed engine around GlideModel: a step moves the text transformer's weights too."""
    from pipeline.executors import DistEnv
    from stages.models import glide
    from stages.diffusion import Diffusion
    from stages.training.distributed import setup_distributed
    from stages.training.engine import build_engine, train_step
    from stages.nets import get_flavor

    cpu = torch.device("cpu")
    setup_distributed(DistEnv.from_env(), cpu)
    cfg = glide.GlideTrainConfig(flavor="debug", steps=3, batch_size=2, lr=1e-3, warmup_steps=0, cfg_drop_text=0.0)
    torch.manual_seed(0)
    engine, _ = build_engine(cfg, build_network("glide", "debug", DIMS), device=cpu)
    text0 = {n: p.detach().clone() for n, p in engine.module.text.named_parameters()}
    n_opt = sum(p.numel() for grp in engine.optimizer.param_groups for p in grp["params"])
    assert n_opt == sum(p.numel() for p in engine.module.parameters())  # transformer and UNet: one optimizer
    micro = [glide.build_batch(loader_batch(), cfg, get_flavor("glide", "debug"), cpu, torch.float32)]
    diffusion = Diffusion(**cfg.diffusion.model_dump())
    # Zero-initialised residual outputs (attention proj, ResBlock conv2) pass no gradient back to the
    # context or the time embedding until they have moved: the text transformer first moves at step 3.
    for _ in range(3):
        out = train_step(engine, diffusion, micro)
    assert out["finite"]
    moved = [n for n, p in engine.module.text.named_parameters() if not torch.equal(p, text0[n])]
    assert "token_embedding.weight" in moved and any(n.startswith("blocks.") for n in moved)
    assert "final_slot" in moved


# ----------------------------------------------------------------------------- run spec
def test_spec_validates_the_train_glide_section():
    from pipeline.run.spec import SpecError, parse_spec

    debug = {"flavor": "debug", "steps": 4, "batch_size": 4, "loader_workers": 0}
    spec = parse_spec(smoke_spec(train_glide=debug, sample={"cascade": "glide", "steps": 2, "prompts": ["a red circle"]}))
    assert spec.train_glide.cfg_drop_text == 0.2 and spec.train_glide.flavor == "debug"  # GLIDE's 20%
    for section, pattern in [
        ({"flavor": "huge"}, r"train_glide\.flavor: unknown flavor 'huge' for glide; allowed: debug, demo, glide-3\.5b"),
        ({**debug, "flavor": "glide-3.5b"}, r"train_sr256\.flavor: takes 16px input but train_glide \(glide-3\.5b\) makes 64px"),
        ({**debug, "cfg_drop_text": -0.1}, r"train_glide\.cfg_drop_text"),
        ({**debug, "text_layers": 3}, r"train_glide\.text_layers"),
    ]:
        with pytest.raises(SpecError, match=pattern):
            parse_spec(smoke_spec(train_glide=section))
    # sampling the glide cascade needs the stage that trains it
    with pytest.raises(SpecError, match="'glide' samples through train_glide"):
        parse_spec(smoke_spec(train_glide=None, sample={"cascade": "glide", "steps": 2, "prompts": ["a red circle"]}))
    with pytest.raises(SpecError, match="'all' samples through train_glide"):
        parse_spec(smoke_spec(train_glide=None, sample={"cascade": "all", "steps": 2, "prompts": ["a red circle"]}))


def test_final_weights_and_export_rebuild_a_glide_model(tmp_path):
    """load_final / t2i export rebuild GlideModel (text transformer + UNet) from final/config.json alone."""
    from stages.export.model_folder import export_model, load_exported
    from stages.training.final_weights import FinalConfig, load_final, network_config, write_final

    torch.manual_seed(0)
    net = build_network("glide", "debug", DIMS, gradient_checkpointing=True).eval()
    doc = network_config(net)
    assert doc["class"] == "GlideModel"
    assert "gradient_checkpointing" not in doc["config"]["text"]  # training-only switches left out
    folder = write_final(str(tmp_path / "run"), {k: v for k, v in net.state_dict().items()},
                         FinalConfig(role="glide", flavor="debug", cond_dims=DIMS, image_size=16, step=3, diffusion={},
                                     network=doc))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 0.7])
    ids, mask = torch.randint(0, 100, (2, 5)), torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        want = net(x, t, clip_ids=ids, clip_id_mask=mask)
        loaded, _ = load_final(folder)
        assert type(loaded).__name__ == "GlideModel" and not loaded.cfg.text.gradient_checkpointing
        assert torch.equal(loaded(x, t, clip_ids=ids, clip_id_mask=mask), want)
        for fmt in ("diffusers", "folder"):
            exported, _ = load_exported(export_model(folder, str(tmp_path / fmt), fmt=fmt))
            assert torch.equal(exported(x, t, clip_ids=ids, clip_id_mask=mask), want)


# ----------------------------------------------------------------------------- token ids, offline
def test_embed_stores_the_ids_sampling_gives_the_same_caption(tiny_encoders):
    """The ids the embed stage writes for a caption are the ids a prompt gets at sampling (same
    tokenizers, same trimming), for both the CLIP BPE and the T5 SentencePiece tokenizer."""
    import numpy as np

    from data_prep.embed.decode import DecodedChunk
    from data_prep.embed.encode import Encoders, encode_chunk
    from data_prep.encoders import ClipConfig, T5Config, load_clip, load_t5
    from stages.sampling.loading import PromptEncoders

    clip = load_clip(ClipConfig(model=f"tiny:{tiny_encoders}", pretrained=None), device="cpu")
    t5 = load_t5(T5Config(model=f"tiny:{tiny_encoders}", max_length=16), device="cpu")
    caps = ["a large red circle in the center", "blue square", "a tiny green star at the top left"]
    n = len(caps)
    chunk = DecodedChunk(shard="00000", chunk=0, last=True, keys=[f"{i:09d}" for i in range(n)], captions=caps,
                         pixels=np.zeros((n, 3, 32, 32), np.float16), counts={"n_total": n}, columns={})
    part, _ = encode_chunk(Encoders(clip, t5), chunk)
    feats = PromptEncoders(clip, t5).encode(caps)
    for i in range(n):
        for tok, ids, mask in (("clip", feats.clip_ids, feats.clip_id_mask), ("t5", feats.t5_ids, feats.t5_id_mask)):
            stored = part.ids_of(tok, i)
            assert stored.dtype == np.int32 and len(stored) == int(mask[i].sum())
            np.testing.assert_array_equal(stored, ids[i, : int(mask[i].sum())].numpy())
    assert part.ids_of("clip", 0)[-1] == clip.tokenizer.eot_token_id and part.ids_of("t5", 0)[-1] == 1  # EOT / EOS
    # one id per stored token feature: the features' lengths delimit the ids too
    assert len(part.clip_ids) == len(part.clip_tokens) and len(part.t5_ids) == len(part.t5_tokens)


# ----------------------------------------------------------------------------- the smoke run
def test_smoke_run_trains_glide_jointly_and_samples_its_cascade(smoke_run):
    """The shipped smoke spec trains train_glide from the token ids in its embedding shards and
    samples the glide cascade (the fixture's run is shared: this test only reads it)."""
    from safetensors.torch import load as st_load

    from data_prep.embed_format import read_embedding_shard
    from pipeline import layout, store
    from pipeline.manifest import read_manifest

    _, run = smoke_run
    m = read_manifest(layout.finished_stage_dir(run, "train_glide"))
    assert m["counts"]["steps"] == 4 and m["metrics"]["val_loss"] > 0
    weights = st_load(store.read_bytes(m["outputs"]["weights"]))
    init = build_network("glide", "debug", store.read_json(m["outputs"]["config"])["cond_dims"]).state_dict()
    assert not torch.equal(weights["text.token_embedding.weight"], init["text.token_embedding.weight"])
    embed = read_manifest(layout.finished_stage_dir(run, "embed"))
    for npz in store.glob(store.join(embed["outputs"]["shards"], "*.npz")):
        shard = read_embedding_shard(npz)
        assert len(shard.clip_ids) == len(shard.clip_tokens) and len(shard.t5_ids) == len(shard.t5_tokens)
    sample = read_manifest(layout.finished_stage_dir(run, "sample"))
    assert [u for u in store.listdir(sample["outputs"]["dir"]) if "_glide_" in u and u.endswith(".png")]
    assert "glide_demo_n" in sample["metrics"]
