"""pipeline/run/lease.py and store.create_exclusive: one driver per stage attempt, on file:// and
on a real S3 endpoint (moto's server on 127.0.0.1)."""
from __future__ import annotations

import threading
import time

import pytest

from pipeline import store
from pipeline.run.lease import LeaseHeld, LeaseKeeper, read_lease


@pytest.fixture(params=["file", "s3"])
def attempt(request, tmp_path):
    if request.param == "file":
        return str(tmp_path / "run" / "train_base" / "abc123")
    return request.getfixturevalue("s3_bucket") + "/run/train_base/abc123"


def test_create_exclusive_has_one_winner_among_racing_writers(attempt):
    uri = store.join(attempt, "_X.json")
    wins, go = [], threading.Barrier(6)

    def race(i: int) -> None:
        go.wait()
        if store.create_exclusive(uri, f"writer {i}".encode()):
            wins.append(i)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and store.read_bytes(uri) == f"writer {wins[0]}".encode()
    assert not store.create_exclusive(uri, b"late")


def test_a_live_lease_is_refused_naming_its_owner_and_released_only_by_it(attempt):
    said: list[str] = []
    first, second = LeaseKeeper(interval=60, log=said.append), LeaseKeeper(interval=60, log=said.append)
    first.acquire("train_base", attempt)
    with pytest.raises(LeaseHeld, match=r"train_base is being worked on by pid \d+ on "):
        second.acquire("train_base", attempt)
    second.close()  # holds nothing: must not remove the first's lease
    assert read_lease(attempt)["token"] == first.held[attempt].doc["token"]
    first.close()
    assert read_lease(attempt) is None
    second.acquire("train_base", attempt)  # free again
    assert second.takeover_record(attempt)["owner"]["pid"] > 0 and "took_over_from" not in second.takeover_record(attempt)
    second.close()


def test_heartbeats_keep_a_lease_alive_and_a_silent_one_is_taken_over(attempt):
    said: list[str] = []
    alive = LeaseKeeper(interval=0.3, log=said.append)
    alive.acquire("train_base", attempt)
    time.sleep(1.6)  # > 4 intervals: only the heartbeats keep it
    with pytest.raises(LeaseHeld):
        LeaseKeeper(interval=0.3, log=said.append).acquire("train_base", attempt)
    alive._stop.set()  # the driver dies: no more heartbeats (and no release)
    time.sleep(1.6)
    taker = LeaseKeeper(interval=0.3, log=said.append)
    taker.acquire("train_base", attempt)
    assert any("taking over the lease" in m and "(expired)" in m for m in said), said
    assert taker.takeover_record(attempt)["took_over_from"] == alive.owner
    taker.close()


def test_a_driver_whose_lease_was_taken_over_finds_out_at_its_next_heartbeat(attempt):
    said: list[str] = []
    slow = LeaseKeeper(interval=0.2, log=said.append)
    slow.acquire("train_base", attempt)
    LeaseKeeper(interval=0.2, log=said.append).acquire("train_base", attempt, take_over=True)
    time.sleep(0.6)
    with pytest.raises(RuntimeError, match="lost its lease"):
        slow.check(attempt)
    assert any("lease lost" in m for m in said)
    slow.close()
    assert read_lease(attempt) is not None  # the loser never removes the winner's lease


def test_commands_that_write_one_folder_hold_its_lease_while_they_write(tmp_path):
    """`t2i embed --out` and `t2i eval`: leased() around the work, released after it."""
    from pipeline.run.lease import leased

    out = str(tmp_path / "embeddings")
    with leased("embed", out, log=lambda m: None):
        with pytest.raises(LeaseHeld, match="embed is being worked on by pid"):
            with leased("embed", out, log=lambda m: None):
                pass
    assert read_lease(out) is None
