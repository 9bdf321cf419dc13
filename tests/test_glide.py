"""GLIDE: the text transformer (shapes, masks, null conditioning), the GLIDE model around the UNet,
the joint training step, token ids in the embedding shards, the glide cascade and its spec."""
from __future__ import annotations

import pytest
import torch

from stages.nets import build_network
from stages.nets.text_transformer import TextTransformer, TextTransformerConfig

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
