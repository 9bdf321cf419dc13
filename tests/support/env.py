"""The services and settings tests run against (a pytest plugin, listed in tests/conftest.py): a
real S3 endpoint (moto's server on 127.0.0.1), a fresh local Ray, one torch thread."""
from __future__ import annotations

import pytest

from pipeline.executors import free_port  # the one free-port helper


@pytest.fixture(scope="session")
def moto_server():
    """A real S3 API on loopback; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
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
