"""Resuming on another number of ranks (issue 24): 2 -> 3 -> 2 Ray Train workers under ZeRO-3
(CPU, gloo, real DeepSpeed Universal Checkpoints) through the whole training stage: it goes on
where it stopped and every sample of the epoch is trained exactly once across the changes. The
state itself (weights, optimizer, LR schedule, EMA) is checked to the bit for ZeRO 0-3 in both
directions by tests/stages/test_checkpoint_resize.py; the redistribution of the data for many
more shapes by tests/unit/test_data_resize.py."""
from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import torch

from pipeline import store
from stages.models import imagen_base as base
from stages.training.elastic import elastic_reads
from stages.training.hooks import RecordTrainedKeys
from stages.training.trainer import train_stage
from tests.support.data import make_dataset
from tests.support.train import stage_ctx, tiny_train_kwargs

pytestmark = pytest.mark.slow


def _train(root, name, download, embed, *, zero, workers, steps, keys_dir):
    cfg = base.BaseTrainConfig(**tiny_train_kwargs(zero_stage=zero, num_workers=workers, cpus_per_worker=0.5,
                                                   steps=steps, checkpoint_every_steps=1, ema_decay=0.5))
    ctx = stage_ctx(root, name, download, embed, ray_enabled=True)
    return train_stage(base.SPEC, cfg, ctx, after_step=RecordTrainedKeys(keys_dir)), ctx


def _trained(keys_dir: str) -> list[tuple[int, str]]:
    out = []
    for name in sorted(os.listdir(keys_dir)):
        with open(os.path.join(keys_dir, name)) as f:
            for line in f:
                row = json.loads(line)
                out += list(zip(row["epochs"], row["keys"]))
    return out


def test_resume_on_three_then_two_ranks(local_ray, tmp_path):
    zero = 3  # the partitioned case (EMA too); every ZeRO stage's state, to the bit: test_checkpoint_resize.py
    root, keys = str(tmp_path / "run"), str(tmp_path / "keys")
    download, embed = make_dataset(root, n_shards=3, per_shard=4)
    all_keys = {f"{s:05d}{i:04d}" for s in range(3) for i in range(4)}

    _train(root, "train_base", download, embed, zero=zero, workers=2, steps=2, keys_dir=keys)
    listing = store.read_json(store.join(root, "train_base", "checkpoints", "step_00000002", "COMPLETE"))["files"]
    whole = sum(d["bytes"] for rel, d in listing.items() if elastic_reads(rel, ema_sharded=True))
    grown, _ = _train(root, "train_base", download, embed, zero=zero, workers=3, steps=4, keys_dir=keys)
    assert grown.counts["resumed_from_step"] == 2 and grown.counts["resumed_world_size_from"] == 2
    # a resized restore: every rank reads the whole checkpoint (all partitions, every old rank's
    # state and EMA partition; no old RNG state), the rule docs/scale.md and `t2i plan` state
    assert grown.counts["restore_bytes_read_max"] == whole and grown.counts["restore_bytes_read_total"] == 3 * whole
    shrunk, _ = _train(root, "train_base", download, embed, zero=zero, workers=2, steps=6, keys_dir=keys)
    assert shrunk.counts["resumed_from_step"] == 4 and shrunk.counts["resumed_world_size_from"] == 3
    assert shrunk.counts["steps"] == 6

    # 2x2x2 + 3x2x2 + 2x2x2 = 28 samples: epoch 0 whole and once, no sample twice in any epoch
    seen = _trained(keys)
    assert len(seen) == 28
    by_epoch: dict[int, Counter] = {}
    for epoch, key in seen:
        by_epoch.setdefault(epoch, Counter())[key] += 1
    assert set(by_epoch[0]) == all_keys and max(by_epoch[0].values()) == 1
    for epoch, counts in by_epoch.items():
        assert max(counts.values()) == 1, f"epoch {epoch}: {counts.most_common(2)}"
    lines = [json.loads(x) for x in store.read_bytes(shrunk.outputs["metrics"]).decode().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in lines)
