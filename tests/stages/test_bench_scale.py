"""``t2i bench scale`` at small N: the synthetic run is a real finished run, every operation finds
what it must (the bench itself checks: resume finds exactly the unfinished half, the loader pairs
every shard, the newest checkpoint is found), and nothing grows faster than the shards."""
from __future__ import annotations

import json

import pytest

from pipeline.cli.bench_scale import OPERATIONS, bench_scale, build_run, moto_store
from pipeline.store import normalize
from tests.support.cli import t2i


def test_bench_scale_file_store_grows_no_faster_than_the_shards(tmp_path):
    res = bench_scale([60, 600], normalize(str(tmp_path)))
    assert set(res["results"]) == {"60", "600"}
    for n in ("60", "600"):
        assert set(res["results"][n]) == {f"{op}_s" for op in OPERATIONS}
        assert all(v > 0 for v in res["results"][n].values())
    # the operations that touch every shard: linear or better (an O(N^2) listing would be ~100x)
    for op in ("manifest", "resume", "pair"):
        small, big = res["results"]["60"][f"{op}_s"], res["results"]["600"][f"{op}_s"]
        assert big / max(small, 0.005) <= 12, (op, small, big)


def test_synthetic_run_is_laid_out_like_a_real_one(tmp_path):
    from pipeline import layout, store
    from pipeline.run.planning import run_status

    run = build_run(normalize(str(tmp_path)), 10)
    assert [r["state"] for r in run_status(run["run"])] == ["done"] * len(run["plans"])
    # <run>/<stage>/<fp12>/ attempt folders named by the planned fingerprints
    for stage, p in run["plans"].items():
        assert layout.parse_attempt(p.attempt_uri) == (p.fingerprint[:12], 1)
        assert layout.read_current(run["run"], stage) == p.attempt_uri
    assert len(store.glob(store.join(run["embed_shards"], "*.done.json"))) == 10


def test_bench_scale_cli_json(tmp_path):
    p = t2i("bench", "scale", "--shards", "10,20", "--json", "--root", tmp_path, timeout=300)
    assert p.code == 0, p.output
    res = json.loads(p.stdout)
    assert set(res["results"]) == {"10", "20"} and "resume_s" in res["results"]["20"]
    bad = t2i("bench", "scale", "--shards", "ten", timeout=120)
    assert bad.code == 2 and "--shards must be" in bad.stderr


@pytest.mark.slow
def test_bench_scale_on_s3():
    with moto_store() as uri:
        res = bench_scale([6, 12], uri)
    assert res["store"] == "s3"
    small, big = res["results"]["6"], res["results"]["12"]
    assert set(big) == {f"{op}_{k}" for op in OPERATIONS for k in ("s", "requests")}
    # round trips: planning and status do not depend on N; the resume reads one marker per done shard
    assert small["status_requests"] == big["status_requests"] and small["plan_requests"] == big["plan_requests"]
    assert big["resume_requests"] - small["resume_requests"] == (12 - 6) // 2


def test_ledger_snapshot_sees_a_shard_finished_since_at_the_next_scan(tmp_path):
    from data_prep.embed.ledger import done_uri, is_done, list_sources, npz_uri
    from pipeline import store

    run = build_run(normalize(str(tmp_path)), 4)
    sources = list_sources(run["download_shards"])
    assert [is_done(run["half_embed"], s, run["identity"]) for s in sources] == [True, False, True, False]
    for uri in (npz_uri, done_uri):   # shard 00001 finishes (as finalize_shard writes it)
        store.write_bytes_atomic(uri(run["half_embed"], "00001"), store.read_bytes(uri(run["embed_shards"], "00001")))
    sources = list_sources(run["download_shards"])   # the next scan
    assert [is_done(run["half_embed"], s, run["identity"]) for s in sources] == [True, True, True, False]
    other = {**run["identity"], "image_size": 999}
    assert not any(is_done(run["half_embed"], s, other) for s in sources)
