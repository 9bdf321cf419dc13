"""Checkpoint discovery/pruning, object-store checkpoints + resume, final weights without DeepSpeed,
EMA math, LR schedule and config validation."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from pydantic import ValidationError

from pipeline import store
from stages.training.final_weights import latest_final
from stages.models import imagen_base as base, prior, superres
from stages.training.checkpoint import CheckpointManager
from stages.training.ema import EMA
from stages.training.optim import WarmupCosine, build_scheduler
from stages.training.trainer import DistEnv, TrainJob, train_loop
from stages.training.config import TrainConfig
from tests.support.data import DIMS, make_dataset
from tests.support.train import tiny_train_kwargs


def _manager(uri: str, keep_last: int = 2) -> CheckpointManager:
    return CheckpointManager(uri, keep_last=keep_last, every_steps=0, every_minutes=0, rank=0, world_size=1,
                             device=torch.device("cpu"))


def test_latest_ignores_incomplete_and_prune_keeps_last_k(tmp_path):
    out = str(tmp_path)
    m = _manager(out, keep_last=2)
    assert m.latest() is None
    for step, complete in ((1, True), (2, False), (3, True), (4, True), (5, False)):
        d = store.join(out, "checkpoints", f"step_{step:08d}")
        store.write_bytes_atomic(store.join(d, "ds", "x.pt"), b"x")
        if complete:
            store.write_json(store.join(d, "COMPLETE"), {"step": step})
    assert m.latest() == (4, store.join(out, "checkpoints", "step_00000004"))
    m._prune()
    left = [u.rsplit("/", 1)[-1] for u in store.listdir(store.join(out, "checkpoints"))]
    # Old complete beyond K and stale incomplete go; a newer incomplete one (maybe being written) stays.
    assert left == ["step_00000003", "step_00000004", "step_00000005"]


def test_time_cadence():
    m = CheckpointManager("/tmp/unused", keep_last=1, every_steps=10, every_minutes=1.0, rank=0, world_size=1,
                          device=torch.device("cpu"))
    assert not m.due(3) and m.due(10)
    m._last_save_time -= 61
    assert m.due(3)


def test_checkpoints_on_s3_resume_and_final_loads_without_deepspeed(s3_bucket, tmp_path):
    download, embed = make_dataset(str(tmp_path / "data"), n_shards=1, per_shard=4)
    out = s3_bucket + "/run/train_base"
    job = TrainJob(out, store.join(download, "shards"), store.join(embed, "shards"), dict(DIMS))
    cfg = base.BaseTrainConfig(**tiny_train_kwargs(steps=2, checkpoint_every_steps=1, keep_last=1))
    assert train_loop(base.SPEC, cfg, job, DistEnv.from_env())["resumed_from"] == -1
    steps = [u.rsplit("/", 1)[-1] for u in store.listdir(store.join(out, "checkpoints"))]
    assert steps == ["step_00000002"]  # keep_last=1 pruned step 1
    ckpt = store.join(out, "checkpoints", "step_00000002")
    assert store.read_json(store.join(ckpt, "COMPLETE"))["step"] == 2
    state = store.read_json(store.join(ckpt, "state_rank0.json"))
    assert state["step"] == 2 and state["data"]["consumed"] == 2

    # Longer run over the same output: resumes from the object store at step 2.
    cfg3 = base.BaseTrainConfig(**tiny_train_kwargs(steps=3, checkpoint_every_steps=1, keep_last=1))
    assert train_loop(base.SPEC, cfg3, job, DistEnv.from_env())["resumed_from"] == 2
    assert store.read_json(store.join(latest_final(out), "config.json"))["step"] == 3

    # Consolidated weights load in a fresh interpreter where DeepSpeed cannot be imported.
    local = tmp_path / "final"
    local.mkdir()
    for name in ("model.safetensors", "config.json"):
        (local / name).write_bytes(store.read_bytes(store.join(latest_final(out), name)))
    code = textwrap.dedent(f"""
        import sys
        sys.modules["deepspeed"] = None  # any import of deepspeed now fails
        from stages.training.final_weights import load_final
        net, config = load_final({str(local)!r})
        import torch
        x = torch.zeros(1, 3, config.image_size, config.image_size)
        tokens = torch.zeros(1, 3, config.cond_dims["t5_dim"])
        y = net(x, torch.full((1,), 0.5), text_tokens=tokens, text_mask=torch.ones(1, 3, dtype=torch.bool))
        assert y.shape == x.shape and torch.isfinite(y).all()
        assert "deepspeed" not in [m for m in sys.modules if sys.modules[m] is not None]
        print("OK", config.role, config.step)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "OK base 3" in proc.stdout


def test_ema_update_matches_formula_and_roundtrips():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    ema = EMA(net, decay=0.9)
    start = [p.detach().clone() for p in net.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(step=100)  # decay_at(100) = min(0.9, 101/110) = 0.9
    for s, p0, p in zip(ema.shadow, start, net.parameters()):
        torch.testing.assert_close(s, 0.9 * p0 + 0.1 * p.detach())
    assert ema.decay_at(0) == pytest.approx(0.1)  # warmed-up decay early on
    # bf16 parameters (mixed-dtype path) into fp32 shadows.
    net16 = torch.nn.Linear(3, 4).to(torch.bfloat16)
    e16 = EMA(net16, decay=0.5)
    assert all(s.dtype == torch.float32 for s in e16.shadow)
    e16.update(step=100)
    # Checkpoint round trip, and a clear error for a mismatched state.
    other = EMA(net, decay=0.9)
    other.load_state_tensors(ema.state_tensors())
    assert all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow))
    with pytest.raises(ValueError, match="lacks 1 parameters"):
        other.load_state_tensors({k: v for k, v in list(ema.state_tensors().items())[1:]})
    full = ema.consolidated_state_dict(net)
    assert set(full) == set(net.state_dict())


def test_warmup_cosine_schedule():
    f = WarmupCosine(steps=10, warmup_steps=2, min_lr_ratio=0.1)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0) and f(10) == pytest.approx(0.1) and f(50) == pytest.approx(0.1)
    assert f(6) == pytest.approx(0.55)
    cfg = TrainConfig(steps=10, warmup_steps=2, lr=1.0)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    sched = build_scheduler(cfg, opt)
    assert sched.state_dict()["lr_lambdas"][0] == {"steps": 10, "warmup_steps": 2, "min_lr_ratio": 0.1}


@pytest.mark.parametrize("kwargs, message", [
    ({"zero_stage": 4}, "zero_stage must be one of 0, 1, 2, 3"),
    ({"cfg_drop_text": 1.5}, r"cfg_drop_text must be within \[0, 1\]"),
    ({"steps": 0}, "steps must be > 0"),
    ({"warmup_steps": 20, "steps": 10}, r"warmup_steps \(20\) must be <= steps \(10\)"),
    ({"resources": {"GPU": 1}}, "use cpus_per_worker / gpus_per_worker"),
    ({"ema_decay": 1.0}, r"ema_decay must be within \[0, 1\)"),
    ({"precision": "fp16"}, "precision"),
    ({"stepz": 3}, "stepz"),
])
def test_config_errors_name_field_and_allowed(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        base.BaseTrainConfig(**kwargs)


def test_stage_defaults():
    from stages.models.decoder import DecoderTrainConfig

    d = DecoderTrainConfig()
    assert (d.cfg_drop_text, d.cfg_drop_image) == (0.5, 0.1)
    assert base.BaseTrainConfig().cfg_drop_text == 0.1
    p = prior.PriorTrainConfig()
    assert (p.diffusion.prediction, p.diffusion.thresholding, p.cfg_drop_text) == ("x0", "none", 0.1)
    with pytest.raises(ValidationError, match="thresholding must be 'none' for the prior"):
        prior.PriorTrainConfig(diffusion={"prediction": "x0", "thresholding": "dynamic"})
    sr = superres.SR256TrainConfig(condaug={"max_train_level": 0.3, "blur_prob": 0.5})
    assert json.loads(sr.model_dump_json())["condaug"]["max_train_level"] == 0.3
    with pytest.raises(ValidationError, match=r"max_train_level must be in \[0, 1\]"):
        superres.SR1024TrainConfig(condaug={"max_train_level": 2})
