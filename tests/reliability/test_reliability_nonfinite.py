"""Non-finite loss: a NaN/inf step is skipped and counted (no optimizer, LR or EMA update); a
streak of ``max_nonfinite_steps`` stops the stage with a clear StageFailed and leaves the last
good checkpoint intact. Real DeepSpeed engine (CPU, ZeRO-0 and ZeRO-2), debug prior.

The fault is a batch builder that turns x0 into NaN on chosen optimizer steps; optimizer steps
are counted with torch's global optimizer step hook and EMA updates by wrapping the real method.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load as st_load

from pipeline import store
from pipeline.context import StageFailed
from stages.training import ema as ema_mod
from stages.models import prior
from stages.training.trainer import train_stage
from tests.support.data import make_dataset
from tests.support.train import stage_ctx, tiny_train_kwargs

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("nf"))
    return make_dataset(root, n_shards=2, per_shard=4)


def _nan_spec(bad_steps):
    """prior.SPEC whose batch on the given (1-based) optimizer steps has a NaN target."""
    calls = {"n": 0}

    def build(batch, cfg, flavor, device, dtype):
        calls["n"] += 1
        x0, cond = prior.build_batch(batch, cfg, flavor, device, dtype)
        if bad_steps(calls["n"]):
            x0 = torch.full_like(x0, float("nan"))
        return x0, cond

    return dataclasses.replace(prior.SPEC, build_batch=build)


@pytest.fixture
def counters(monkeypatch):
    c = {"opt_steps": 0, "ema_updates": 0}
    from torch.optim.optimizer import register_optimizer_step_post_hook

    def hook(opt, args, kwargs):
        # Updates applied = AdamW's own per-parameter step counter (ZeRO calls step once per param
        # group, and wraps AdamW in an optimizer of its own, so counting calls would over-count).
        if isinstance(opt, torch.optim.AdamW):
            steps = [int(s["step"]) for s in opt.state.values() if "step" in s]
            c["opt_steps"] = max([c["opt_steps"], *steps])

    handle = register_optimizer_step_post_hook(hook)
    real = ema_mod.EMA.update

    def counted(self, step):
        c["ema_updates"] += 1
        return real(self, step)

    monkeypatch.setattr(ema_mod.EMA, "update", counted)
    yield c
    handle.remove()


@pytest.mark.parametrize("zero,accum", [(0, 1), (2, 1), (0, 2)])
def test_nonfinite_steps_are_skipped_and_counted(data, tmp_path, counters, zero, accum, reliability):
    download, embed = data
    cfg = prior.PriorTrainConfig(**tiny_train_kwargs(steps=5, checkpoint_every_steps=1, keep_last=5, grad_accum=accum,
                                                     zero_stage=zero, max_nonfinite_steps=3))
    ctx = stage_ctx(str(tmp_path), "train_prior", download, embed)
    # Optimizer steps 2 and 3 are bad: with grad_accum=2 only their last micro-batch is NaN, so
    # the finite first micro-batch's gradients must be dropped too (and the accumulation boundary
    # must stay aligned afterwards: steps 4 and 5 update normally).
    result = train_stage(_nan_spec(lambda n: (n - 1) // accum + 1 in (2, 3) and n % accum == 0), cfg, ctx)
    assert result.counts["steps"] == 5 and result.counts["nonfinite_steps"] == 2
    assert counters["opt_steps"] == 3, "the two NaN steps must not reach the optimizer"
    assert counters["ema_updates"] == 3, "nor the EMA"
    weights = st_load(store.read_bytes(result.outputs["weights"]))
    assert all(torch.isfinite(v).all() for v in weights.values()), "NaN reached the weights"
    import json

    lines = [json.loads(x) for x in store.read_bytes(result.outputs["metrics"]).decode().splitlines()]
    assert [r["step"] for r in lines] == [1, 4, 5] and all(r["loss"] == r["loss"] for r in lines)
    assert lines[-1]["nonfinite_steps"] == 2
    reliability.record(kind="fault", name=f"NaN loss on 2 of 5 steps (ZeRO-{zero}, grad_accum={accum})",
                       survived=True,
                       detail="skipped+counted: 3 optimizer steps, 3 EMA updates, finite weights")


def test_nonfinite_streak_stops_stage_keeping_last_good_checkpoint(data, tmp_path, counters, reliability):
    download, embed = data
    cfg = prior.PriorTrainConfig(**tiny_train_kwargs(steps=20, checkpoint_every_steps=1, keep_last=2,
                                                     max_nonfinite_steps=3))
    ctx = stage_ctx(str(tmp_path), "train_prior", download, embed)
    with pytest.raises(StageFailed) as ei:
        train_stage(_nan_spec(lambda n: n >= 3), cfg, ctx)
    msg = str(ei.value)
    assert "NaN/inf for 3 steps in a row" in msg and "max_nonfinite_steps=3" in msg, msg
    ck = store.join(ctx.out_uri, "checkpoints", "step_00000002")
    assert ck in msg, "the message points at the last good checkpoint"
    assert store.exists(store.join(ck, "COMPLETE"))
    ema = st_load(store.read_bytes(store.join(ck, "ema.safetensors")))
    assert all(torch.isfinite(v).all() for v in ema.values())
    assert not store.exists(store.join(ctx.out_uri, "checkpoints", "step_00000003")), \
        "no checkpoint is written from a non-finite step"
    assert not store.exists(store.join(ctx.out_uri, "final", "config.json")), "a failed stage has no final output"
    assert counters["opt_steps"] == 2
    reliability.record(kind="fault", name="NaN loss on every step from step 3 (max_nonfinite_steps=3)",
                       survived=True, lost_checkpoints=0, detail="StageFailed naming step_00000002, which is intact")


def test_max_nonfinite_steps_is_validated():
    with pytest.raises(ValueError, match="max_nonfinite_steps must be > 0"):
        prior.PriorTrainConfig(max_nonfinite_steps=0)
