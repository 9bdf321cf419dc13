"""Resuming on another number of ranks (issue 24): 2 -> 3 -> 2 Ray Train workers under ZeRO-2 and
ZeRO-3 (CPU, gloo, real DeepSpeed Universal Checkpoints): the weights, optimizer and EMA go on
where they stopped, and every sample of the epoch is trained exactly once across the changes."""
from __future__ import annotations

import json
import os
import shutil
from collections import Counter

import pytest
import torch
from safetensors.torch import load as st_load

from pipeline import store
from stages.models import imagen_base as base
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


def _assert_ema_survives_resize(root, ctx, first, download, embed, keys_dir) -> None:
    """The ZeRO-3 EMA partitions re-sliced onto 3 ranks and consolidated again equal what 2 ranks
    wrote, bit for bit: a copy of the stage resumed on 3 ranks with nothing left to train writes
    the restored EMA as its weights. (ZeRO 0-2 keep one whole EMA file: nothing to re-slice.)"""
    shutil.copytree(os.path.join(ctx.out_uri, "checkpoints"), os.path.join(root, "train_base_copy", "checkpoints"))
    same, _ = _train(root, "train_base_copy", download, embed, zero=3, workers=3, steps=2, keys_dir=keys_dir)
    assert same.counts["resumed_from_step"] == 2 and same.counts["resumed_world_size_from"] == 2
    a, b = (st_load(store.read_bytes(r.outputs["weights"])) for r in (first, same))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("zero", [2, 3])
def test_resume_on_three_then_two_ranks(local_ray, tmp_path, zero):
    root, keys = str(tmp_path / "run"), str(tmp_path / "keys")
    download, embed = make_dataset(root, n_shards=3, per_shard=4)
    all_keys = {f"{s:05d}{i:04d}" for s in range(3) for i in range(4)}

    first, ctx = _train(root, "train_base", download, embed, zero=zero, workers=2, steps=2, keys_dir=keys)
    if zero == 3:
        _assert_ema_survives_resize(root, ctx, first, download, embed, str(tmp_path / "unused"))

    grown, _ = _train(root, "train_base", download, embed, zero=zero, workers=3, steps=4, keys_dir=keys)
    assert grown.counts["resumed_from_step"] == 2 and grown.counts["resumed_world_size_from"] == 2
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
