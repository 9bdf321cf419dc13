"""Shared fixtures: offline mode, a real S3 endpoint (moto's server on 127.0.0.1)."""
from __future__ import annotations

import os

import pytest

# The reliability summary (fixture `reliability` + the end-of-session block): see reliability_summary.py.
from reliability_summary import pytest_sessionfinish, pytest_terminal_summary, reliability  # noqa: F401,E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("WANDB_MODE", "disabled")


from pipeline.executors import free_port as _free_port  # noqa: E402  (the one free-port helper)


@pytest.fixture(scope="session")
def moto_server():
    """A real S3 API on loopback; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(moto_server, monkeypatch):
    """A fresh bucket; the AWS environment points at moto (as a user's would point at S3)."""
    import uuid

    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-do-not-log")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    name = f"t2i-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket=name)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield f"s3://{name}"
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def local_ray():
    """A fresh local Ray for one test module (address='local' never joins someone else's cluster)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def single_thread_torch():
    """For modules of tiny tensors: intra-op threads only add overhead, and on a shared 2-core
    machine spin-waiting OpenMP workers made such tests 10-40x slower. Restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One finished run of the shipped smoke spec (no Ray), shared by the end-to-end tests that
    only read it: ``(working dir, run URI)``. Tests that change a run make their own."""
    import subprocess
    import sys
    from pathlib import Path

    spec = Path(__file__).resolve().parents[1] / "pipeline" / "configs" / "smoke.yaml"
    cwd = tmp_path_factory.mktemp("smoke-shared")
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(spec), "--no-ray"], cwd=cwd,
                       capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stdout + p.stderr
    return cwd, f"file://{cwd}/runs/smoke"
