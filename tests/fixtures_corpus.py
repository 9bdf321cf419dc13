"""Shared fixture: a demo corpus (with every kind of deliberately bad row) served on 127.0.0.1.
Import it into a test module by name (the S3 endpoint is conftest.py's ``s3_bucket``):

    from fixtures_corpus import served_corpus  # noqa: F401
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
