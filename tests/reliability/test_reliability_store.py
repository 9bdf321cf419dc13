"""Object-store faults while checkpoints and manifests are written (real S3 API: moto on 127.0.0.1).

Each test injects failures into the pipeline's own store writes (tests/support/faults.py) or stops the
S3 endpoint outright, then checks the promises: bounded retries with backoff; a checkpoint or a
stage never counts as complete unless fully written; a clear error naming the URI and the cause
once retries are spent; a later resume finishes from the last complete checkpoint.
"""
from __future__ import annotations

import json
import time

import pytest

from pipeline import manifest as mf
from stages.training.final_weights import latest_final
from pipeline import store
from stages.models import prior
from stages.training.checkpoint import CheckpointManager
from stages.training.trainer import DistEnv, TrainJob, train_loop
from tests.support.data import make_dataset
from tests.support.faults import WriteFaults, failing_writes
from tests.support.train import stage_ctx, tiny_train_kwargs

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(240)]


@pytest.fixture
def fast_retries(monkeypatch):
    """Same bounded backoff, shorter base delay: 5 attempts in ~0.3 s instead of ~3 s."""
    real = store.with_retries

    def quick(fn, *, what, attempts=5, base_delay=0.2):
        return real(fn, what=what, attempts=attempts, base_delay=0.02)

    monkeypatch.setattr(store, "with_retries", quick)


@pytest.fixture
def s3_data(s3_bucket):
    root = f"{s3_bucket}/run"
    download, embed = make_dataset(root, n_shards=2, per_shard=4)
    return root, download, embed


def _cfg(**over):
    return prior.PriorTrainConfig(**tiny_train_kwargs(steps=3, checkpoint_every_steps=1, keep_last=5, **over))


def _loop(root, download, embed, stage, cfg):
    ctx = stage_ctx(root, stage, download, embed)
    job = TrainJob.from_ctx(ctx, prior.SPEC.needs_images)
    return ctx, train_loop(prior.SPEC, cfg, job, DistEnv.from_env())


def _complete(out_uri):
    return CheckpointManager(out_uri, keep_last=5, every_steps=1, every_minutes=0, rank=0, world_size=1,
                             device="cpu").complete_steps()


def test_transient_upload_failures_are_retried(s3_data, fast_retries, reliability):
    root, download, embed = s3_data
    # Three consecutive uploads into checkpoint 2 fail (a flapping endpoint); the 4th attempt works.
    with failing_writes(WriteFaults(match="step_00000002/", first=1, times=3)) as plan:
        ctx, out = _loop(root, download, embed, "train_prior", _cfg())
    assert plan.injected == 3
    assert out["step"] == 3 and _complete(ctx.out_uri) == [1, 2, 3]
    reliability.record(kind="fault", name="3 transient S3 write failures during a checkpoint upload",
                       survived=True, lost_checkpoints=0, detail=f"retried, checkpoints {_complete(ctx.out_uri)}")


def test_checkpoint_write_down_then_resume(s3_data, fast_retries, reliability):
    root, download, embed = s3_data
    cfg = _cfg()
    # The store stays down for everything written into checkpoint 2: retries run out.
    with failing_writes(WriteFaults(match="step_00000002/", times=None)) as plan:
        with pytest.raises(store.StoreError) as ei:
            _loop(root, download, embed, "train_prior", cfg)
    msg = str(ei.value)
    out_uri = store.join(root, "train_prior")
    ck2 = store.join(out_uri, "checkpoints", "step_00000002")
    # Clear error: what was being written (the URI), that retries ran out, and the cause.
    assert "step_00000002" in msg and "after 5 attempts" in msg and "injected fault" in msg, msg
    assert out_uri.split("://", 1)[1] in msg or ck2 in msg, msg
    assert plan.injected == 5, "bounded: exactly the configured attempts"
    # Checkpoint 2 never counts as complete; checkpoint 1 is intact.
    assert not store.exists(store.join(ck2, "COMPLETE"))
    assert _complete(out_uri) == [1]
    assert latest_final(out_uri) is None, "no final weights from a failed run"

    # The endpoint is back: a later run resumes from checkpoint 1 and finishes.
    ctx, out = _loop(root, download, embed, "train_prior", cfg)
    assert out["resumed_from"] == 1 and out["step"] == 3
    assert _complete(out_uri) == [1, 2, 3]
    lines = [json.loads(x) for x in store.read_bytes(store.join(out_uri, "metrics.jsonl")).decode().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3], "metrics: no duplicate or missing steps across the resume"
    reliability.record(kind="fault", name="S3 down while a checkpoint is written (retries spent)", survived=True,
                       lost_checkpoints=0, detail="clear StoreError, incomplete checkpoint invisible, resumed from step 1")


def test_complete_marker_write_fails(s3_data, fast_retries, reliability):
    root, download, embed = s3_data
    with failing_writes(WriteFaults(match="step_00000003/COMPLETE", times=None)):
        with pytest.raises(store.StoreError, match="COMPLETE"):
            _loop(root, download, embed, "train_prior", _cfg())
    out_uri = store.join(root, "train_prior")
    ck3 = store.join(out_uri, "checkpoints", "step_00000003")
    assert store.exists(store.join(ck3, "state_rank0.json")), "the data of step 3 was uploaded..."
    assert _complete(out_uri) == [1, 2], "...but without its marker it is not a checkpoint"
    ctx, out = _loop(root, download, embed, "train_prior", _cfg())
    assert out["resumed_from"] == 2 and out["step"] == 3 and _complete(out_uri) == [1, 2, 3]
    reliability.record(kind="fault", name="S3 write of a checkpoint's COMPLETE marker fails", survived=True,
                       detail="checkpoint ignored until rewritten; resumed from step 2")


def test_manifest_write_fails_stage_not_done(s3_data, fast_retries, reliability):
    """The runner's last write fails: the stage must not look done, and resume completes it."""
    from pipeline.run.stage_exec import execute_stage

    root, download, embed = s3_data
    out_uri = store.join(root, "train_prior")
    cfg = _cfg()
    ctx = stage_ctx(root, "train_prior", download, embed)
    with failing_writes(WriteFaults(match="_MANIFEST.json", times=None)):
        result = prior.run(cfg, ctx)
        with pytest.raises(store.StoreError, match="_MANIFEST.json"):
            mf.write_manifest(out_uri, stage="train_prior", fp="f" * 64, started_at=time.time(),
                              counts=result.counts, metrics=result.metrics, outputs=result.outputs, node={},
                              config={})
    assert mf.stage_state(out_uri, "f" * 64).state != "done"
    # Resume: the loop finds checkpoint 3 == steps, trains nothing, keeps final/step_3 and writes the manifest.
    ctx2, out = _loop(root, download, embed, "train_prior", cfg)
    assert out["resumed_from"] == 3 and out["step"] == 3
    mf.write_manifest(out_uri, stage="train_prior", fp="f" * 64, started_at=time.time(), counts={}, metrics={},
                      outputs={}, node={}, config={})
    assert mf.stage_state(out_uri, "f" * 64).state == "done"
    assert execute_stage is not None
    reliability.record(kind="fault", name="S3 write of _MANIFEST.json fails", survived=True,
                       detail="stage stays not-done; resume finished it without retraining")


def test_endpoint_stopped_and_restarted(monkeypatch, fast_retries, reliability):
    """A real outage: moto's server stops (connection refused), then comes back on the same port."""
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    from pipeline.executors import free_port

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # botocore and s3fs retry a refused connection themselves too (under ours); keep theirs small here.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1, raising=False)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="outage")
        s3fs.S3FileSystem.clear_instance_cache()
        uri = "s3://outage/run/train_base/_MANIFEST.json"
        store.write_json("s3://outage/run/ok.json", {"ok": 1})
        server.stop()
        t0 = time.monotonic()
        with pytest.raises(store.StoreError) as ei:
            store.write_json(uri, {"stage": "x"})
        took = time.monotonic() - t0
        msg = str(ei.value)
        assert uri in msg and "after 5 attempts" in msg, msg
        assert took < 60, f"bounded retries, not a hang ({took:.1f}s)"
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        s3fs.S3FileSystem.clear_instance_cache()
        store.write_json(uri, {"stage": "x"})
        assert store.read_json(uri) == {"stage": "x"}
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()
    reliability.record(kind="fault", name="S3 endpoint stopped during a manifest write, then restarted",
                       survived=True, detail=f"StoreError after {took:.1f}s naming the URI; write works after restart")
