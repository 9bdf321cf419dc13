"""The driver killed mid-run: `t2i run` (on a local Ray) is SIGKILLed twice, once while embed
runs and once while a training stage runs; `t2i resume RUN` then finishes the run.

What must hold: finished stages are not re-run (their manifest's finished_at is unchanged); the
embed stage resumes at its first unfinished shard (a shard whose done marker existed before the
kill keeps its marker bytes and npz mtime: not embedded twice); the training stage resumes from
its latest complete checkpoint (resumed_from_step > 0) and finishes its steps; and nothing the
killed driver started (Ray's processes, img2dataset, loader workers) outlives it. And the run,
killed twice and resumed on Ray, ends with the same bytes (shards, embeddings, weights) as one
uninterrupted run of the spec without Ray.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipeline.run.planning import stage_uri
from pipeline import manifest as mf
from pipeline import store
from tests.support.cli import t2i
from tests.support.specs import smoke_spec, tiny_embed, write_spec

pytestmark = [pytest.mark.reliability, pytest.mark.slow, pytest.mark.timeout(600)]

T2I = str(Path(sys.executable).parent / "t2i")
STEPS = 200


def _spec(tmp_path: Path) -> str:
    """The smoke spec's download, embed and train_prior on a local Ray: 36 images at 32px, 6 a
    shard (enough shards for embed to be caught mid-way), a prior long enough to be killed in."""
    return write_spec(tmp_path / "spec.yaml", smoke_spec(
        only=("download", "embed", "train_prior"), run_id="drv", store={"uri": f"file://{tmp_path / 'store'}"},
        cluster={"use_ray": True},
        download={"demo": {"num_images": 36, "image_size": 32, "seed": 5}, "image_size": 32,
                  "number_sample_per_shard": 6, "min_success_rate": 0.5},
        embed=tiny_embed(tmp_path / "enc", max_length=16, batch_size=4),
        train_prior={"steps": STEPS, "batch_size": 2, "checkpoint_every_steps": 10, "log_every": 10,
                     "num_workers": 1, "cpus_per_worker": 1}))


def _start(args, tmp_path, log_name):
    log = open(tmp_path / log_name, "w")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    # Its own session, like a terminal user's shell job: lets us see exactly what it started.
    return subprocess.Popen([T2I, *args], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True), log


def _wait_for(cond, proc, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc.poll() is not None:
            raise AssertionError(f"driver exited ({proc.returncode}) before {what}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _kill_driver(proc) -> list[psutil.Process]:
    """SIGKILL the driver alone; return what it had started (to check for orphans)."""
    kids = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return kids


def _survivors(kids: list[psutil.Process], grace: float = 15.0) -> list[str]:
    deadline = time.monotonic() + grace
    while True:
        alive = []
        for p in kids:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{p.pid} {p.name()}")
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def _cleanup(kids):
    for p in kids:
        try:
            p.kill()
        except psutil.Error:
            pass


def test_driver_sigkill_during_embed_and_training_then_resume(tmp_path, reliability):
    spec = _spec(tmp_path)
    run = f"file://{tmp_path / 'store'}/drv"
    from pipeline.run.planning import plan_stages
    from pipeline.run.spec import load_spec

    # Where the run will put each stage (attempts are planned from the spec alone).
    emb_shards = store.join(plan_stages(load_spec(spec))["embed"].attempt_uri, "shards")
    orphans_all: list[str] = []

    # 1. Kill while embed is half-way: some shards done, not all.
    proc, log = _start(["run", spec], tmp_path, "run1.log")
    n_tars = lambda: len(store.glob(store.join(stage_uri(run, "download"), "shards", "*.tar")))  # noqa: E731
    _wait_for(lambda: len(store.glob(store.join(emb_shards, "*.done.json"))) >= 2, proc, 240, "two embedded shards")
    kids = _kill_driver(proc)
    log.close()
    done_before = {u: store.read_bytes(u) for u in store.glob(store.join(emb_shards, "*.done.json"))}
    npz_mtime = {u: os.path.getmtime(store.local_path(u.replace(".done.json", ".npz"))) for u in done_before}
    total = n_tars()
    orphans = _survivors(kids)
    orphans_all += orphans
    _cleanup(kids)
    assert not store.exists(store.join(stage_uri(run, "embed"), mf.MANIFEST))
    assert len(done_before) < total, f"embed finished before the kill ({len(done_before)}/{total}); test is moot"
    t_download = store.read_json(store.join(stage_uri(run, "download"), mf.MANIFEST))["finished_at"]

    # 2. Resume; kill again once training has written a checkpoint.
    proc, log = _start(["resume", run], tmp_path, "run2.log")
    ck = store.join(stage_uri(run, "train_prior"), "checkpoints")
    _wait_for(lambda: any(store.exists(store.join(u, "COMPLETE")) for u in store.listdir(ck)), proc, 240,
              "a training checkpoint")
    kids = _kill_driver(proc)
    log.close()
    orphans = _survivors(kids)
    orphans_all += orphans
    _cleanup(kids)
    emb = store.read_json(store.join(stage_uri(run, "embed"), mf.MANIFEST))
    for u, body in done_before.items():
        assert store.read_bytes(u) == body, f"{u} was embedded again"
        assert os.path.getmtime(store.local_path(u.replace(".done.json", ".npz"))) == npz_mtime[u]
    assert len(store.glob(store.join(emb_shards, "*.done.json"))) == total
    assert not store.exists(store.join(stage_uri(run, "train_prior"), mf.MANIFEST))
    reliability.record(kind="fault", name="driver SIGKILL during embed", survived=True, lost_samples=0,
                       detail=f"resumed at shard {len(done_before)}/{total}; finished shards not re-embedded")

    # 3. Resume to the end.
    r = t2i("resume", run, cwd=tmp_path, timeout=300)
    assert r.code == 0, r.output
    assert store.read_json(store.join(stage_uri(run, "download"), mf.MANIFEST))["finished_at"] == t_download
    assert store.read_json(store.join(stage_uri(run, "embed"), mf.MANIFEST))["finished_at"] == emb["finished_at"]
    tm = store.read_json(store.join(stage_uri(run, "train_prior"), mf.MANIFEST))
    assert tm["counts"]["steps"] == STEPS and tm["counts"]["resumed_from_step"] > 0, tm["counts"]
    lines = [json.loads(x) for x in store.read_bytes(store.join(stage_uri(run, "train_prior"), "metrics.jsonl")).decode().splitlines()]
    assert [x["step"] for x in lines] == list(range(10, STEPS + 1, 10))
    assert tm["counts"]["resumed_from_step"] < STEPS, "training had finished before the kill; test is moot"
    assert emb["counts"]["n_embedded"] == 36
    reliability.record(kind="fault", name="driver SIGKILL during training", survived=True, lost_checkpoints=0,
                       detail=f"resumed from step {tm['counts']['resumed_from_step']}, finished {STEPS}; "
                              "download/embed not re-run")
    assert not orphans_all, f"processes outlived the killed driver: {orphans_all}"
    reliability.record(kind="fault", name="orphans after driver SIGKILL (x2)", survived=not orphans_all)

    # 4. Same spec, same machine -> same bits (issue 26), whatever happened on the way: the run
    # killed twice and resumed on Ray equals one uninterrupted run without Ray, in another store.
    other = tmp_path / "uninterrupted"
    r = t2i("run", spec, "--no-ray", "--set", f"store.uri=file://{other}", cwd=tmp_path, timeout=300)
    assert r.code == 0, r.output
    compared = 0
    for stage, pattern in (("download", "shards/*.tar"), ("embed", "shards/*.npz"),
                           ("train_prior", "final/*/model.safetensors")):
        ours = sorted(store.glob(store.join(stage_uri(run, stage), pattern)))
        theirs = sorted(store.glob(store.join(stage_uri(f"file://{other}/drv", stage), pattern)))
        assert [u.rsplit("/drv/", 1)[1] for u in ours] == [u.rsplit("/drv/", 1)[1] for u in theirs], stage
        for a, b in zip(ours, theirs):
            assert store.read_bytes(a) == store.read_bytes(b), f"{a} differs from the uninterrupted run's"
            compared += 1
    assert compared == 2 * total + 1


def test_driver_sigkill_without_ray_leaves_no_img2dataset_workers(tmp_path, reliability):
    """No-Ray runs download in the driver: img2dataset's multiprocessing workers must die with it."""
    spec = write_spec(tmp_path / "spec.yaml", smoke_spec(
        only=("download",), run_id="nr", store={"uri": f"file://{tmp_path / 'store'}"}, cluster={"use_ray": False},
        download={"demo": {"num_images": 200, "seed": 5}, "number_sample_per_shard": 10, "processes_count": 2,
                  "thread_count": 2, "min_success_rate": 0.5}))
    proc, log = _start(["run", spec], tmp_path, "nr.log")
    # the orphan watcher + img2dataset's pool (2 processes) + its writer at least
    _wait_for(lambda: len(psutil.Process(proc.pid).children(recursive=True)) >= 4, proc, 60, "img2dataset workers")
    kids = _kill_driver(proc)
    log.close()
    orphans = _survivors(kids)
    _cleanup(kids)
    assert not orphans, f"processes outlived the killed driver: {orphans}"
    assert not store.exists(store.join(f"file://{tmp_path / 'store'}", "nr", "download", mf.MANIFEST))
    reliability.record(kind="fault", name="driver SIGKILL during download (no Ray)", survived=True,
                       detail=f"{len(kids)} child processes, none left behind")
