"""TrainConfig.lr_scales: learning-rate multipliers by parameter-name prefix (a jointly trained
text transformer at a fraction of the UNet's lr), through the real optimizer, scheduler and
DeepSpeed engine."""
from __future__ import annotations

import pytest
import torch

from stages.nets import build_network

DIMS = {"t5_dim": 24, "clip_dim": 16, "clip_token_dim": 12}


def _lrs(optimizer) -> dict[float, int]:
    """lr -> number of parameters at it."""
    out: dict[float, int] = {}
    for g in optimizer.param_groups:
        out[round(g["lr"], 12)] = out.get(round(g["lr"], 12), 0) + sum(p.numel() for p in g["params"])
    return out


def test_without_scales_the_groups_are_the_usual_decay_split():
    from stages.models.glide import GlideTrainConfig
    from stages.training.optim import build_optimizer

    net = build_network("glide", "debug", DIMS)
    opt = build_optimizer(GlideTrainConfig(flavor="debug", lr=1e-3, weight_decay=0.1), net.named_parameters(),
                          torch.device("cpu"))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert _lrs(opt) == {1e-3: sum(p.numel() for p in net.parameters())}


def test_a_prefix_scales_its_parameters_and_the_schedule_keeps_the_ratio():
    from stages.models.glide import GlideTrainConfig
    from stages.training.optim import build_optimizer, build_scheduler

    net = build_network("glide", "debug", DIMS)
    cfg = GlideTrainConfig(flavor="debug", lr=1e-3, steps=10, warmup_steps=2, lr_scales={"text.": 0.1})
    opt = build_optimizer(cfg, net.named_parameters(), torch.device("cpu"))
    n_text = sum(p.numel() for p in net.text.parameters())
    n_all = sum(p.numel() for p in net.parameters())
    assert _lrs(opt) == {1e-3: n_all - n_text, 1e-4: n_text}
    sched = build_scheduler(cfg, opt)
    for _ in range(5):
        opt.step(), sched.step()
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert lrs[0] == pytest.approx(0.1 * lrs[1])  # warmup/cosine multiply every group alike


def test_a_prefix_that_names_nothing_is_refused_with_the_names_there_are():
    from stages.models.glide import GlideTrainConfig
    from stages.training.optim import build_optimizer

    cfg = GlideTrainConfig(flavor="debug", lr_scales={"encoder.": 0.1})
    with pytest.raises(ValueError, match=r"no parameter is named 'encoder\.'.*start with final_proj\., text\., unet\."):
        build_optimizer(cfg, build_network("glide", "debug", DIMS).named_parameters(), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"lr_scales\['text\.'\]=0.0: must be > 0"):
        GlideTrainConfig(lr_scales={"text.": 0.0})


def test_deepspeed_engine_trains_with_scaled_groups():
    """ZeRO-2 over the scaled groups: the text transformer moves, at its own lr."""
    from pipeline.executors import DistEnv
    from stages.models import glide
    from stages.diffusion import Diffusion
    from stages.training.distributed import setup_distributed
    from stages.training.engine import build_engine, train_step
    from stages.nets import get_flavor

    cpu = torch.device("cpu")
    setup_distributed(DistEnv.from_env(), cpu)
    cfg = glide.GlideTrainConfig(flavor="debug", steps=3, batch_size=2, lr=1e-3, warmup_steps=0, cfg_drop_text=0.0,
                                 zero_stage=2, lr_scales={"text.": 0.5})
    torch.manual_seed(0)
    engine, _ = build_engine(cfg, build_network("glide", "debug", DIMS), device=cpu)
    assert sorted({g["lr"] for g in engine.optimizer.param_groups}) == [5e-4, 1e-3]
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=g),
             "clip_ids": torch.randint(0, 1000, (2, 5), generator=g), "clip_id_mask": torch.ones(2, 5, dtype=torch.bool)}
    micro = [glide.build_batch(batch, cfg, get_flavor("glide", "debug"), cpu, torch.float32)]
    diffusion = Diffusion(**cfg.diffusion.model_dump())
    for _ in range(3):
        assert train_step(engine, diffusion, micro)["finite"]
