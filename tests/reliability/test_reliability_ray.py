"""A Ray Train worker SIGKILLed mid-stage: Ray Train restarts the group (FailureConfig
max_failures), the loop resumes from the latest complete checkpoint and finishes the configured
step count. The kill is real: a watcher thread waits for a checkpoint to appear in the store,
finds the RayTrainWorker process among this driver's descendants and sends it SIGKILL.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import psutil
import pytest

from pipeline import store
from stages.models import prior
from stages.training.trainer import train_stage
from tests.support.data import make_dataset
from tests.support.train import stage_ctx, tiny_train_kwargs

pytestmark = [pytest.mark.reliability, pytest.mark.slow, pytest.mark.timeout(300)]


def train_workers() -> list[psutil.Process]:
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()) or "RayTrainWorker" in p.name():
                out.append(p)
        except psutil.Error:
            pass
    return out


def test_worker_sigkill_resumes_from_checkpoint(local_ray, tmp_path, reliability):
    root = str(tmp_path)
    download, embed = make_dataset(root, n_shards=2, per_shard=6)
    steps = 40
    cfg = prior.PriorTrainConfig(**tiny_train_kwargs(steps=steps, checkpoint_every_steps=4, keep_last=3,
                                                     num_workers=1, cpus_per_worker=1, max_failures=1))
    ctx = stage_ctx(root, "train_prior", download, embed, ray_enabled=True)
    ckpt4 = store.join(ctx.out_uri, "checkpoints", "step_00000004", "COMPLETE")
    killed: dict = {}

    def killer():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not store.exists(ckpt4):
            time.sleep(0.05)
        for p in train_workers():
            killed.setdefault("pids", []).append(p.pid)
            os.kill(p.pid, signal.SIGKILL)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    result = train_stage(prior.SPEC, cfg, ctx)
    t.join(timeout=5)

    assert killed.get("pids"), "no RayTrainWorker process was found to kill"
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in killed["pids"])
    assert result.counts["steps"] == steps
    assert result.counts.get("resumed_from_step", -1) >= 4, result.counts
    lines = [json.loads(x) for x in store.read_bytes(result.outputs["metrics"]).decode().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, steps + 1)), "every step logged once across the restart"
    assert store.exists(store.join(ctx.out_uri, "checkpoints", f"step_{steps:08d}", "COMPLETE"))
    reliability.record(kind="fault", name="Ray Train worker SIGKILL mid-stage", survived=True, lost_checkpoints=0,
                       detail=f"restarted, resumed from step {result.counts['resumed_from_step']}, "
                              f"finished {steps} steps")
