"""Artifact store round-trips on file:// and on a real S3 endpoint (moto on loopback)."""
from __future__ import annotations

import pytest

from pipeline import store


@pytest.fixture(params=["file", "s3"])
def root(request, tmp_path):
    if request.param == "file":
        return store.normalize(str(tmp_path / "store"))
    return request.getfixturevalue("s3_bucket") + "/runs"


def test_round_trip(root):
    uri = store.join(root, "run1", "stage", "a.bin")
    store.write_bytes_atomic(uri, b"\x00hello")
    assert store.exists(uri)
    assert store.read_bytes(uri) == b"\x00hello"
    assert store.size(uri) == 6
    store.write_json(store.join(root, "run1", "stage", "m.json"), {"k": [1, 2]})
    assert store.read_json(store.join(root, "run1", "stage", "m.json")) == {"k": [1, 2]}
    children = store.listdir(store.join(root, "run1", "stage"))
    assert [c.rsplit("/", 1)[1] for c in children] == ["a.bin", "m.json"]
    assert store.glob(store.join(root, "run1", "stage", "*.bin")) == [uri]
    with store.open_uri(store.join(root, "run1", "big.txt"), "wb") as f:
        f.write(b"x" * 100_000)
    assert store.size(store.join(root, "run1", "big.txt")) == 100_000
    store.remove(store.join(root, "run1"))
    assert not store.exists(uri)
    assert store.listdir(store.join(root, "run1")) == []


def test_atomic_write_leaves_no_temp_files(tmp_path):
    uri = store.normalize(str(tmp_path / "d" / "f.json"))
    for i in range(3):
        store.write_json(uri, {"i": i})
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["f.json"]


def test_unsupported_scheme_named():
    with pytest.raises(ValueError, match="unsupported store URI scheme 'ftp'.*file, s3, gs"):
        store.fs_and_path("ftp://host/x")


def test_retries_then_clear_error():
    calls = []

    def flaky():
        calls.append(1)
        raise ConnectionError("endpoint down")

    with pytest.raises(store.StoreError, match="write x failed after 3 attempts: endpoint down"):
        store.with_retries(flaky, what="write x", attempts=3, base_delay=0.001)
    assert len(calls) == 3

    seq = iter([OSError("blip"), "ok"])

    def once_flaky():
        v = next(seq)
        if isinstance(v, Exception):
            raise v
        return v

    assert store.with_retries(once_flaky, what="w", attempts=3, base_delay=0.001) == "ok"


def test_missing_file_is_not_retried(tmp_path):
    with pytest.raises(FileNotFoundError):
        store.read_bytes(store.normalize(str(tmp_path / "nope")))


def test_a_glob_sees_files_written_below_folders_it_listed_before(s3_bucket):
    """s3fs caches listings per process and invalidate_cache forgets only a path and its parents:
    a glob through child folders listed earlier (``checkpoints/step_*/COMPLETE``) must still see
    a file written there since (by another process, as a checkpoint's COMPLETE is)."""
    import boto3
    import os

    store.write_json(f"{s3_bucket}/c/step_1/a.json", {})
    assert store.glob(f"{s3_bucket}/c/step_*/COMPLETE") == []
    bucket = s3_bucket[len("s3://"):]
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1").put_object(
        Bucket=bucket, Key="c/step_1/COMPLETE", Body=b"{}")  # another writer: not through this process's cache
    assert store.glob(f"{s3_bucket}/c/step_*/COMPLETE") == [f"{s3_bucket}/c/step_1/COMPLETE"]
