"""Embed stage end to end on tiny encoders: alignment, counts, resume, Ray == in-process."""
from __future__ import annotations

import io
import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from PIL import Image

from data_prep.embed.decode import DecodedChunk, decode_shard
from data_prep.embed.config import EmbedConfig
from data_prep.embed.stage import embed_shards, find_compatible_embedding, load_encoders_for, run
from data_prep.embed.encode import encode_chunk, load_encoders
from data_prep.embed_format import align, read_embedding_shard
from data_prep.encoders import ClipConfig, T5Config, clip_preprocess_cfg
from data_prep.shards import iter_shard
from pipeline.context import StageContext, StageFailed
from tests.support.data import sample_members, write_tar

WORDS = "red green blue yellow circle square triangle star on a small large dark sky".split()


def _jpeg(rng: np.random.Generator, w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def make_shards(root, n_shards=3, per_shard=7, seed=0) -> dict[str, list[str]]:
    """img2dataset-style shards. Shard 1 has a corrupt JPEG (key ...0002) and a sample without a
    caption (key ...0004); shard 2 has a sample with no image member (key ...0005)."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    keys = {}
    for s in range(n_shards):
        name = f"{s:05d}"
        keys[name] = []
        members = []
        for i in range(per_shard):
            key = f"{name}{i:04d}"
            keys[name].append(key)
            img = _jpeg(rng, int(rng.integers(24, 80)), int(rng.integers(24, 80)))
            if (s, i) == (1, 2):
                img = img[:40]  # truncated JPEG: undecodable
            cap = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 12))))
            members += sample_members(key, img if (s, i) != (2, 5) else None, cap if (s, i) != (1, 4) else None,
                                      {"key": key, "caption": cap})
        write_tar(os.path.join(root, f"{name}.tar"), members)
    return keys


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_encoders):
    root = tmp_path_factory.mktemp("embed")
    keys = make_shards(root / "download" / "shards")
    cfg = EmbedConfig(clip=ClipConfig(model=f"tiny:{tiny_encoders}"), t5=T5Config(model=f"tiny:{tiny_encoders}"),
                      batch_size=3, t5_micro_batch=2, gpus_per_actor=0)
    return {"root": root, "keys": keys, "cfg": cfg, "shards": str(root / "download" / "shards"),
            "enc": load_encoders(cfg, device="cpu")}


@pytest.fixture(scope="module")
def baseline(env):
    """One in-process run everybody compares against."""
    out = str(env["root"] / "base")
    summary = embed_shards(env["shards"], out, env["cfg"], encoders=env["enc"])
    return out, summary


def _arrays(out: str, name: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(out, "shards", f"{name}.npz"), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_alignment_counts_and_format(env, baseline):
    out, summary = baseline
    c = summary["counts"]
    assert (c["n_total"], c["n_embedded"], c["n_bad_image"], c["n_missing_caption"]) == (21, 18, 2, 1)
    assert c["shards"] == 3 and summary["metrics"]["bytes_per_sample"] > 0
    enc_doc = json.load(open(os.path.join(out, "encoders.json")))
    assert (enc_doc["clip_dim"], enc_doc["clip_token_dim"], enc_doc["t5_dim"]) == (32, 64, 32)
    dropped = {"00001": {"000010002", "000010004"}, "00002": {"000020005"}}
    for name, tar_keys in env["keys"].items():
        shard_uri = os.path.join(env["shards"], f"{name}.tar")
        emb = read_embedding_shard(os.path.join(out, "shards", f"{name}.npz"))
        expect = [k for k in tar_keys if k not in dropped.get(name, set())]
        assert list(emb.keys) == expect
        reader_keys = [s.key for s in iter_shard(shard_uri)]  # what the training loader sees
        idx = align(reader_keys, emb.keys, shard_uri)
        assert [reader_keys[i] for i in idx] == expect
        marker = json.load(open(os.path.join(out, "shards", f"{name}.done.json")))
        assert marker["counts"]["n_embedded"] == len(expect) and marker["source"].endswith(shard_uri)
        assert emb.clip_image.dtype == np.float16
        np.testing.assert_allclose(np.linalg.norm(emb.clip_image.astype(np.float32), axis=1), 1, atol=2e-3)


def test_t5_and_clip_tokens_match_direct_encoding(env, baseline):
    out, _ = baseline
    emb = read_embedding_shard(os.path.join(out, "shards", "00000.npz"))
    caps = [s.caption for s in iter_shard(os.path.join(env["shards"], "00000.tar"))]
    hs, lengths = env["enc"].t5.encode(caps)
    assert emb.t5_lengths.tolist() == lengths.tolist()
    tok, mask = emb.padded_t5(range(len(caps)))
    for i in range(len(caps)):
        np.testing.assert_allclose(emb.t5_of(i).astype(np.float32), hs[i].numpy(), atol=2e-3, rtol=2e-3)
        np.testing.assert_array_equal(tok[i, : lengths[i]], emb.t5_of(i))
        assert mask[i].sum() == lengths[i]
    _, ctoks, clens = env["enc"].clip.encode_text(caps)
    assert emb.clip_lengths.tolist() == clens.tolist()
    np.testing.assert_allclose(emb.clip_tokens_of(2).astype(np.float32), ctoks[2].numpy(), atol=2e-3, rtol=2e-3)


def test_deterministic_across_runs(env, baseline, tmp_path):
    out, _ = baseline
    embed_shards(env["shards"], str(tmp_path), env["cfg"], encoders=env["enc"])
    for name in env["keys"]:
        a, b = _arrays(out, name), _arrays(str(tmp_path), name)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_resume_after_kill(env, tmp_path):
    out = str(tmp_path)
    seen: list[str] = []

    def die_after_second(marker):
        seen.append(marker["shard"])
        if len(seen) == 2:
            raise KeyboardInterrupt("simulated kill after shard 1")

    with pytest.raises(KeyboardInterrupt):
        embed_shards(env["shards"], out, env["cfg"], encoders=env["enc"], on_shard_done=die_after_second)
    done = lambda n: os.path.join(out, "shards", f"{n}.done.json")  # noqa: E731
    assert os.path.exists(done("00001")) and not os.path.exists(done("00002"))
    assert not os.path.exists(os.path.join(out, "encoders.json"))  # incomplete run never looks complete
    mtimes = {n: os.stat(done(n)).st_mtime_ns for n in ("00000", "00001")}
    npz_mtimes = {n: os.stat(os.path.join(out, "shards", f"{n}.npz")).st_mtime_ns for n in ("00000", "00001")}

    again: list[str] = []
    s = embed_shards(env["shards"], out, env["cfg"], encoders=env["enc"], on_shard_done=lambda m: again.append(m["shard"]))
    assert again == ["00002"] and s["embedded_now"] == ["00002"]  # nothing embedded twice, nothing missing
    assert {n: os.stat(done(n)).st_mtime_ns for n in mtimes} == mtimes
    assert {n: os.stat(os.path.join(out, "shards", f"{n}.npz")).st_mtime_ns for n in npz_mtimes} == npz_mtimes
    assert s["counts"]["n_embedded"] == 18
    third = embed_shards(env["shards"], out, env["cfg"], encoders=env["enc"])
    assert third["embedded_now"] == []  # finished = no-op


def test_stage_run_and_reuse_check(env, baseline, tmp_path):
    ctx = StageContext(run_uri=str(tmp_path), out_uri=str(tmp_path / "embed"),
                       inputs={"download": {"out_uri": str(env["root"] / "download"),
                                             "outputs": {"shards": str(env["root"] / "download" / "shards")}}})
    res = run(env["cfg"], ctx)
    assert res.counts["n_embedded"] == 18 and res.counts["n_bad_image"] == 2
    assert res.metrics["clip_dim"] == 32 and res.metrics["t5_dim"] == 32 and res.metrics["clip_token_dim"] == 64
    assert res.outputs["encoders"].endswith("encoders.json") and res.outputs["t5_model"] == env["cfg"].t5.model
    assert find_compatible_embedding(ctx.out_uri, env["shards"], env["cfg"])
    other = env["cfg"].model_copy(update={"t5": T5Config(model=env["cfg"].t5.model, max_length=64)})
    assert not find_compatible_embedding(ctx.out_uri, env["shards"], other)
    assert not find_compatible_embedding(str(tmp_path / "nothing"), env["shards"], env["cfg"])
    enc, doc = load_encoders_for(ctx.out_uri, device="cpu")  # what sampling does
    assert enc.dims == doc.dims
    with pytest.raises(ValueError, match="num_actors"):
        EmbedConfig(num_actors=0)


def test_nonfinite_rows_skipped_and_counted(env):
    pp = clip_preprocess_cfg(env["cfg"].clip)
    chunk = next(decode_shard(os.path.join(env["shards"], "00000.tar"), pp, 3))
    chunk.pixels[1] = np.nan
    part, counts = encode_chunk(env["enc"], chunk)
    assert counts["n_nonfinite"] == 1 and counts["n_embedded"] == 2
    assert list(part.keys) == [chunk.keys[0], chunk.keys[2]]
    empty = DecodedChunk("00009", 0, True, [], [], np.zeros((0, 3, 32, 32), np.float16), {"n_total": 0})
    e, c = encode_chunk(env["enc"], empty)
    assert len(e) == 0 and e.dims == {"clip_dim": 32, "clip_token_dim": 64, "t5_dim": 32}


def test_bad_image_policy(env, tmp_path):
    pp = clip_preprocess_cfg(env["cfg"].clip)
    with pytest.raises(ValueError, match=r"00001\.tar.*'000010002'"):
        list(decode_shard(os.path.join(env["shards"], "00001.tar"), pp, 3, skip_bad_images=False))
    no_skip = env["cfg"].model_copy(update={"skip_bad_images": False})
    with pytest.raises(ValueError, match=r"'000010002'.*skip_bad_images"):  # raised through the prefetch thread
        embed_shards(env["shards"], str(tmp_path), no_skip, encoders=env["enc"])
    assert os.path.exists(tmp_path / "shards" / "00000.done.json")
    assert not os.path.exists(tmp_path / "shards" / "00001.npz")
    strict = env["cfg"].model_copy(update={"max_bad_fraction": 0.1})
    with pytest.raises(StageFailed, match=r"00001\.tar.*max_bad_fraction"):
        embed_shards(env["shards"], str(tmp_path), strict, encoders=env["enc"])
    assert not os.path.exists(tmp_path / "shards" / "00001.done.json")


def test_bench_embed_tiny_reports_ratio():
    from data_prep.bench.embed import bench_embed, format_result

    r = bench_embed("tiny", batch_size=4, num_batches=2, device="cpu", image_px=48)
    assert r["embedded"] == r["samples"] == 8
    assert r["e2e_images_per_s"] > 0 and r["raw_images_per_s"] > 0 and r["bytes_per_sample"] > 0
    assert r["e2e_over_raw"] == pytest.approx(r["e2e_images_per_s"] / r["raw_images_per_s"])
    assert "ratio" in format_result(r)
    with pytest.raises(ValueError, match="model_size"):
        bench_embed("huge")


def test_embed_offline_progress(env, baseline, tmp_path):
    from data_prep.embed.stage import embed_offline

    s = embed_offline(env["shards"], str(tmp_path), env["cfg"], progress=True)
    assert s["counts"]["n_embedded"] == 18
    out, _ = baseline
    np.testing.assert_array_equal(_arrays(out, "00002")["t5_tokens"], _arrays(str(tmp_path), "00002")["t5_tokens"])


def test_ray_data_path_matches_in_process(env, baseline, tmp_path):
    from data_prep.embed.stage import embed_offline

    ray = pytest.importorskip("ray")
    out, _ = baseline
    # Resume state: shard 00000 finished earlier; 00001 left a stale part from an interrupted run.
    os.makedirs(tmp_path / "shards" / "_parts" / "00001")
    for f in ("00000.npz", "00000.done.json"):
        shutil.copy2(os.path.join(out, "shards", f), tmp_path / "shards" / f)
    (tmp_path / "shards" / "_parts" / "00001" / "00007.npz").write_bytes(b"stale")
    before = os.stat(tmp_path / "shards" / "00000.done.json").st_mtime_ns
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        from pipeline.run.ray_executor import ray_session

        with ray_session("local") as executor:
            s = embed_offline(env["shards"], str(tmp_path), env["cfg"], executor=executor, progress=False)
        assert ray.is_initialized()  # an existing connection is reused, not shut down
    finally:
        ray.shutdown()
    assert sorted(s["embedded_now"]) == ["00001", "00002"] and s["counts"]["n_embedded"] == 18
    assert os.stat(tmp_path / "shards" / "00000.done.json").st_mtime_ns == before
    assert not os.path.exists(tmp_path / "shards" / "_parts" / "00001")
    for name in env["keys"]:
        a, b = _arrays(out, name), _arrays(str(tmp_path), name)
        assert list(a["keys"]) == list(b["keys"])
        for k in a:
            if a[k].dtype == np.float16:
                np.testing.assert_allclose(a[k].astype(np.float32), b[k].astype(np.float32), atol=1e-3, rtol=1e-3)
            else:
                np.testing.assert_array_equal(a[k], b[k])
    a, b = (json.load(open(os.path.join(d, "encoders.json"))) for d in (out, str(tmp_path)))
    assert a["counts"] == b["counts"] and a["identity"] == b["identity"]


def test_additional_columns_reach_the_embedding_shard(env, tmp_path):
    """download.save_additional_columns (LAION similarity, punsafe, ...) land in each sample's json;
    embed carries them into the npz, row for row, still loadable without pickles."""
    s = embed_shards(env["shards"], str(tmp_path), env["cfg"], encoders=env["enc"], columns=("caption", "absent"))
    assert s["counts"]["n_embedded"] == 18
    for name in env["keys"]:
        shard = read_embedding_shard(os.path.join(tmp_path, "shards", f"{name}.npz"))
        metas = {smp.key: smp.meta for smp in iter_shard(os.path.join(env["shards"], f"{name}.tar"))}
        assert set(shard.columns) == {"caption", "absent"}
        for k, v, missing in zip(shard.keys, shard.columns["caption"], shard.columns["absent"]):
            assert json.loads(str(v)) == metas[str(k)]["caption"] and json.loads(str(missing)) is None
