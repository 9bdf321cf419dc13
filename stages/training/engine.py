"""The DeepSpeed engine around a network, and one optimizer step on it.

One step = ``grad_accum`` micro-batches; a NaN/inf loss on any rank skips the update on every
rank (no optimizer, LR-schedule or EMA update), keeping ZeRO's collectives in lockstep.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

from stages.training.distributed import import_deepspeed
from stages.training.optim import build_optimizer, build_scheduler, deepspeed_config, resolve_precision
from stages.training.config import TrainConfig


def build_engine(cfg: TrainConfig, model: torch.nn.Module, *, device: torch.device, world_size: int = 1,
                 load_universal: bool = False):
    """DeepSpeed engine around ``model`` with our AdamW + warmup/cosine LambdaLR. -> (engine, precision).
    ``load_universal``: it will restore a Universal Checkpoint (a resize, stages/training/elastic.py)."""
    deepspeed = import_deepspeed(device)
    precision = resolve_precision(cfg, device)
    model.to(device)
    optimizer = build_optimizer(cfg, model.named_parameters(), device)
    scheduler = build_scheduler(cfg, optimizer)
    ds_cfg = deepspeed_config(cfg, world_size, precision)
    if load_universal:
        ds_cfg["checkpoint"] = {"load_universal": True}
    if _clips_itself(cfg, precision):
        ds_cfg["gradient_clipping"] = 0.0  # see train_step: DeepSpeed would clip but not report the norm
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg,
                                           dist_init_required=False)
    engine.t2i_clip = cfg.grad_clip if _clips_itself(cfg, precision) else None
    engine.t2i_params = [p for p in engine.module.parameters() if p.requires_grad]  # listed once, not per step
    return engine, precision


def _clips_itself(cfg: TrainConfig, precision: str) -> bool:
    # ZeRO-0 in fp32 hands our optimizer the raw grads: DeepSpeed clips them without keeping the norm.
    return cfg.zero_stage == 0 and precision == "fp32"


def train_step(engine, diffusion, micro_batches: list[tuple[torch.Tensor, dict]], *,
               loss_fn: Callable[..., tuple[torch.Tensor, dict]] | None = None) -> dict[str, Any]:
    """One optimizer step over ``grad_accum`` micro-batches. Returns detached tensors plus
    ``finite`` (bool): False means the loss was NaN/inf on some rank and the update was skipped.

    ``loss_fn``: the stage's objective (``StageSpec.loss``: ``(diffusion, model, x0, cond, t=, noise=)``);
    None: the diffusion loss.

    The finiteness check is the step's one host sync (one scalar; an all-reduce of it when there
    are several ranks, so every rank skips together and the ZeRO collectives stay in lockstep).
    """
    total = None
    finite = True
    for x0, cond in micro_batches:
        loss, _ = (diffusion.training_loss(engine, x0, cond) if loss_fn is None
                   else loss_fn(diffusion, engine, x0, cond))
        engine.backward(loss)
        total = loss.detach() if total is None else total + loss.detach()
        if engine.is_gradient_accumulation_boundary():
            finite = _all_finite(total)
            if not finite:
                _skip_engine_step(engine)
                break
            if getattr(engine, "t2i_clip", None) is not None:
                engine.t2i_norm = torch.nn.utils.clip_grad_norm_(engine.t2i_params, engine.t2i_clip or float("inf"),
                                                                 foreach=True)
        engine.step()
    if not finite:
        return {"loss": total, "grad_norm": None, "finite": False}
    norm = engine.get_global_grad_norm() if getattr(engine, "t2i_clip", None) is None else engine.t2i_norm
    return {"loss": total / len(micro_batches), "grad_norm": norm, "finite": True}


def _all_finite(loss: torch.Tensor) -> bool:
    flag = torch.isfinite(loss).to(torch.float32).reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _skip_engine_step(engine) -> None:
    """Drop this step's gradients and advance DeepSpeed's micro-step counter without an update.

    What DeepSpeed's own fp16 overflow path does (ZeRO-1/2 ``step`` on overflow): zero the grads,
    forget the reduced partitions, count a skipped step; no optimizer, LR-schedule or EMA update.
    """
    opt = engine.optimizer
    if hasattr(opt, "zero_grad"):
        try:
            opt.zero_grad(set_to_none=True)
        except TypeError:
            opt.zero_grad()
    engine.zero_grad()
    for attr in ("averaged_gradients", "all_grad_tensors"):  # ZeRO-1/2 reduced partitions
        d = getattr(opt, attr, None)
        if isinstance(d, dict):
            for k in d:
                d[k] = None
    engine.micro_steps += 1  # what engine.step() would have done: keeps the accumulation boundary aligned
    engine.skipped_steps += 1
