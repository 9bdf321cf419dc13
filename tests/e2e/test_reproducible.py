"""Same spec, same machine -> same bits (issue 26): a second run of the smoke spec's download,
embed and train_base in a fresh store, with 1 download thread instead of the smoke spec's 4, gives
byte-identical shards, embeddings and trained weights to the shared smoke run."""
from __future__ import annotations

import glob
import os

import pytest

from tests.support.cli import t2i
from tests.support.specs import smoke_spec, write_spec

pytestmark = pytest.mark.slow
STAGES = ("download", "embed", "train_base")


def test_a_second_run_in_a_fresh_store_gives_the_same_bytes(smoke_run, tmp_path):
    cwd, _ = smoke_run
    spec = write_spec(tmp_path / "spec.yaml", smoke_spec(only=STAGES))
    r = t2i("run", spec, "--no-ray", "--set", "download.thread_count=1", cwd=tmp_path, timeout=600)
    assert r.code == 0, r.output
    compared = 0
    for stage in STAGES:
        for pattern in ("shards/*.tar", "shards/*.parquet", "shards/*.npz", "final/*/model.safetensors"):
            for ours in glob.glob(os.path.join(tmp_path, "runs", "smoke", stage, "*", pattern)):
                rel = os.path.relpath(ours, tmp_path)
                with open(ours, "rb") as a, open(os.path.join(cwd, rel), "rb") as b:
                    assert a.read() == b.read(), rel
                compared += 1
    assert compared >= 2 * 2 + 2 + 1  # 2 tars and parquets, 2 embedding shards, the weights
