"""A damaged checkpoint is detected before anything reads it and the previous one is used
(issue 24, item 5): COMPLETE lists every file with its size and SHA-256, every rank verifies what
it fetches, and a restore skips a checkpoint any rank found damaged, with one warning."""
from __future__ import annotations

import dataclasses
import os

import pytest

from pipeline import layout, store
from pipeline.run.gc import checkpoint_garbage, checkpoint_damage
from stages.models import imagen_base as base
from tests.support.data import make_dataset
from tests.support.train import stage_ctx, tiny_train_kwargs


def _train(tmp_path, steps: int, said: list[str]):
    download, embed = make_dataset(str(tmp_path / "data"), n_shards=1, per_shard=6)
    ctx = dataclasses.replace(stage_ctx(str(tmp_path), "train_base", download, embed), progress=said.append)
    cfg = base.BaseTrainConfig(**tiny_train_kwargs(steps=steps, checkpoint_every_steps=2, keep_last=5))
    return base.run(cfg, ctx), ctx


def _truncate(checkpoint: str) -> str:
    """Cut the first DeepSpeed file COMPLETE lists to half its size (a partial copy); its name."""
    listing = store.read_json(store.join(checkpoint, layout.CHECKPOINT_COMPLETE))["files"]
    victim = sorted(rel for rel in listing if rel.startswith(layout.CHECKPOINT_DEEPSPEED + "/"))[0]
    path = store.local_path(store.join(checkpoint, victim))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return victim


def test_complete_lists_every_file_with_size_and_checksum(tmp_path):
    _, ctx = _train(tmp_path, 2, [])
    ckpt = store.join(ctx.out_uri, layout.CHECKPOINTS, layout.step_name(2))
    listing = store.read_json(store.join(ckpt, layout.CHECKPOINT_COMPLETE))["files"]
    on_disk = {os.path.relpath(os.path.join(d, n), store.local_path(ckpt))
               for d, _, names in os.walk(store.local_path(ckpt)) for n in names}
    on_disk -= {layout.CHECKPOINT_COMPLETE, layout.checkpoint_uploaded(0)}
    assert set(listing) == on_disk
    for rel, digest in listing.items():
        assert digest["bytes"] == os.path.getsize(os.path.join(store.local_path(ckpt), rel))
        assert len(digest["sha256"]) == 64


def test_a_truncated_file_falls_back_to_the_previous_checkpoint_with_one_warning(tmp_path):
    said: list[str] = []
    _, ctx = _train(tmp_path, 4, said)
    newest = store.join(ctx.out_uri, layout.CHECKPOINTS, layout.step_name(4))
    victim = _truncate(newest)
    said.clear()
    result, _ = _train(tmp_path, 6, said)   # extend: the newest checkpoint (step 4) is damaged
    assert result.counts["resumed_from_step"] == 2 and result.counts["damaged_checkpoints_skipped"] == 1
    warnings = [m for m in said if m.startswith("warning:")]
    assert len(warnings) == 1 and layout.step_name(4) in warnings[0] and victim in warnings[0], warnings
    assert result.counts["steps"] == 6
    # The restore marked it (no later restore fetches it again) and kept it: `t2i gc` lists it
    assert store.exists(store.join(newest, layout.CHECKPOINT_DAMAGED)) and store.exists(store.join(newest, victim))
    [listed] = [g for g in checkpoint_garbage("train_base", ctx.out_uri) if g.kind == "damaged-checkpoint"]
    assert listed.uri.endswith(layout.step_name(4)) and victim in listed.note


def test_gc_finds_a_truncated_checkpoint_from_one_listing(tmp_path):
    """Before any restore: the sizes in one listing against COMPLETE's (no download)."""
    _, ctx = _train(tmp_path, 4, [])
    victim = _truncate(store.join(ctx.out_uri, layout.CHECKPOINTS, layout.step_name(2)))
    assert checkpoint_damage(store.join(ctx.out_uri, layout.CHECKPOINTS, layout.step_name(4))) is None
    why = checkpoint_damage(store.join(ctx.out_uri, layout.CHECKPOINTS, layout.step_name(2)))
    assert why is not None and victim in why and "COMPLETE says" in why


def test_every_checkpoint_damaged_is_one_clear_error(tmp_path):
    _, ctx = _train(tmp_path, 4, [])
    for step in (2, 4):
        _truncate(store.join(ctx.out_uri, layout.CHECKPOINTS, layout.step_name(step)))
    with pytest.raises(Exception, match="every complete checkpoint under .* is damaged.*t2i rerun"):
        _train(tmp_path, 6, [])


class _Engine:
    """What CheckpointManager needs of a DeepSpeed engine: a snapshot written to a local folder."""

    def save_checkpoint(self, folder: str, tag: str, save_latest: bool) -> None:
        os.makedirs(os.path.join(folder, tag), exist_ok=True)
        with open(os.path.join(folder, tag, "mp_rank_00_model_states.pt"), "wb") as f:
            f.write(os.urandom(1 << 16))


@pytest.mark.parametrize("background", [False, True])
def test_a_slow_upload_blocks_the_loop_only_when_synchronous(tmp_path, monkeypatch, background):
    import time

    import torch

    from stages.training import checkpoint

    real = checkpoint._upload_dir

    def slow_store(local, uri):  # a store 0.6 s away: the same upload, with added latency
        time.sleep(0.6)
        real(local, uri)

    monkeypatch.setattr(checkpoint, "_upload_dir", slow_store)
    m = checkpoint.CheckpointManager(str(tmp_path), keep_last=2, every_steps=1, every_minutes=0, rank=0,
                                     world_size=1, device=torch.device("cpu"))
    t0 = time.perf_counter()
    uri = m.save(_Engine(), 1, {"data": {}}, {"w": torch.zeros(2)}, ema_sharded=False, background=background)
    returned = time.perf_counter() - t0
    complete = store.join(uri, layout.CHECKPOINT_COMPLETE)
    if background:
        assert returned < 0.4 and not store.exists(complete)  # training goes on while it uploads
        m.wait()
    else:
        assert returned >= 0.6
    assert store.exists(complete) and m.latest() == (1, uri)


def test_a_background_save_over_the_disk_budget_is_uploaded_synchronously(tmp_path):
    import torch

    from stages.training import checkpoint

    m = checkpoint.CheckpointManager(str(tmp_path), keep_last=2, every_steps=1, every_minutes=0, rank=0,
                                     world_size=1, device=torch.device("cpu"), background_budget_bytes=1 << 15)
    uri = m.save(_Engine(), 1, {"data": {}}, None, ema_sharded=False, background=True)  # a 64 KiB snapshot
    assert m.sync_fallbacks == 1 and m.snapshot_bytes > 1 << 16
    assert store.exists(store.join(uri, layout.CHECKPOINT_COMPLETE))  # complete when save returned
