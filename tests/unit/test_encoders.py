"""Encoders: tiny CLIP/T5 built offline, saved, reloaded through the real loaders."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from pydantic import ValidationError

from data_prep.encoders import ClipConfig, T5Config, clip_preprocess_cfg, load_clip, load_t5
from data_prep.tiny_encoders import ensure_tiny_encoders

CAPTIONS = ["a red circle", "two blue squares on a green background near a big tree", "x",
            "a photo of a small yellow star in the dark night sky above the sea"]


@pytest.fixture(scope="module")
def tiny_root(tiny_encoders):
    """The session's tiny encoders: built once by ensure_tiny_encoders (tests/support/runs.py)."""
    return tiny_encoders


@pytest.fixture(scope="module")
def clip(tiny_root):
    return load_clip(ClipConfig(model=f"tiny:{tiny_root}"), device="cpu")


@pytest.fixture(scope="module")
def t5(tiny_root):
    return load_t5(T5Config(model=f"tiny:{tiny_root}", max_length=32), device="cpu")


def test_tiny_build_is_idempotent_and_loads_from_plain_dirs(tiny_root, clip, t5):
    clip_dir, t5_dir = ensure_tiny_encoders(tiny_root)
    before = {p: os.stat(os.path.join(d, p)).st_mtime_ns for d in (clip_dir, t5_dir) for p in os.listdir(d)}
    assert ensure_tiny_encoders(tiny_root) == (clip_dir, t5_dir)
    after = {p: os.stat(os.path.join(d, p)).st_mtime_ns for d in (clip_dir, t5_dir) for p in os.listdir(d)}
    assert before == after  # not rebuilt
    assert {"open_clip_config.json", "open_clip_model.safetensors"} <= set(os.listdir(clip_dir))
    assert {"config.json", "tokenizer.json"} <= set(os.listdir(t5_dir))
    # The same directories as plain local paths (what a real saved model looks like).
    c2, t2 = load_clip(ClipConfig(model=clip_dir), device="cpu"), load_t5(T5Config(model=t5_dir), device="cpu")
    for a, b in zip(c2.model.state_dict().values(), clip.model.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(t2.model.shared.weight, t5.model.shared.weight)
    assert (clip.dim, clip.token_dim, t5.dim) == (32, 64, 32)
    assert clip.model.visual.conv1.weight.dtype == torch.float32  # fp32 on CPU


def test_fresh_build_same_seed_same_weights(tmp_path, tiny_root, clip, t5):
    # Every worker (and a later `t2i sample` on another machine) rebuilding 'tiny:' gets the same encoders.
    clip_dir, t5_dir = ensure_tiny_encoders(tmp_path)
    again = load_clip(ClipConfig(model=clip_dir), device="cpu")
    assert torch.equal(again.model.token_embedding.weight, clip.model.token_embedding.weight)
    t5_again = load_t5(T5Config(model=t5_dir, max_length=32), device="cpu")
    assert (open(os.path.join(t5_dir, "tokenizer.json")).read()
            == open(os.path.join(tiny_root, "tiny-t5", "tokenizer.json")).read())
    for a, b in zip(t5_again.model.state_dict().values(), t5.model.state_dict().values()):
        assert torch.equal(a, b)


def test_preprocess_comes_from_model_config(tiny_root, clip):
    pp = clip_preprocess_cfg(ClipConfig(model=f"tiny:{tiny_root}"))
    assert pp == clip.preprocess_cfg and pp["size"] == [32, 32]
    assert clip_preprocess_cfg(ClipConfig(model=f"tiny:{tiny_root}"), image_size=48)["size"] == [48, 48]
    big = clip_preprocess_cfg(ClipConfig(model="ViT-L-14", pretrained=None))  # no weights needed
    assert big["size"] == [224, 224] and len(big["mean"]) == 3


def test_clip_text_matches_open_clip_and_tokens_trimmed(clip):
    pooled, toks, lengths = clip.encode_text(CAPTIONS)
    ids = clip.tokenizer(CAPTIONS)
    ref = clip.model.encode_text(ids, normalize=True)  # open_clip's own full-context pass
    torch.testing.assert_close(pooled, ref, atol=1e-5, rtol=1e-5)
    eot = clip.tokenizer.eot_token_id
    for i, c in enumerate(CAPTIONS):
        assert int(lengths[i]) == int((ids[i] == eot).nonzero()[0]) + 1  # up to and including EOT
        assert toks[i].shape == (int(lengths[i]), clip.token_dim)
    # Per-token features equal the full 77-position pass (causal mask: padding is never seen).
    m = clip.model
    with torch.no_grad():
        x = m.token_embedding(ids) + m.positional_embedding
        full = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))
    for i in range(len(CAPTIONS)):
        torch.testing.assert_close(toks[i], full[i, : int(lengths[i])], atol=1e-5, rtol=1e-5)


def test_clip_image_deterministic_and_normalised(clip):
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a, b = clip.encode_image(x), clip.encode_image(x.clone())
    assert torch.equal(a, b)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(3))


def test_t5_trimmed_to_tokenizer_length_and_bucketing_exact(t5):
    hs, lengths = t5.encode(CAPTIONS, micro_batch=2)
    ids = [t5.tokenizer(c, truncation=True, max_length=32)["input_ids"] for c in CAPTIONS]
    real = [len(x) for x in ids]
    assert all(x[-1] == t5.tokenizer.eos_token_id for x in ids)
    assert lengths.tolist() == real and all(h.shape == (n, t5.dim) for h, n in zip(hs, real))
    padded, mask = t5.encode_padded(CAPTIONS)  # one batch padded to its longest caption
    assert padded.shape[1] == max(real) and mask.sum(1).tolist() == real
    for i, n in enumerate(real):
        torch.testing.assert_close(hs[i], padded[i, :n], atol=1e-5, rtol=1e-5)
    hs2, _ = t5.encode(CAPTIONS, micro_batch=2)
    assert all(torch.equal(a, b) for a, b in zip(hs, hs2))
    long = " ".join(["red circle"] * 50)
    assert t5.encode([long])[1].tolist() == [32]  # truncated to max_length
    assert t5.tokenizer(long, truncation=True, max_length=32)["input_ids"][-1] == t5.tokenizer.eos_token_id


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ValidationError, match="not an open_clip architecture"):
        ClipConfig(model="ViT-Q-99")
    with pytest.raises(ValidationError, match="not a known tag"):
        ClipConfig(model="ViT-L-14", pretrained="no-such-tag")
    assert ClipConfig(model="ViT-L-14", pretrained="openai").pretrained == "openai"
    with pytest.raises(ValidationError, match="tiny:"):
        T5Config(model="tiny:")
    with pytest.raises(ValidationError, match="max_length"):
        T5Config(model="google/t5-v1_1-xxl", max_length=1024)
    with pytest.raises(ValidationError):
        ClipConfig(model="ViT-B-32", bogus=1)
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        load_clip(ClipConfig(model=str(tmp_path)), device="cpu")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_t5(T5Config(model=str(tmp_path)), device="cpu")


def test_tiny_clip_is_trained_on_the_demo_corpus(clip):
    # Held-out demo prompts (never trained on) against renders of them: the trained tiny CLIP
    # pairs each image with a caption of its colour and position, as the unCLIP path needs; a
    # random CLIP does this at chance (1/8 colour, 1/9 position).
    import io

    import numpy as np
    from PIL import Image

    from data_prep import demo_corpus
    from data_prep.image_decode import preprocess_image

    held = demo_corpus.check_attrs()
    pix = []
    for i, a in enumerate(held):
        buf = io.BytesIO()
        demo_corpus.render(a, 128, np.random.default_rng(i)).save(buf, format="JPEG", quality=95)
        pix.append(preprocess_image(buf.getvalue(), clip.preprocess_cfg))
    img = clip.encode_image(torch.from_numpy(np.stack(pix)))
    txt, _, _ = clip.encode_text([demo_corpus.caption_of(a) for a in held])
    best = (img @ txt.T).argmax(1).tolist()
    colour = np.mean([held[b].color == a.color for b, a in zip(best, held)])
    position = np.mean([held[b].position == a.position for b, a in zip(best, held)])
    assert colour >= 0.9 and position >= 0.6, (colour, position)
