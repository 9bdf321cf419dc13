"""Embedding shard format: exact round trip, padding helpers, key alignment errors."""
from __future__ import annotations

import numpy as np
import pytest

from data_prep.embed_format import (EmbeddingFormatError, EmbeddingShard, align, read_embedding_shard,
                                    write_embedding_shard)


def _shard(rng: np.random.Generator, keys: list[str], dc=8, dct=6, dt=5) -> EmbeddingShard:
    cl = rng.integers(1, 9, size=len(keys)).astype(np.int32)
    tl = rng.integers(1, 12, size=len(keys)).astype(np.int32)
    f = np.float16
    return EmbeddingShard(keys=np.array(keys), clip_image=rng.standard_normal((len(keys), dc)).astype(f),
                          clip_text=rng.standard_normal((len(keys), dc)).astype(f),
                          clip_tokens=rng.standard_normal((int(cl.sum()), dct)).astype(f), clip_lengths=cl,
                          t5_tokens=rng.standard_normal((int(tl.sum()), dt)).astype(f), t5_lengths=tl)


def test_round_trip_and_padding(tmp_path):
    rng = np.random.default_rng(0)
    keys = [f"00000{i:04d}" for i in range(7)]
    s = _shard(rng, keys)
    uri = str(tmp_path / "00000.npz")
    nbytes = write_embedding_shard(uri, s)
    assert nbytes == (tmp_path / "00000.npz").stat().st_size
    r = read_embedding_shard(uri)
    with np.load(uri, allow_pickle=False) as z:  # loadable without pickle, contract dtypes
        assert z["keys"].dtype.kind == "U" and z["t5_tokens"].dtype == np.float16 and z["t5_lengths"].dtype == np.int32
    for a in ("keys", "clip_image", "clip_text", "clip_tokens", "clip_lengths", "t5_tokens", "t5_lengths"):
        np.testing.assert_array_equal(getattr(r, a), getattr(s, a))
    assert r.dims == {"clip_dim": 8, "clip_token_dim": 6, "t5_dim": 5}

    idx = [4, 0, 6]
    tok, mask = r.padded_t5(idx)
    L = int(s.t5_lengths[idx].max())
    assert tok.shape == (3, L, 5) and mask.shape == (3, L)
    off = np.concatenate([[0], np.cumsum(s.t5_lengths)])
    for b, i in enumerate(idx):
        n = int(s.t5_lengths[i])
        np.testing.assert_array_equal(tok[b, :n], s.t5_tokens[off[i]:off[i + 1]])  # exact reconstruction
        assert mask[b].sum() == n and not tok[b, n:].any()
        np.testing.assert_array_equal(r.t5_of(i), s.t5_tokens[off[i]:off[i + 1]])
    ctok, cmask = r.padded_clip_tokens(idx, max_len=3)  # fixed length cuts long captions
    assert ctok.shape == (3, 3, 6) and (cmask.sum(1) == np.minimum(s.clip_lengths[idx], 3)).all()
    np.testing.assert_array_equal(ctok[1, :1], r.clip_tokens_of(0)[:1])


def test_concat_and_inconsistent_lengths_rejected():
    rng = np.random.default_rng(1)
    a, b = _shard(rng, ["a1", "a2"]), _shard(rng, ["b1"])
    c = EmbeddingShard.concat([a, b])
    assert list(c.keys) == ["a1", "a2", "b1"]
    np.testing.assert_array_equal(c.t5_of(2), b.t5_of(0))
    with pytest.raises(EmbeddingFormatError, match="t5_lengths sum"):
        EmbeddingShard(keys=a.keys, clip_image=a.clip_image, clip_text=a.clip_text, clip_tokens=a.clip_tokens,
                       clip_lengths=a.clip_lengths, t5_tokens=a.t5_tokens[:-1], t5_lengths=a.t5_lengths)


def test_unreadable_npz_names_the_file(tmp_path):
    p = tmp_path / "00003.npz"
    p.write_bytes(b"not an npz")
    with pytest.raises(EmbeddingFormatError, match="00003.npz"):
        read_embedding_shard(str(p))


def test_align_allows_skipped_rejects_foreign_and_reordered():
    tar = ["k0", "k1", "k2", "k3", "k4"]
    np.testing.assert_array_equal(align(tar, ["k0", "k2", "k4"], "s3://b/00001.tar"), [0, 2, 4])
    with pytest.raises(EmbeddingFormatError, match=r"'k9'.*s3://b/00001.tar"):
        align(tar, ["k0", "k9"], "s3://b/00001.tar")
    with pytest.raises(EmbeddingFormatError, match=r"'k1'.*out of order.*00001.tar"):
        align(tar, ["k2", "k1"], "s3://b/00001.tar")
    with pytest.raises(EmbeddingFormatError, match="out of order"):
        align(tar, ["k2", "k2"], "x")


def _with_ids(rng: np.random.Generator, s: EmbeddingShard) -> EmbeddingShard:
    return EmbeddingShard(**{a: getattr(s, a) for a in ("keys", "clip_image", "clip_text", "clip_tokens",
                                                         "clip_lengths", "t5_tokens", "t5_lengths")},
                          clip_ids=rng.integers(0, 49408, int(s.clip_lengths.sum())),
                          t5_ids=rng.integers(0, 32128, int(s.t5_lengths.sum())))


def test_token_ids_round_trip_and_older_shards_still_load(tmp_path):
    """Token ids (GLIDE) are optional arrays delimited by the feature lengths; a shard without them
    (written before they existed) still loads, and only asking for its ids names the fix."""
    rng = np.random.default_rng(3)
    s = _with_ids(rng, _shard(rng, ["k0", "k1", "k2"]))
    uri = str(tmp_path / "00000.npz")
    write_embedding_shard(uri, s)
    r = read_embedding_shard(uri)
    assert r.clip_ids.dtype == np.int32 and r.t5_ids.dtype == np.int32
    off = np.concatenate([[0], np.cumsum(s.clip_lengths)])
    np.testing.assert_array_equal(r.ids_of("clip", 2), s.clip_ids[off[2]:off[3]])
    assert len(r.ids_of("t5", 1)) == s.t5_lengths[1]
    # concat keeps ids only if every part has them
    both = EmbeddingShard.concat([r, _with_ids(rng, _shard(rng, ["k3"]))])
    assert len(both.t5_ids) == int(both.t5_lengths.sum())
    old = _shard(rng, ["o1"])
    assert EmbeddingShard.concat([r, old]).clip_ids is None
    write_embedding_shard(uri, old)
    back = read_embedding_shard(uri)
    assert back.clip_ids is None and back.t5_ids is None
    with pytest.raises(EmbeddingFormatError, match="no clip_ids .*re-run the embed stage"):
        back.ids_of("clip", 0)
    with pytest.raises(EmbeddingFormatError, match=r"t5_ids has \d+ rows"):
        EmbeddingShard(**{a: getattr(old, a) for a in ("keys", "clip_image", "clip_text", "clip_tokens",
                                                       "clip_lengths", "t5_tokens", "t5_lengths")},
                       t5_ids=np.zeros(1, np.int32) if old.t5_lengths.sum() != 1 else np.zeros(2, np.int32))
