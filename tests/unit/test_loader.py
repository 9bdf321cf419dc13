"""stages/training/loader.py: shard pairing, splitting across ranks/workers, alignment errors, exact resume, S3."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data_prep.embed_format import write_embedding_shard
from pipeline import store
from stages.training.loader import (LoaderError, LoaderSpec, PositionTracker, ShardStream, make_loader, pair_shards)
from tests.support.data import embedding_shard, make_dataset


def _epoch_keys(shards, spec: LoaderSpec, g: int, G: int) -> list[str]:
    """Keys logical worker g of G yields in epoch 0."""
    out = []
    for sample, pos, _ in ShardStream(shards, spec)._samples(g, G, {}):
        if pos["epoch"] > 0:
            break
        out.append(sample["key"])
    return out


@pytest.mark.parametrize("n_shards", [4, 2])  # >= and < the 4 logical workers
def test_split_covers_every_sample_once_per_epoch(tmp_path, n_shards):
    download, embed = make_dataset(str(tmp_path), n_shards=n_shards, per_shard=5, not_embedded=("000000001",),
                                   corrupt=("000010002",))
    shards = pair_shards(store.join(download, "shards"), store.join(embed, "shards"))
    spec = LoaderSpec(image_size=16, batch_size=2, seed=3)
    per_worker = [_epoch_keys(shards, spec, g, 4) for g in range(4)]
    flat = [k for keys in per_worker for k in keys]
    expected = {f"{s:05d}{i:04d}" for s in range(n_shards) for i in range(5)} - {"000000001", "000010002"}
    assert len(flat) == len(set(flat)), "a sample was given to two workers"
    assert set(flat) == expected
    assert all(per_worker), "every worker gets data"


def test_batches_images_and_padding(tmp_path):
    download, embed = make_dataset(str(tmp_path), n_shards=1, per_shard=4, image_size=(24, 20))
    shards = pair_shards(store.join(download, "shards"), store.join(embed, "shards"))
    batch = next(iter(ShardStream(shards, LoaderSpec(16, 3, seed=0))))
    assert batch["image"].shape == (3, 3, 16, 16) and batch["image"].dtype == torch.uint8
    assert batch["keys"] == ["000000000", "000000001", "000000002"]
    t5, mask = batch["t5_tokens"], batch["t5_mask"]
    assert t5.shape[:2] == mask.shape and t5.shape[-1] == 8
    emb = embedding_shard(["000000000", "000000001", "000000002"])
    lengths = mask.sum(1).tolist()
    assert lengths == emb.t5_lengths.tolist()
    np.testing.assert_array_equal(t5[1, : lengths[1]].numpy(), emb.t5_of(1))
    assert not t5[mask.logical_not()].any()
    # Crops/flips are a pure function of (seed, epoch, shard, row): same seed, same pixels.
    again = next(iter(ShardStream(shards, LoaderSpec(16, 3, seed=0))))
    assert torch.equal(batch["image"], again["image"])
    other = next(iter(ShardStream(shards, LoaderSpec(16, 3, seed=1))))
    assert not torch.equal(batch["image"], other["image"])


def test_prior_reads_embeddings_only(tmp_path):
    _, embed = make_dataset(str(tmp_path), n_shards=2, per_shard=3)
    shards = pair_shards(None, store.join(embed, "shards"))
    assert all(s.tar_uri is None for s in shards)
    batch = next(iter(ShardStream(shards, LoaderSpec(None, 2, seed=0))))
    assert "image" not in batch and batch["clip_image"].shape == (2, 8)


def test_misaligned_keys_name_shard_and_key(tmp_path):
    download, embed = make_dataset(str(tmp_path), n_shards=1, per_shard=4)
    npz = store.join(embed, "shards", "00000.npz")
    # Out of order relative to the tar.
    write_embedding_shard(npz, embedding_shard(["000000001", "000000000", "000000002"]))
    with pytest.raises(LoaderError, match=r"00000\.npz is misaligned with .*00000\.tar.*000000000"):
        next(iter(ShardStream(pair_shards(store.join(download, "shards"), store.join(embed, "shards")), LoaderSpec(16, 4, seed=0))))
    # A key the tar does not have.
    write_embedding_shard(npz, embedding_shard(["000000000", "000000999"]))
    with pytest.raises(LoaderError, match=r"key 000000999 \(row 1\) is not in the tar"):
        next(iter(ShardStream(pair_shards(store.join(download, "shards"), store.join(embed, "shards")), LoaderSpec(16, 4, seed=0))))
    # A tar without embeddings.
    store.remove(npz)
    with pytest.raises(LoaderError, match=r"00000\.tar has no embedding shard 00000\.npz"):
        pair_shards(store.join(download, "shards"), store.join(embed, "shards"))


def test_resume_from_position_continues_exactly(tmp_path):
    """3 batches, save, new loader from the state: the next batches equal an uninterrupted run's."""
    download, embed = make_dataset(str(tmp_path), n_shards=3, per_shard=5)
    shards = pair_shards(store.join(download, "shards"), store.join(embed, "shards"))
    spec = LoaderSpec(16, 2, seed=7, rank=1, world_size=2)

    straight = [b["keys"] for _, b in zip(range(10), make_loader(shards, spec, None, num_workers=2))]

    tracker = PositionTracker(2, 2)
    first = []
    for _, b in zip(range(3), make_loader(shards, spec, None, num_workers=2)):
        tracker.update(b)
        first.append(b["keys"])
    state = tracker.state()
    assert state["consumed"] == 3 and set(state["positions"]) == {"0", "1"}
    resumed = [b["keys"] for _, b in zip(range(7), make_loader(shards, spec, state, num_workers=2))]
    assert first + resumed == straight  # crosses shard and epoch boundaries (15 samples over 2x2 workers)

    with pytest.raises(LoaderError, match="redistribute it first"):
        make_loader(shards, spec, state, num_workers=1)


def test_reads_from_s3(s3_bucket, tmp_path):
    download, embed = make_dataset(s3_bucket + "/run", n_shards=2, per_shard=3)
    shards = pair_shards(store.join(download, "shards"), store.join(embed, "shards"))
    assert [s.tar_uri.rsplit("/", 1)[-1] for s in shards] == ["00000.tar", "00001.tar"]
    batch = next(iter(ShardStream(shards, LoaderSpec(16, 4, seed=0))))
    assert len(batch["keys"]) == 4 and batch["image"].shape == (4, 3, 16, 16)
