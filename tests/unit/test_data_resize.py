"""stages/training/data_resize.py: across a change of ranks (or loader workers) every sample of
the interrupted epoch is trained exactly once: no replay, no skip (the real loader, real shards)."""
from __future__ import annotations

from collections import Counter

import pytest

from pipeline import store
from stages.training.data_resize import redistribute
from stages.training.loader import LoaderError, LoaderSpec, PositionTracker, make_loader, pair_shards
from tests.support.data import make_dataset

SEED = 5


def _train(shards, states, world: int, K: int, batches: int, seen: list) -> list[dict]:
    """Each of ``world`` ranks takes ``batches`` batches from its loader (resumed from
    ``states[r]``), as the training loop does; returns the states its checkpoint would hold."""
    out = []
    for r in range(world):
        state = states[r] if states else None
        tracker = PositionTracker(K, world, state)
        loader = make_loader(shards, LoaderSpec(16, 2, SEED, r, world), state, K)
        for _, batch in zip(range(batches), loader):
            tracker.update(batch)
            seen.extend(zip(batch["epochs"], batch["keys"]))
        out.append(tracker.state())
    return out


def _resize(shards, states, world: int, K: int) -> list[dict]:
    return redistribute(states, n_shards=len(shards), seed=SEED, workers=K, world_size=world)


def _assert_exactly_once(seen: list, expected: set[str], complete_epochs: int) -> None:
    by_epoch: dict[int, Counter] = {}
    for epoch, key in seen:
        by_epoch.setdefault(epoch, Counter())[key] += 1
    for epoch, counts in sorted(by_epoch.items()):
        twice = sorted(k for k, n in counts.items() if n > 1)
        assert not twice, f"epoch {epoch}: trained more than once: {twice}"
        if epoch < complete_epochs:
            assert set(counts) == expected, f"epoch {epoch}: never trained: {sorted(expected - set(counts))}"


# (ranks, loader workers) before -> after; 3 and 5 shards: fewer / more shards than logical workers
@pytest.mark.parametrize("n_shards", [3, 5])
@pytest.mark.parametrize("before,after", [((2, 1), (3, 1)), ((3, 1), (2, 1)), ((2, 2), (3, 1)), ((1, 1), (2, 2))])
def test_every_sample_of_the_epoch_once_across_a_change(tmp_path, n_shards, before, after):
    download, embed = make_dataset(str(tmp_path), n_shards=n_shards, per_shard=5, corrupt=("000010002",))
    shards = pair_shards(store.join(download, "shards"), store.join(embed, "shards"))
    expected = {f"{s:05d}{i:04d}" for s in range(n_shards) for i in range(5)} - {"000010002"}
    seen: list = []
    states = _train(shards, None, *before, batches=2, seen=seen)
    states = _train(shards, _resize(shards, states, *after), *after, batches=12, seen=seen)
    assert sum(s["samples"] for s in states) == len(seen)  # rank 0 carries the count from before the change
    # epoch 0 whole, and no sample twice in any epoch (workers with more shards lag into epoch 1)
    _assert_exactly_once(seen, expected, complete_epochs=1)


def test_a_second_change_during_the_plan(tmp_path):
    """2 -> 3 ranks, then 3 -> 2 before the redistributed remainder was used up: still exact."""
    download, embed = make_dataset(str(tmp_path), n_shards=4, per_shard=6)
    shards = pair_shards(store.join(download, "shards"), store.join(embed, "shards"))
    expected = {f"{s:05d}{i:04d}" for s in range(4) for i in range(6)}
    seen: list = []
    states = _train(shards, None, 2, 1, batches=2, seen=seen)
    states = _train(shards, _resize(shards, states, 3, 1), 3, 1, batches=1, seen=seen)
    assert any("plan" in p for s in states for p in s["positions"].values()), "the change came mid-plan"
    states = _train(shards, _resize(shards, states, 2, 1), 2, 1, batches=14, seen=seen)
    _assert_exactly_once(seen, expected, complete_epochs=2)


def test_a_resized_run_resumes_exactly_at_the_same_size(tmp_path):
    """After a change, a same-size resume (the plan in the checkpoint) continues batch for batch."""
    download, embed = make_dataset(str(tmp_path), n_shards=3, per_shard=5)
    shards = pair_shards(store.join(download, "shards"), store.join(embed, "shards"))
    states = _resize(shards, _train(shards, None, 2, 1, batches=2, seen=[]), 3, 1)
    straight, interrupted = [], []
    _train(shards, states, 3, 1, batches=6, seen=straight)
    mid = _train(shards, states, 3, 1, batches=2, seen=interrupted)
    _train(shards, mid, 3, 1, batches=4, seen=interrupted)
    assert sorted(interrupted) == sorted(straight)
    with pytest.raises(LoaderError, match="redistribute"):
        make_loader(shards, LoaderSpec(16, 2, SEED, 0, 2), states[0], 1)
