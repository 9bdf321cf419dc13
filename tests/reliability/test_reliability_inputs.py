"""Bad input matrix: every kind of broken sample or shard is skipped and counted, or stops the
stage with a clear error naming the file or field — never a hang (pytest-timeout on each test),
a bare traceback or a silently wrong join.

Covered elsewhere and not repeated here: the download stage's exact per-kind counts on a served
corpus (tests/stages/test_download.py::test_download_counts_every_bad_row_exactly: 404, HTML as
.jpg, truncated, zero-byte, decompression bomb), non-finite rows at embed time
(tests/stages/test_embed.py::test_nonfinite_rows_skipped_and_counted) and the spec mistakes matrix
(tests/unit/test_spec.py, re-run below through its own cases so the summary counts them).
"""
from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from data_prep.demo_corpus import _bomb_png
from data_prep.embed.config import EmbedConfig
from data_prep.embed.stage import embed_shards
from data_prep.embed_format import EmbeddingFormatError, read_embedding_shard, write_embedding_shard
from data_prep.encoders import ClipConfig, T5Config
from pipeline import store
from pipeline.context import StageFailed
from stages.training.loader import LoaderError, LoaderSpec, ShardStream, pair_shards
from tests.support.data import embedding_shard, make_dataset, sample_members, write_tar

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(120)]


def _jpeg(seed: int, w: int = 40, h: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


# key -> (image bytes or None for no image member, caption bytes or None for no .txt, expectation)
BAD_SAMPLES = {
    "html as .jpg": (b"<!doctype html><html><body>404 Not Found</body></html>", b"a red circle", "bad_image"),
    "truncated JPEG": (_jpeg(1)[:120], b"a blue square", "bad_image"),
    "zero-byte JPEG": (b"", b"a green star", "bad_image"),
    "decompression bomb": (_bomb_png(), b"a dark sky", "bad_image"),
    "empty caption": (_jpeg(2), b"", "missing_caption"),
    "whitespace caption": (_jpeg(3), b"  \n\t ", "missing_caption"),
    "no caption member": (_jpeg(4), None, "missing_caption"),
    "non-UTF-8 caption": (_jpeg(5), b"a \xff\xfe red \x80 circle", "embedded"),
    "very long caption": (_jpeg(6), ("a large yellow triangle " * 5000).encode(), "embedded"),
}


def test_embed_skips_and_counts_each_bad_sample(tmp_path, tiny_encoders, reliability):
    shards = tmp_path / "download" / "shards"
    shards.mkdir(parents=True)
    keys, members = {}, []
    for i in range(4):  # good ones around the bad ones
        members += sample_members(f"{i:09d}", _jpeg(100 + i), b"a small red circle")
    for j, (name, (img, cap, _)) in enumerate(BAD_SAMPLES.items()):
        key = f"{100 + j:09d}"
        keys[name] = key
        members += sample_members(key, img, cap, {"key": key})
    write_tar(shards / "00000.tar", members)
    cfg = EmbedConfig(clip=ClipConfig(model=f"tiny:{tiny_encoders}"),
                      t5=T5Config(model=f"tiny:{tiny_encoders}", max_length=16), batch_size=4)
    out = str(tmp_path / "embed")
    # More than half of this shard is bad: over the default threshold, the stage stops naming it.
    with pytest.raises(StageFailed, match=r"00000\.tar: 7 of 13 samples .*embed\.max_bad_fraction=0\.5"):
        embed_shards(str(shards), out, cfg)
    assert not store.exists(store.join(out, "shards", "00000.done.json"))
    reliability.record(kind="bad_input", name="embed: shard over max_bad_fraction", survived=True,
                       detail="StageFailed naming the shard and the limit; no done marker")
    embed_shards(str(shards), out, cfg.model_copy(update={"max_bad_fraction": 0.9}))
    marker = store.read_json(store.join(out, "shards", "00000.done.json"))
    c = marker["counts"]
    want = {k: sum(1 for v in BAD_SAMPLES.values() if v[2] == k) for k in ("bad_image", "missing_caption")}
    assert c["n_bad_image"] == want["bad_image"], c
    assert c["n_missing_caption"] == want["missing_caption"], c
    emb = read_embedding_shard(store.join(out, "shards", "00000.npz"))
    got = set(map(str, emb.keys))
    assert c["n_embedded"] == len(got) == 4 + sum(1 for v in BAD_SAMPLES.values() if v[2] == "embedded")
    for name, (_, _, expect) in BAD_SAMPLES.items():
        assert (keys[name] in got) == (expect == "embedded"), name
        reliability.record(kind="bad_input", name=f"embed: {name}", survived=True,
                           detail="embedded" if expect == "embedded" else f"skipped, counted as {expect}")
    assert np.isfinite(emb.clip_text.astype(np.float32)).all()


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(str(tmp_path / "d"), n_shards=2, per_shard=6)


def _drain(download, embed, n=8, image_size=16):
    spec = LoaderSpec(image_size, 2, 0, 0, 1)
    out = []
    for _, b in zip(range(n), iter(ShardStream(pair_shards(store.join(download, "shards"), store.join(embed, "shards")), spec))):
        out.append(b)
    return out


def test_loader_truncated_tar_names_the_shard(dataset, reliability):
    download, embed = dataset
    tar = store.glob(store.join(download, "shards", "*.tar"))[1]
    body = store.read_bytes(tar)
    store.write_bytes_atomic(tar, body[: len(body) // 2 + 7])
    with pytest.raises(LoaderError) as ei:
        _drain(download, embed)
    assert tar in str(ei.value) and "truncated or corrupt" in str(ei.value)
    reliability.record(kind="bad_input", name="training: truncated download tar", survived=True,
                       detail="LoaderError naming the shard")


def test_loader_skips_and_counts_nonfinite_embedding_rows(dataset, reliability):
    download, embed = dataset
    npz = store.glob(store.join(embed, "shards", "*.npz"))[0]
    shard = read_embedding_shard(npz)
    bad = embedding_shard([str(k) for k in shard.keys])
    bad.clip_text[1] = np.nan
    bad.t5_tokens[0] = np.inf  # row 0's first T5 token
    write_embedding_shard(npz, bad)
    batches = _drain(download, embed, n=5)
    seen = [k for b in batches for k in b["keys"]]
    assert str(shard.keys[0]) not in seen and str(shard.keys[1]) not in seen
    assert all(torch_finite(b) for b in batches)
    assert batches[-1]["skipped"] >= 2
    reliability.record(kind="bad_input", name="training: NaN/inf embedding rows", survived=True,
                       detail="rows skipped and counted by the loader")


def torch_finite(batch) -> bool:
    import torch

    return all(torch.isfinite(batch[k].float()).all() for k in ("clip_image", "clip_text", "t5_tokens", "clip_tokens"))


def test_loader_misaligned_keys_stop_naming_shard_and_key(dataset, reliability):
    download, embed = dataset
    npz = store.glob(store.join(embed, "shards", "*.npz"))[0]
    keys = [str(k) for k in read_embedding_shard(npz).keys]
    keys[2], keys[3] = keys[3], keys[2]  # same keys, wrong order: a silent wrong join if unchecked
    write_embedding_shard(npz, embedding_shard(keys))
    with pytest.raises(LoaderError, match=rf"{re.escape(npz)} is misaligned .*{keys[2]}|{keys[3]}"):
        _drain(download, embed)
    reliability.record(kind="bad_input", name="training: embedding keys out of order", survived=True,
                       detail="LoaderError naming shard and key")
    foreign = embedding_shard([*keys[:5], "999999999"])  # a key the tar does not have
    write_embedding_shard(npz, foreign)
    with pytest.raises(LoaderError, match=re.escape(npz)):
        _drain(download, embed)
    reliability.record(kind="bad_input", name="training: embedding key not in the tar", survived=True,
                       detail="LoaderError naming shard and key")


def test_missing_and_garbage_embedding_shards(dataset, reliability):
    download, embed = dataset
    npzs = store.glob(store.join(embed, "shards", "*.npz"))
    body = store.read_bytes(npzs[0])
    for name, data in (("garbage .npz", b"definitely not an npz"), ("truncated .npz", body[: len(body) // 2])):
        store.write_bytes_atomic(npzs[0], data)
        with pytest.raises((EmbeddingFormatError, LoaderError)) as ei:
            _drain(download, embed)
        assert npzs[0].rsplit("/", 1)[-1] in str(ei.value), str(ei.value)
        reliability.record(kind="bad_input", name=f"training: {name}", survived=True,
                           detail=f"{type(ei.value).__name__} naming the file")
    store.remove(npzs[1])
    with pytest.raises(LoaderError, match="has no embedding shard 00001.npz"):
        pair_shards(store.join(download, "shards"), store.join(embed, "shards"))
    reliability.record(kind="bad_input", name="training: download shard without its .npz", survived=True,
                       detail="LoaderError naming the shard")


def test_spec_mistakes_matrix(reliability):
    """tests/unit/test_spec.py's own cases (SPEC_MISTAKES), counted in the summary (not a second copy of them)."""
    from tests.support.specs import SPEC_MISTAKES, demo_spec_error, set_field

    cases = SPEC_MISTAKES
    assert len(cases) >= 10
    for path, value, expect in cases:
        msg = demo_spec_error(set_field(path, value))
        assert re.search(expect, msg) and "Traceback" not in msg, msg
        reliability.record(kind="bad_input", name=f"spec: {path}={value!r}", survived=True,
                           detail=msg.splitlines()[-1].strip()[:90])
