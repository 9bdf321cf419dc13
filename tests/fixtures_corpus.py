"""Shared fixtures: a demo corpus (with deliberately bad rows) served on 127.0.0.1, and an S3
endpoint (moto's server) on 127.0.0.1. Import the fixtures into a test module by name:

    from fixtures_corpus import served_corpus, moto_s3  # noqa: F401
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from data_prep.demo_corpus import CorpusInfo, make_demo_corpus
from data_prep.http_server import DemoHTTPServer

# Small enough for 2 CPU cores, big enough for every kind of bad row (bomb included) and 3 shards.
CORPUS_IMAGES = 40
CORPUS_IMAGE_SIZE = 64
CORPUS_SEED = 7
CORPUS_BAD_FRACTION = 0.25


@dataclass
class ServedCorpus:
    info: CorpusInfo
    server: DemoHTTPServer
    root: str


@pytest.fixture(scope="session")
def served_corpus(tmp_path_factory) -> ServedCorpus:
    root = str(tmp_path_factory.mktemp("demo_corpus"))
    with DemoHTTPServer(root) as server:
        info = make_demo_corpus(root, CORPUS_IMAGES, CORPUS_IMAGE_SIZE, CORPUS_SEED, CORPUS_BAD_FRACTION,
                                base_url=server.base_url, include_bomb=True)
        yield ServedCorpus(info=info, server=server, root=root)


@pytest.fixture
def moto_s3(monkeypatch):
    """An S3 endpoint on 127.0.0.1 with bucket ``t2i-test``; AWS_* env points every client at it
    (including child processes, which inherit os.environ). Yields the bucket name."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for k, v in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_SESSION_TOKEN": "testing",
    }.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="t2i-test")
    # s3fs caches filesystem instances per arguments; a stale one would point at a dead endpoint.
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield "t2i-test"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def no_network_env() -> dict[str, str]:
    return {"HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}


@pytest.fixture(autouse=False)
def offline(monkeypatch):
    for k, v in no_network_env().items():
        monkeypatch.setenv(k, v)
    yield


