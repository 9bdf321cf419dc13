"""The loader's decoded-image cache (stages/training/loader.py): later epochs read decoded shards from
memory, not from the store, and yield exactly the batches (crops, flips, skips) they would
without it; a corpus over the budget streams every epoch as before."""
from __future__ import annotations

import os

import pytest
import torch

from pipeline import store
from stages.training.loader import LoaderError, LoaderSpec, ShardStream, pair_shards
from tests.support.data import make_dataset


def _batches(shards, n: int, **spec):
    it = iter(ShardStream(shards, LoaderSpec(16, 4, seed=3, **spec)))
    return [next(it) for _ in range(n)]


def test_cached_epochs_are_the_streamed_ones_bit_for_bit(tmp_path):
    # non-square images (random crops), flips on, a corrupt image (skipped and counted), 3 epochs
    download, embed = make_dataset(str(tmp_path), n_shards=2, per_shard=6, image_size=(24, 20),
                                   corrupt=("000010003",))
    shards = pair_shards(store.join(download, "shards"), store.join(embed, "shards"))
    streamed = _batches(shards, 8, cache_bytes=0)
    cached = _batches(shards, 8)
    for a, b in zip(streamed, cached):
        assert a["keys"] == b["keys"] and a["skipped"] == b["skipped"] and a["position"] == b["position"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["t5_tokens"], b["t5_tokens"])
    assert cached[-1]["skipped"] >= 2  # the corrupt row is skipped again in every epoch


def test_a_cached_corpus_never_reopens_its_tars(tmp_path):
    download, embed = make_dataset(str(tmp_path), n_shards=1, per_shard=8)
    shards = pair_shards(store.join(download, "shards"), store.join(embed, "shards"))
    stream = iter(ShardStream(shards, LoaderSpec(16, 4, seed=0)))
    first_epoch = [next(stream) for _ in range(2)]
    tar = store.local_path(shards[0].tar_uri)
    os.rename(tar, tar + ".gone")   # later epochs come from memory: the tar is not needed
    later = [next(stream) for _ in range(4)]
    assert sorted(k for b in later[:2] for k in b["keys"]) == sorted(k for b in first_epoch for k in b["keys"])
    assert not all(torch.equal(a["image"], b["image"]) for a, b in zip(first_epoch, later))  # new flips


def test_over_the_budget_it_streams_every_epoch(tmp_path):
    download, embed = make_dataset(str(tmp_path), n_shards=1, per_shard=8)
    shards = pair_shards(store.join(download, "shards"), store.join(embed, "shards"))
    stream = iter(ShardStream(shards, LoaderSpec(16, 4, seed=0, cache_bytes=1000)))  # < one shard
    [next(stream) for _ in range(2)]
    tar = store.local_path(shards[0].tar_uri)
    os.rename(tar, tar + ".gone")
    with pytest.raises((OSError, LoaderError)):  # the next epoch reads the store again: the tar is gone
        next(stream)
